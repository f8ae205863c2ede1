"""
A tiny unified multimodal model (UMM) of X-Omni's shape, built only from stock parts.

    text  --Qwen2ForCausalLM-->  <SOM>4 4<IMAGE><MM-Token-k>...   (generation: T2I)
    image --ImageTokenizer----->  <MM-Token-k>...  --Qwen2-->  text (understanding: I2T)
    codes --TinyDecoder + DDIMScheduler (diffusers)-->  pixels      (the diffusion head)

Like X-Omni it is one autoregressive LM over words *and* discrete image codes, an image
tokenizer that turns pixels into codes on an h x w grid, and a diffusion decoder that turns
codes back into pixels. It exposes the same small API that gvu.py drives on the real model:
`set_generation_mode`, the `<SOM>{h} {w}<IMAGE>` prefix, `tokenize_image(PIL) -> str`,
image codes as token ids >= `image_offset` printed as `<MM-Token-k>`, batched decoding, and
a chat template for captioning.

Parts:
- LM: transformers `Qwen2ForCausalLM`; vocabulary = words, then K image codes.
- Text tokenizer: a word-level tokenizer from the `tokenizers` library, wrapped as a
  transformers fast tokenizer with a chat template. Unknown words are reported by name.
- Image tokenizer: one learned feature per 16x16 cell, quantised to the nearest of K codes.
- Decoder: a diffusers `UNet2DModel` (no self-attention) that sees the noisy image
  concatenated with a learned 16x16 patch per code, sampled with a diffusers `DDIMScheduler`.

The recipe that trains it (and measures its understanding) is world/make_tiny_umm.py; the
checkpoints it wrote are checkpoints/tiny-umm (the default --model of gvu.py) and
checkpoints/tiny-umm-weak.
"""

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# 64 px canvas, 4x4 cells: one image code per 16x16 cell
from world.shapes import GRID, IMAGE_SIZE, PROMPT_WORDS

# the prompt words + instruction, chat, grid
WORDS = list(PROMPT_WORDS) + "describe image in detail user assistant 1 2 3 4 5 6 7 8 9".split()
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<SOM>", "<EOM>", "<IMAGE>"]
CHAT_TEMPLATE = (  # Qwen's chat format, on one line (the word-level tokenizer drops newlines)
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_tokenizer(num_codes, extra_words=(), text_rows=0):
    """Word-level tokenizer: ids [0, n_text) are words and specials (padded with unused entries
    up to `text_rows`, as a big model's text vocabulary), then <MM-Token-0..K-1>."""
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIALS + WORDS + list(extra_words)))}
    vocab.update({f"<unused-{i}>": i for i in range(len(vocab), text_rows)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and punctuation split off
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(f"<MM-Token-{k}>", normalized=False) for k in range(num_codes)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


class ImageTokenizer(ModelMixin, ConfigMixin):
    """Pixels -> codes: one learned feature per grid cell, snapped to the nearest codebook entry.
    Each 16x16 cell is read on its own (a small conv net, then one conv over the whole cell), so a
    neighbour's pixels never change a cell's code. `train` fits it as a nearest-prototype
    classifier: code k = kind k of `shape_kinds()` (0 = empty cell); codes >= the number of kinds
    (161) are never produced."""

    @register_to_config
    def __init__(self, num_codes=64, image_size=IMAGE_SIZE, grid=GRID, dim=32, hidden=32):
        super().__init__()
        cell = image_size // grid
        # per-cell features: local edges/colours, then the cell as a whole
        self.proj = nn.Sequential(
            nn.Conv2d(3, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, dim, kernel_size=cell),
        )
        self.codebook = nn.Parameter(torch.randn(num_codes, dim))

    def features(self, pixels):  # pixels (N, 3, H, W) in [-1, 1]
        g, c = self.config.grid, self.config.image_size // self.config.grid
        n = len(pixels)
        cells = (
            pixels.reshape(n, 3, g, c, g, c).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, 3, c, c)
        )
        return self.proj(cells).reshape(n, g * g, -1)  # (N, h*w, dim), cells in row-major order

    def logits(self, pixels):  # -squared distance to every code: the classifier trained in `train`
        z = self.features(pixels)
        return -(
            z.pow(2).sum(-1, keepdim=True) - 2 * z @ self.codebook.T + self.codebook.pow(2).sum(-1)
        )

    @torch.no_grad()
    def encode(self, pixels):
        z = self.features(pixels)  # (N, h*w, dim)
        return torch.cdist(z, self.codebook.expand(len(z), -1, -1)).argmin(-1)  # (N, h*w)


class TinyDecoder(ModelMixin, ConfigMixin):
    """The diffusion head's denoiser: a small UNet2D conditioned by concatenating code embeddings.
    Each code embeds to a learned cell-sized patch (cond_dim x 16 x 16), not one constant vector:
    two identical neighbouring codes would otherwise give a featureless region with no hint of
    where one object ends and the next begins. The first 3 patch channels are an RGB template.
    It outputs epsilon (what DDIMScheduler expects) but is parameterised through x0:
        x0_hat = template + UNet(noisy, cond)
        eps = (noisy - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)
    so a good template alone already decodes to a crisp image, and the UNet learns the rest."""

    @register_to_config
    def __init__(
        self,
        num_codes=64,
        image_size=IMAGE_SIZE,
        grid=GRID,
        cond_dim=8,
        channels=(16, 32),
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
    ):
        super().__init__()
        cell = image_size // grid
        self.code_embed = nn.Embedding(num_codes, cond_dim * cell * cell)
        self.unet = UNet2DModel(  # no self-attention anywhere (mid block included): cells are local
            sample_size=image_size,
            in_channels=3 + cond_dim,
            out_channels=3,
            block_out_channels=tuple(channels),
            layers_per_block=1,
            norm_num_groups=8,
            add_attention=False,
            down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels),
        )
        abar = DDIMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule
        ).alphas_cumprod
        # the scheduler's, for eps <-> x0
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)

    def condition(self, codes):  # codes (N, h*w) -> (N, cond_dim, H, W): one patch per cell
        g, s, d = self.config.grid, self.config.image_size, self.config.cond_dim
        c = s // g
        cond = self.code_embed(codes).reshape(len(codes), g, g, d, c, c)
        return cond.permute(0, 3, 1, 4, 2, 5).reshape(len(codes), d, s, s)

    def forward(self, noisy, t, codes):  # noisy (N, 3, H, W), codes (N, h*w)
        cond = self.condition(codes)
        x0 = cond[:, :3] + self.unet(torch.cat([noisy, cond], 1), t).sample
        abar = self.alphas_cumprod[torch.as_tensor(t, device=noisy.device).long()].reshape(
            -1, 1, 1, 1
        )
        return (noisy - abar.sqrt() * x0) / (1 - abar).sqrt()  # predicted noise


def to_pixels(images, device="cpu"):
    """list of PIL -> (N, 3, H, W) in [-1, 1]."""
    arr = np.stack(
        [
            np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
            for im in images
        ]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(device) / 127.5 - 1


def to_pil(pixels):
    """(N, 3, H, W) in [-1, 1] -> list of PIL."""
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class TinyUMM:
    """The X-Omni-shaped API gvu.py needs, over the tiny parts above."""

    def __init__(self, lm, tokenizer, image_tokenizer, decoder, scheduler, decode_steps=10):
        self.lm, self.tokenizer = lm, tokenizer
        self.image_tokenizer, self.decoder, self.scheduler = image_tokenizer, decoder, scheduler
        self.decode_steps = decode_steps  # DDIM steps when decoding codes to pixels
        # X-Omni: config.vocab_size
        self.image_offset = tokenizer.convert_tokens_to_ids("<MM-Token-0>")
        self.image_vocab_size = image_tokenizer.config.num_codes
        self.grid = (image_tokenizer.config.grid,) * 2  # (h, w) codes
        self.generation_mode = "text"
        for m in (image_tokenizer, decoder):
            m.requires_grad_(False).eval()  # frozen: GvU trains the LM only

    # --- construction and persistence -------------------------------------------------
    @classmethod
    def random(cls, seed=0, hidden=128, layers=4, heads=4, num_codes=64):
        """A randomly initialised tiny UMM (deterministic given seed)."""
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(num_codes)
        cfg = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True
        )
        return cls(
            Qwen2ForCausalLM(cfg),
            tokenizer,
            ImageTokenizer(num_codes),
            TinyDecoder(num_codes),
            scheduler,
        )

    def save_pretrained(self, path):
        self.lm.save_pretrained(os.path.join(path, "lm"))  # safetensors
        self.tokenizer.save_pretrained(os.path.join(path, "lm"))
        self.image_tokenizer.save_pretrained(os.path.join(path, "image_tokenizer"))
        self.decoder.save_pretrained(os.path.join(path, "decoder"))
        self.scheduler.save_pretrained(os.path.join(path, "scheduler"))
        with open(os.path.join(path, "tiny_umm.json"), "w") as f:
            json.dump({"decode_steps": self.decode_steps}, f)

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        with open(os.path.join(path, "tiny_umm.json")) as f:
            extra = json.load(f)
        return cls(
            Qwen2ForCausalLM.from_pretrained(os.path.join(path, "lm")).to(device),
            PreTrainedTokenizerFast.from_pretrained(os.path.join(path, "lm")),
            ImageTokenizer.from_pretrained(os.path.join(path, "image_tokenizer")).to(device),
            TinyDecoder.from_pretrained(os.path.join(path, "decoder")).to(device),
            DDIMScheduler.from_pretrained(os.path.join(path, "scheduler")),
            **extra,
        )

    @staticmethod
    def is_tiny_umm(path):
        return os.path.isfile(os.path.join(path, "tiny_umm.json"))

    def to(self, device):
        for m in (self.lm, self.image_tokenizer, self.decoder):
            m.to(device)
        return self

    # --- X-Omni's API ------------------------------------------------------------------
    def set_generation_mode(self, mode):
        assert mode in ("text", "image"), mode
        self.generation_mode = mode

    def t2i_prompt(self, prompt):
        h, w = self.grid
        return f"{prompt}<SOM>{h} {w}<IMAGE>"

    @torch.no_grad()
    def image_codes(self, images):
        """N PIL images -> their codes (N, h*w), in one image-tokenizer call."""
        return self.image_tokenizer.encode(to_pixels(images, self.lm.device))

    def tokenize_image(self, image):
        return self.codes_to_text(self.image_codes([image])[0])

    def codes_to_text(self, codes):
        """One image's codes (h*w,) -> '<SOM>h w<IMAGE><MM-Token-k>...<EOM>', as tokenize_image."""
        h, w = self.grid
        return f"<SOM>{h} {w}<IMAGE>" + "".join(f"<MM-Token-{k}>" for k in codes.tolist()) + "<EOM>"

    def caption_prompt(self, image, instruction):
        """Chat context for understanding: the image, the instruction, then the assistant's turn."""
        return self.caption_prompt_text(self.tokenize_image(image), instruction)

    # understanding reads the generation vocabulary: --reward-input codes works
    understands_codes = True

    def caption_prompts(self, images, instruction):
        """caption_prompt for a batch, with ONE image-tokenizer call for all images. `images`: N PIL
        images, or their codes (N, h*w) already (--reward-input codes: the generated codes, read
        without decoding)."""
        codes = images if torch.is_tensor(images) else self.image_codes(images)
        return [self.caption_prompt_text(self.codes_to_text(c), instruction) for c in codes]

    def caption_prompt_text(self, image_text, instruction):
        """caption_prompt for an image already tokenised to text (training tokenises in batches)."""
        msgs = [{"role": "user", "content": image_text + " " + instruction}]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    answer_prefix, answer_suffix = "", "<|im_end|>"  # what the scored answer starts and ends with
    # the LM's linear layers
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def uncond_prompt(self, prompt):
        """CFG's unconditional prompt: X-Omni's image prefix alone."""
        return self.t2i_prompt("")

    @property
    def image_size(self):
        return self.decoder.config.image_size  # pixels per side: the only size the decoder makes

    @torch.no_grad()
    def decode_images(self, codes, generator=None, prompts=None, batch_size=64):
        """codes (N, h*w) in [0, K) -> N PIL images, DDIM-sampled in batches from seeded noise.
        `prompts` (the T2I prompts) is accepted for the UMM API and unused: this decoder reads codes
        only."""
        device, s = self.decoder.device, self.decoder.config.image_size
        self.scheduler.set_timesteps(self.decode_steps)
        images = []
        for chunk in codes.to(device).split(batch_size):
            x = torch.randn(len(chunk), 3, s, s, generator=generator, device="cpu").to(device)
            for t in self.scheduler.timesteps:
                x = self.scheduler.step(self.decoder(x, t, chunk), t, x).prev_sample
            images += to_pil(x)
        return images

    # --- what gvu.py reads off the LM ------------------------------------------------------
    def hidden_states(self, input_ids, attention_mask, position_ids=None, cache=None, images=None):
        """Final-layer hidden states (B, T, D). `cache` (a DynamicCache) is updated in place.
        `images` is unused: like X-Omni, the tiny UMM reads images as codes in the text (Janus
        encodes pixels)."""
        # positional: transformers 4.x calls the 4th argument past_key_values, 5.x calls it cache
        out = self.lm.model(
            input_ids, attention_mask, position_ids, cache, use_cache=cache is not None
        )
        return out.last_hidden_state

    def logits(self, hidden):
        """Logits over the current mode's vocabulary: image codes [0, K) or text ids [0, offset)."""
        w = self.lm.lm_head.weight  # (V, D); LoRA never touches the head, so slicing it is exact
        w = (
            w[self.image_offset : self.image_offset + self.image_vocab_size]
            if self.generation_mode == "image"
            else w[: self.image_offset]
        )
        return F.linear(hidden, w)

    def unknown_words(self, text):
        """Words of `text` the tokenizer does not know (they would silently become <unk>)."""
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        unk = self.tokenizer.unk_token_id
        return [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
