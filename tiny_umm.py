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

    python tiny_umm.py train --out checkpoints/tiny-umm --seed 0   # the shipped model (--t2i-frac 0.1, 1500 LM steps)
    python tiny_umm.py understand --model checkpoints/tiny-umm [--adapter RUN/adapter]
    python tiny_umm.py gen-eval --model checkpoints/tiny-umm
    python tiny_umm.py random --out /tmp/tiny   # a random-init model folder (safetensors)
"""
import argparse
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

from shapes import GRID, IMAGE_SIZE, PROMPT_WORDS  # 64 px canvas, 4x4 cells: one image code per 16x16 cell

WORDS = list(PROMPT_WORDS) + "describe image in detail user assistant 1 2 3 4 5 6 7 8 9".split()  # + instruction, chat, grid
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<SOM>", "<EOM>", "<IMAGE>"]
CHAT_TEMPLATE = (  # Qwen's chat format, on one line (the word-level tokenizer drops newlines)
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_tokenizer(num_codes, extra_words=(), text_rows=0):
    """Word-level tokenizer: ids [0, n_text) are words and specials (padded with unused entries up to
    `text_rows`, as a big model's text vocabulary), then <MM-Token-0..K-1>."""
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIALS + WORDS + list(extra_words)))}
    vocab.update({f"<unused-{i}>": i for i in range(len(vocab), text_rows)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and punctuation split off
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(f"<MM-Token-{k}>", normalized=False) for k in range(num_codes)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE)


class ImageTokenizer(ModelMixin, ConfigMixin):
    """Pixels -> codes: one learned feature per grid cell, snapped to the nearest codebook entry.
    Each 16x16 cell is read on its own (a small conv net, then one conv over the whole cell), so a
    neighbour's pixels never change a cell's code. `train` fits it as a nearest-prototype classifier:
    code k = kind k of `shape_kinds()` (0 = empty cell), codes >= len(KINDS) are never produced."""

    @register_to_config
    def __init__(self, num_codes=192, image_size=IMAGE_SIZE, grid=GRID, dim=32, hidden=32):
        super().__init__()
        cell = image_size // grid
        self.proj = nn.Sequential(  # per-cell features: local edges/colours, then the cell as a whole
            nn.Conv2d(3, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, dim, kernel_size=cell))
        self.codebook = nn.Parameter(torch.randn(num_codes, dim))

    def features(self, pixels):  # pixels (N, 3, H, W) in [-1, 1]
        g, c = self.config.grid, self.config.image_size // self.config.grid
        n = len(pixels)
        cells = pixels.reshape(n, 3, g, c, g, c).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, 3, c, c)
        return self.proj(cells).reshape(n, g * g, -1)  # (N, h*w, dim), cells in row-major order

    def logits(self, pixels):  # -squared distance to every code: the classifier trained in `train`
        z = self.features(pixels)
        return -(z.pow(2).sum(-1, keepdim=True) - 2 * z @ self.codebook.T + self.codebook.pow(2).sum(-1))

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
        x0_hat = template + UNet(noisy, cond),  eps = (noisy - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t),
    so a good template alone already decodes to a crisp image, and the UNet learns the rest."""

    @register_to_config
    def __init__(self, num_codes=192, image_size=IMAGE_SIZE, grid=GRID, cond_dim=8, channels=(16, 32),
                 num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"):
        super().__init__()
        cell = image_size // grid
        self.code_embed = nn.Embedding(num_codes, cond_dim * cell * cell)
        self.unet = UNet2DModel(  # no self-attention anywhere (mid block included): cells are local
            sample_size=image_size, in_channels=3 + cond_dim, out_channels=3,
            block_out_channels=tuple(channels), layers_per_block=1, norm_num_groups=8, add_attention=False,
            down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels))
        abar = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule).alphas_cumprod
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)  # the scheduler's, for eps <-> x0

    def condition(self, codes):  # codes (N, h*w) -> (N, cond_dim, H, W): one patch per cell
        g, s, d = self.config.grid, self.config.image_size, self.config.cond_dim
        c = s // g
        cond = self.code_embed(codes).reshape(len(codes), g, g, d, c, c)
        return cond.permute(0, 3, 1, 4, 2, 5).reshape(len(codes), d, s, s)

    def forward(self, noisy, t, codes):  # noisy (N, 3, H, W), codes (N, h*w)
        cond = self.condition(codes)
        x0 = cond[:, :3] + self.unet(torch.cat([noisy, cond], 1), t).sample
        abar = self.alphas_cumprod[torch.as_tensor(t, device=noisy.device).long()].reshape(-1, 1, 1, 1)
        return (noisy - abar.sqrt() * x0) / (1 - abar).sqrt()  # predicted noise


def to_pixels(images, device="cpu"):
    """list of PIL -> (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) for im in images])
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
        self.image_offset = tokenizer.convert_tokens_to_ids("<MM-Token-0>")  # X-Omni: config.vocab_size
        self.image_vocab_size = image_tokenizer.config.num_codes
        self.grid = (image_tokenizer.config.grid,) * 2  # (h, w) codes
        self.generation_mode = "text"
        for m in (image_tokenizer, decoder):
            m.requires_grad_(False).eval()  # frozen: GvU trains the LM only

    # --- construction and persistence -------------------------------------------------
    @classmethod
    def random(cls, seed=0, hidden=128, layers=4, heads=4, num_codes=192):
        """A randomly initialised tiny UMM (deterministic given seed)."""
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(num_codes)
        cfg = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
        return cls(Qwen2ForCausalLM(cfg), tokenizer, ImageTokenizer(num_codes), TinyDecoder(num_codes), scheduler)

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
            DDIMScheduler.from_pretrained(os.path.join(path, "scheduler")), **extra)

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
    def tokenize_image(self, image):
        return self.codes_to_text(self.image_tokenizer.encode(to_pixels([image], self.lm.device))[0])

    def codes_to_text(self, codes):
        """One image's codes (h*w,) -> '<SOM>h w<IMAGE><MM-Token-k>...<EOM>' (what tokenize_image returns)."""
        h, w = self.grid
        return f"<SOM>{h} {w}<IMAGE>" + "".join(f"<MM-Token-{k}>" for k in codes.tolist()) + "<EOM>"

    def caption_prompt(self, image, instruction):
        """Chat context for understanding: the image, then the instruction, then the assistant's turn."""
        return self.caption_prompt_text(self.tokenize_image(image), instruction)

    def caption_prompt_text(self, image_text, instruction):
        """caption_prompt for an image already tokenised to text (training builds these in batches)."""
        msgs = [{"role": "user", "content": image_text + " " + instruction}]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    answer_prefix, answer_suffix = "", "<|im_end|>"  # what the scored answer starts and ends with
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the LM's linear layers

    def uncond_prompt(self, prompt):
        """CFG's unconditional prompt: X-Omni's image prefix alone."""
        return self.t2i_prompt("")

    @torch.no_grad()
    def decode_images(self, codes, generator=None, batch_size=64):
        """codes (N, h*w) in [0, K) -> N PIL images, DDIM-sampled in batches from seeded noise."""
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
        """Final-layer hidden states (B, T, D). `cache` (a DynamicCache) is updated in place. `images` is
        unused: like X-Omni, the tiny UMM reads images as codes in the text (Janus encodes pixels)."""
        # positional: transformers 4.x calls the 4th argument past_key_values, 5.x calls it cache
        out = self.lm.model(input_ids, attention_mask, position_ids, cache, use_cache=cache is not None)
        return out.last_hidden_state

    def logits(self, hidden):
        """Logits over the current mode's vocabulary only: image codes [0, K) or text ids [0, offset)."""
        w = self.lm.lm_head.weight  # (V, D); LoRA never touches the head, so slicing it is exact
        w = w[self.image_offset:self.image_offset + self.image_vocab_size] if self.generation_mode == "image" \
            else w[:self.image_offset]
        return F.linear(hidden, w)

    def unknown_words(self, text):
        """Words of `text` the tokenizer does not know (they would silently become <unk>)."""
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        unk = self.tokenizer.unk_token_id
        return [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]


# =====================================================================================
# Training a tiny UMM base in the shapes world, and measuring it
#
#   python tiny_umm.py train --out checkpoints/tiny-umm --t2i-frac 0.1          (normal base)
#   python tiny_umm.py train --out checkpoints/tiny-umm-weak --t2i-frac 0.03 \
#          --vision-from checkpoints/tiny-umm                                      (weak base)
#   python tiny_umm.py understand --model checkpoints/tiny-umm --n 300
#   python tiny_umm.py gen-eval --model checkpoints/tiny-umm --n-per-prompt 4
#
# Three stages, each deterministic in --seed: (1) the image tokenizer, a per-cell classifier onto
# the 161 cell kinds; (2) the diffusion decoder on (render, codes) pairs; (3) the LM on I2T captions
# in every phrasing of the world (strong) and T2I code sequences of the train lines only (a --t2i-frac
# share, deliberately weaker), in gvu.py's formats.
# =====================================================================================
import time

import shapes

INSTRUCTION = "Describe the image in detail."  # gvu.py's default understanding instruction
COUNTED_TAGS = shapes.NUMBERED_TAGS
EVAL_FILES = ("prompts/shapes_geneval.jsonl", "prompts/shapes_geneval_plus.jsonl")
POSITION_SHARES = 3  # caption shares of the plain-relation tag (every other tag: 1)


def log(msg, t0=[time.time()]):
    print(f"[{time.time() - t0[0]:6.0f}s] {msg}", flush=True)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- the 161 cell kinds -----------------------------------------------------------------
def shape_kinds():
    """Kind 0 = empty cell, then (shape, colour, size) for 8 x 10 x 2 = 160 objects: code k = kind k."""
    return [None] + [(s, c, z) for s in shapes.SHAPES for c in shapes.COLORS for z in shapes.SIZES]


KINDS = shape_kinds()
KIND_ID = {k: i for i, k in enumerate(KINDS)}


def scene_codes(objects):
    """The intended codes of a scene: kind id per cell, row-major."""
    codes = [0] * (GRID * GRID)
    for o in objects:
        codes[o.row * GRID + o.col] = KIND_ID[(o.shape, o.color, o.size)]
    return codes


def random_cells(rng, p_empty=0.4):
    """A scene with every cell independently empty or a random object (tokenizer/decoder data)."""
    return [shapes.Obj(*KINDS[k], r, c) for r in range(GRID) for c in range(GRID)
            if rng.random() > p_empty for k in [int(rng.integers(1, len(KINDS)))]]


def render_batch(scenes, rng, jitter=0, noise=0.0):
    return to_pixels([shapes.render(s, jitter=jitter, noise=noise, rng=rng) for s in scenes])


# --- stage 1: the image tokenizer ------------------------------------------------------
def train_image_tokenizer(tok, rng, steps=300, batch=48, lr=3e-3):
    """Nearest-prototype classifier: cross-entropy over -||feature - codebook_k||^2 with the
    cell's kind as label. Trained on jittered, noisy renders so that decoded images (never
    pixel-perfect) still snap to the right code; the unused codes drift away from every cell."""
    opt = torch.optim.Adam(tok.parameters(), lr=lr)
    tok.train().requires_grad_(True)
    for step in range(steps):
        scenes = [random_cells(rng) for _ in range(batch)]
        x = render_batch(scenes, rng, jitter=1, noise=float(rng.choice([0.0, 4.0, 12.0])))
        y = torch.tensor([scene_codes(s) for s in scenes])
        loss = F.cross_entropy(tok.logits(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"tokenizer step {step:4d}  loss {loss.item():.4f}")
    tok.requires_grad_(False).eval()


@torch.no_grad()
def tokenizer_accuracy(tok, rng, n=500, noise=0.0):
    scenes = [random_cells(rng) for _ in range(n)]
    codes = tok.encode(render_batch(scenes, rng, jitter=1, noise=noise))
    return (codes == torch.tensor([scene_codes(s) for s in scenes])).float().mean().item()


# --- stage 2: the diffusion decoder -----------------------------------------------------
@torch.no_grad()
def init_decoder_templates(dec):
    """Start each code's RGB template at its kind's centred render (one cell; every cell draws
    the same way) and the UNet's residual at zero: the decoder starts as a near-perfect x0 model,
    so the diffusion training below is a short fine-tune instead of a long CPU run.
    Unused codes (>= len(KINDS)) get the empty cell's template."""
    c = dec.config.image_size // dec.config.grid
    w = dec.code_embed.weight.view(dec.config.num_codes, dec.config.cond_dim, c, c)
    for k in range(dec.config.num_codes):
        objs = [shapes.Obj(*KINDS[k], 0, 0)] if 0 < k < len(KINDS) else []
        w[k, :3] = to_pixels([shapes.render(objs)])[0, :, :c, :c]
    dec.unet.conv_out.weight.zero_()
    dec.unet.conv_out.bias.zero_()


def train_decoder(dec, scheduler, rng, steps=200, batch=16, lr=5e-4):
    """Standard DDPM epsilon-prediction MSE on (render, codes), after the template init. Targets are renders without jitter:
    given its codes an image is then fully determined, so decodes come out crisp and centred."""
    init_decoder_templates(dec)
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    dec.train().requires_grad_(True)
    T = scheduler.config.num_train_timesteps
    for step in range(steps):
        scenes = [random_cells(rng, p_empty=float(rng.uniform(0.2, 0.9))) for _ in range(batch)]
        x0 = render_batch(scenes, rng)
        codes = torch.tensor([scene_codes(s) for s in scenes])
        t = torch.from_numpy(rng.integers(0, T, batch))
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        loss = F.mse_loss(dec(scheduler.add_noise(x0, noise, t), t, codes), noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step:4d}  loss {loss.item():.4f}")
    dec.requires_grad_(False).eval()


def detections_match(image, objects):
    """Does the pixel detector read exactly the scene's objects (shape, colour, size, cell)?"""
    got = sorted((d.shape, d.color, d.size, d.cell) for d in shapes.detect(image))
    return got == sorted((o.shape, o.color, o.size, (o.row, o.col)) for o in objects)


@torch.no_grad()
def vision_round_trip(umm, rng, n=200):
    """On held-out scenes: decode(encode(render)) read by the oracle (exact scene and per-line
    oracle), and re-tokenising the decoded image gives back the same codes."""
    metas = [m for f in EVAL_FILES for m in read_jsonl(f)]
    picks = [metas[i] for i in rng.integers(0, len(metas), n)]
    scenes = [shapes.sample_scene(m, rng, extra=int(rng.integers(0, 3))) for m in picks]
    codes = umm.image_tokenizer.encode(render_batch(scenes, rng, jitter=1))
    images = umm.decode_images(codes, torch.Generator().manual_seed(0))
    recodes = umm.image_tokenizer.encode(to_pixels(images))
    return dict(
        exact_scene=float(np.mean([detections_match(im, s) for im, s in zip(images, scenes)])),
        oracle=float(np.mean([shapes.oracle(im, m)[0] for im, m in zip(images, picks)])),
        codes_right=(codes == torch.tensor([scene_codes(s) for s in scenes])).float().mean().item(),
        recode_same=(recodes == codes).float().mean().item())


# --- captions and one-attribute distractors ------------------------------------------------
def caption_of(meta):
    """Rebuild a metadata line (prompt text, excludes) from its include list, in shapes.py's phrasing."""
    return shapes.make_line(meta["tag"], meta["include"])


def distractors(meta):
    """{attribute: [metadata lines that change ONE attribute of `meta`]}. Attributes: colour,
    count, position (relation or region), shape, size. Not yet checked against an image."""
    inc = meta["include"]
    out = {a: [] for a in ("color", "count", "position", "shape", "size")}

    def variant(i, **changes):
        new = [dict(r) for r in inc]
        new[i].update(changes)
        return caption_of({"tag": meta["tag"], "include": new})

    used = {r["class"] for r in inc}
    for i, r in enumerate(inc):
        if "color" in r:
            out["color"] += [variant(i, color=c) for c in shapes.COLORS if c != r["color"]]
        if meta["tag"] in COUNTED_TAGS:
            out["count"] += [variant(i, count=n) for n in (r["count"] - 1, r["count"] + 1) if 1 <= n <= shapes.MAX_OBJECTS]
        if "position" in r:
            out["position"] += [variant(i, position=[rel, r["position"][1]])
                                for rel in shapes.RELATIONS if rel != r["position"][0]]
        if "region" in r:
            out["position"] += [variant(i, region=g) for g in shapes.REGIONS if g != r["region"]]
        out["shape"] += [variant(i, **{"class": s}) for s in shapes.SHAPES if s not in used]
        if r.get("size") in shapes.SIZES:
            out["size"].append(variant(i, size=[z for z in shapes.SIZES if z != r["size"]][0]))
    if any(r.get("size") in ("larger", "smaller") for r in inc):  # swap which one is larger
        swap = {"larger": "smaller", "smaller": "larger"}
        out["size"].append(caption_of({"tag": meta["tag"], "include": [
            dict(r, size=swap[r["size"]]) if r.get("size") in swap else dict(r) for r in inc]}))
    return out


def false_distractors(image, meta, rng, per_attr=3):
    """Per attribute, up to `per_attr` distractor prompts that the pixel oracle says are FALSE
    for this image (a changed attribute can happen to be true too, e.g. a second relation)."""
    out, dets = {}, shapes.detect(image)
    for attr, cands in distractors(meta).items():
        cands = [cands[i] for i in rng.permutation(len(cands))]
        bad = [d["prompt"] for d in cands if not shapes.judge(dets, d)[0]][:per_attr]
        if bad:
            out[attr] = bad
    return out


# --- stage 3: the LM --------------------------------------------------------------------
def t2i_example(umm, meta, rng):
    """T2I: t2i_prompt(prompt) + the codes of a scene satisfying it (loss on the codes only),
    exactly the sequence gvu.rollout samples and gvu.token_logprobs scores."""
    prefix = umm.tokenizer(umm.t2i_prompt(meta["prompt"]), add_special_tokens=False).input_ids
    codes = [umm.image_offset + k for k in scene_codes(shapes.sample_scene(meta, rng))]
    return prefix + codes, len(prefix)


def i2t_batch(umm, metas, rng, with_distractor):
    """I2T: caption_prompt(image, instruction) + prompt + <|im_end|> (loss on the answer), exactly
    gvu.prompt_token_logprobs' layout. Images are jittered renders of scenes sampled for the line,
    sometimes with extra unmentioned objects (as generated images have); the context uses the
    trained image tokenizer's codes. Optionally one oracle-checked one-attribute distractor each."""
    scenes = [shapes.sample_scene(m, rng, extra=int(rng.choice([0, 0, 1, 2]))) for m in metas]
    images = [shapes.render(s, jitter=1, rng=rng) for s in scenes]
    codes = umm.image_tokenizer.encode(to_pixels(images))
    tok = umm.tokenizer
    out = []
    for m, im, c in zip(metas, images, codes):
        ctx = tok(umm.caption_prompt_text(umm.codes_to_text(c), INSTRUCTION), add_special_tokens=False).input_ids
        ans = tok(m["prompt"] + umm.answer_suffix, add_special_tokens=False).input_ids
        bad = None
        if with_distractor:  # attribute first, so shape and position get as many pairs as colour
            cands, dets = [ds for ds in distractors(m).values() if ds], shapes.detect(im)
            for a in rng.permutation(len(cands)):
                d = cands[a][int(rng.integers(len(cands[a])))]
                if not shapes.judge(dets, d)[0]:  # a changed attribute can happen to be true
                    bad = tok(d["prompt"] + umm.answer_suffix, add_special_tokens=False).input_ids
                    break
        out.append((ctx, ans, bad))
    return out


def lm_loss(umm, seqs):
    """seqs: list of (ids, start) = targets are ids[start:]. Right-padded batch; each target is
    scored over its own mode's vocabulary (text or image codes), as gvu's `logits` does.
    Returns per-sequence (sum of target log-probs, number of targets, is_image)."""
    T = max(len(q) for q, _ in seqs)
    pad = umm.tokenizer.pad_token_id
    ids = torch.tensor([q + [pad] * (T - len(q)) for q, _ in seqs])
    attn = torch.tensor([[1] * len(q) + [0] * (T - len(q)) for q, _ in seqs])
    tmask = torch.tensor([[0] * s + [1] * (len(q) - s) + [0] * (T - len(q)) for q, s in seqs])[:, 1:].bool()
    hidden = umm.lm.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
    target = ids[:, 1:]
    is_img = target >= umm.image_offset
    w = umm.lm.lm_head.weight
    K, off = umm.image_vocab_size, umm.image_offset
    logp = torch.zeros(target.shape)
    sel = tmask & is_img
    if sel.any():
        lp = F.log_softmax(hidden[sel] @ w[off:off + K].T, -1)
        logp[sel] = lp.gather(-1, (target[sel] - off)[:, None])[:, 0]
    sel = tmask & ~is_img
    if sel.any():
        lp = F.log_softmax(hidden[sel] @ w[:off].T, -1)
        logp[sel] = lp.gather(-1, target[sel][:, None])[:, 0]
    return logp.sum(1), tmask.sum(1)


def caption_space():
    """What the understanding branch learns to read: every line of every tag, as (benchmark, tag) keys
    for shapes.sample_line, drawn uniformly (a key listed k times gets k shares). A captioner
    describes scenes in all the world's phrasings (as a real UMM's caption data does), the eval
    prompts' texts included; T2I learns from the train lines only, so eval prompts stay unseen by
    generation (and by GvU). Plain relations ("a square left of a circle") get POSITION_SHARES
    shares: at one share they were the one attribute the v1 world's LM read poorly (0.84)."""
    keys = [(bench, tag) for bench, tags in shapes.BENCHMARKS.items() for tag in tags]
    return keys + [("geneval", "position")] * (POSITION_SHARES - 1)


def lm_batch(umm, metas, captions, rng, batch, n_t2i, with_distractor):
    """n_t2i T2I examples of train lines `metas`, and batch - n_t2i I2T examples whose captions are
    drawn from `captions` ((benchmark, tag) keys: a tag uniformly, then one of its lines)."""
    seqs = [t2i_example(umm, metas[i], rng) for i in rng.integers(0, len(metas), n_t2i)]
    tags = [captions[i] for i in rng.integers(0, len(captions), batch - n_t2i)]
    return seqs, i2t_batch(umm, [shapes.sample_line(*t, rng) for t in tags], rng, with_distractor)


def train_lm(umm, metas, captions, rng, steps, batch, t2i_frac, lr, rank_weight):
    """Mixed batches (`lm_batch`): round(batch * t2i_frac) T2I sequences, the rest I2T. Loss = mean token NLL
    over all targets + rank_weight * a ranking loss that puts the true caption's reward (mean
    log-prob of prompt + end-of-turn, the intrinsic reward) above a one-attribute distractor's."""
    n_t2i = int(round(batch * t2i_frac))
    opt = torch.optim.AdamW(umm.lm.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    umm.lm.train().requires_grad_(True)
    for step in range(steps):
        seqs, i2t = lm_batch(umm, metas, captions, rng, batch, n_t2i, with_distractor=rank_weight > 0)
        seqs += [(c + a, len(c)) for c, a, _ in i2t]
        ranked = [k for k, (_, _, b) in enumerate(i2t) if b is not None]
        seqs += [(i2t[k][0] + i2t[k][2], len(i2t[k][0])) for k in ranked]
        lp, n = lm_loss(umm, seqs)
        n_main = n_t2i + len(i2t)
        nll = -lp[:n_main].sum() / n[:n_main].sum()
        nll_img = -lp[:n_t2i].sum() / max(1, n[:n_t2i].sum())
        nll_txt = -lp[n_t2i:n_main].sum() / n[n_t2i:n_main].sum()
        loss, rank = nll, torch.tensor(0.0)
        if ranked:  # logistic loss on the gap of mean log-probs (log intrinsic rewards)
            good = (lp[n_t2i:n_main] / n[n_t2i:n_main])[ranked]
            bad = lp[n_main:] / n[n_main:]
            rank = F.softplus(-10 * (good - bad)).mean()
            loss = loss + rank_weight * rank
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(umm.lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"lm step {step:5d}  nll img {nll_img.item():.3f}  txt {nll_txt.item():.3f}  rank {rank.item():.3f}"
                f"  lr {sched.get_last_lr()[0]:.1e}")
    umm.lm.eval().requires_grad_(False)


def train(a):
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    umm = TinyUMM.random(a.seed, a.hidden, a.layers, a.heads, a.num_codes)
    if a.vision_from:  # reuse a trained tokenizer + decoder (same seed -> same result, faster)
        src = TinyUMM.from_pretrained(a.vision_from)
        umm.image_tokenizer, umm.decoder = src.image_tokenizer, src.decoder
        log(f"image tokenizer + decoder loaded from {a.vision_from}")
    else:
        train_image_tokenizer(umm.image_tokenizer, rng, a.tok_steps)
        log(f"tokenizer cell accuracy: clean {tokenizer_accuracy(umm.image_tokenizer, rng):.4f}"
            f"  noise 12: {tokenizer_accuracy(umm.image_tokenizer, rng, noise=12.0):.4f}")
        train_decoder(umm.decoder, umm.scheduler, rng, a.dec_steps)
    log("vision round trip (held-out scenes): " + json.dumps(
        {k: round(v, 4) for k, v in vision_round_trip(umm, np.random.default_rng(a.seed + 1)).items()}))
    metas = read_jsonl(a.prompts)
    eval_prompts = {m["prompt"] for f in EVAL_FILES for m in read_jsonl(f)}
    assert not eval_prompts & {m["prompt"] for m in metas}, "train prompts must not contain eval prompts"
    rng = np.random.default_rng([a.seed, 1])  # the LM's data does not depend on how the vision parts were made
    train_lm(umm, metas, caption_space(), rng, a.steps, a.batch, a.t2i_frac, a.lr, a.rank_weight)
    umm.save_pretrained(a.out)
    with open(os.path.join(a.out, "train_args.json"), "w") as f:
        json.dump(vars(a), f, indent=1)
    log(f"saved {a.out}")


# --- measuring a base -------------------------------------------------------------------
@torch.no_grad()
def understand(a):
    """Held-out renders of scenes for EVAL lines; per attribute, is the true caption's intrinsic
    reward above every oracle-false one-attribute distractor's? Reported per attribute and per
    (eval file, tag) (a tag's rate pools its images' attribute comparisons)."""
    import gvu
    torch.set_num_threads(a.threads)
    umm = TinyUMM.from_pretrained(a.model)
    if a.adapter:  # a GvU-trained LoRA: does understanding survive the RL?
        from peft import PeftModel
        PeftModel.from_pretrained(umm.lm, a.adapter)
    umm.lm.eval()
    rng = np.random.default_rng(a.seed)
    metas = [(os.path.basename(f).split(".")[0], m) for f in EVAL_FILES for m in read_jsonl(f)]
    hits, by_tag = {}, {}
    for i in range(a.n):
        name, meta = metas[i % len(metas)] if a.n >= len(metas) else metas[int(rng.integers(len(metas)))]
        image = shapes.render(shapes.sample_scene(meta, rng), jitter=1, rng=rng)
        bad = false_distractors(image, meta, rng)
        prompts = [meta["prompt"]] + [p for ps in bad.values() for p in ps]
        logp, mask = gvu.prompt_token_logprobs(umm, [image] * len(prompts), prompts, INSTRUCTION)
        r = gvu.intrinsic_reward(logp, mask).tolist()
        k = 1
        for attr, ps in bad.items():
            hit = r[0] > max(r[k:k + len(ps)])
            hits.setdefault(attr, []).append(hit)
            by_tag.setdefault(f"{name}/{meta['tag']}", []).append(hit)
            k += len(ps)
    for tag, h in sorted(by_tag.items()):
        print(f"understanding {tag:40s} {np.mean(h):.3f}  (n={len(h)})")
    for attr, h in hits.items():
        print(f"understanding {attr:9s} {np.mean(h):.3f}  (n={len(h)})")
    print(f"understanding overall   {np.mean([np.mean(h) for h in hits.values()]):.3f}  (mean of attributes)")
    return hits


@torch.no_grad()
def gen_eval(a):
    """gvu.rollout (temperature 1) for every eval prompt, decode, score with the pixel oracle.
    Prints per-tag accuracy of each eval file and its overall = the unweighted mean of its tag means."""
    import gvu
    torch.set_num_threads(a.threads)
    umm = TinyUMM.from_pretrained(a.model)
    umm.lm.eval()
    g = torch.Generator().manual_seed(a.seed)
    results = {}
    for f in EVAL_FILES:
        name, metas = os.path.basename(f).split(".")[0], read_jsonl(f)
        for s in range(0, len(metas), 32):
            chunk = metas[s:s + 32]
            codes = gvu.rollout(umm, [m["prompt"] for m in chunk], a.n_per_prompt, temperature=1.0, generator=g)["codes"]
            images = umm.decode_images(codes, g)
            for j, im in enumerate(images):
                m = chunk[j // a.n_per_prompt]
                results.setdefault(name, {}).setdefault(m["tag"], []).append(shapes.oracle(im, m)[0])
        for tag, r in results[name].items():
            print(f"gen {name}/{tag:24s} {np.mean(r):.3f}  (n={len(r)})")
        print(f"gen {name} overall (mean of tags)   {np.mean([np.mean(r) for r in results[name].values()]):.3f}", flush=True)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("random", help="save a randomly initialised tiny UMM")
    r.add_argument("--out", required=True, help="folder to write")
    r.add_argument("--seed", type=int, default=0, help="init seed")
    t = sub.add_parser("train", help="train tokenizer, decoder and LM in the shapes world")
    t.add_argument("--out", required=True, help="folder to write")
    t.add_argument("--seed", type=int, default=0, help="seeds init, data and every random choice")
    t.add_argument("--t2i-frac", type=float, default=0.1, help="share of T2I sequences per LM batch (0.1: 6 of 64)")
    t.add_argument("--steps", type=int, default=1500, help="LM steps")
    t.add_argument("--batch", type=int, default=64, help="LM sequences per step (+ distractors)")
    t.add_argument("--lr", type=float, default=2e-3, help="LM peak learning rate (one-cycle)")
    t.add_argument("--rank-weight", type=float, default=1.0, help="weight of the caption-vs-distractor ranking loss")
    t.add_argument("--tok-steps", type=int, default=300, help="image tokenizer steps")
    t.add_argument("--dec-steps", type=int, default=200, help="diffusion decoder steps")
    t.add_argument("--vision-from", default="", help="reuse the tokenizer + decoder of this tiny UMM folder")
    t.add_argument("--prompts", default="prompts/train.jsonl", help="train metadata lines")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--num-codes", type=int, default=192, help="image codes (>= the 161 cell kinds)")
    t.add_argument("--threads", type=int, default=2)
    u = sub.add_parser("understand", help="caption-vs-distractor accuracy per attribute on eval lines")
    u.add_argument("--model", required=True)
    u.add_argument("--adapter", default="", help="a LoRA adapter folder written by gvu.py")
    u.add_argument("--n", type=int, default=300, help="held-out scenes")
    u.add_argument("--seed", type=int, default=1234)
    u.add_argument("--threads", type=int, default=2)
    ge = sub.add_parser("gen-eval", help="per-tag oracle accuracy of sampled generations on eval prompts")
    ge.add_argument("--model", required=True)
    ge.add_argument("--n-per-prompt", type=int, default=4)
    ge.add_argument("--seed", type=int, default=1234)
    ge.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.cmd == "random":
        TinyUMM.random(a.seed).save_pretrained(a.out)
        print(f"saved a random tiny UMM to {a.out}")
    elif a.cmd == "train":
        train(a)
    elif a.cmd == "understand":
        understand(a)
    elif a.cmd == "gen-eval":
        gen_eval(a)
