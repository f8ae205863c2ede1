"""The tests' stand-ins, each written once: the prompts they spell, tiny models built in-process (a
random Janus-Pro, a toy of X-Omni's remote code written into a folder), the slow per-token loops
they are checked against, and the small helpers the test files share. Plain functions and constants;
the pytest fixtures that build from them are in conftest.py. Nothing here downloads anything."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusProcessor,
    PreTrainedTokenizerFast,
)

import eval_geneval
import gvu
from models.adapters import ASSISTANT, PAD_TOKEN, USER, JanusPro, XOmni, janus_image_processor_class
from world import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SHIPPED = os.path.join(ROOT, "checkpoints", "tiny-umm")  # the shipped tiny UMM
INSTRUCTION = "Describe the image in detail."  # gvu's default understanding instruction
# every stand-in (tiny UMM, Janus-Pro, X-Omni) spells these
PROMPTS = ["a red circle", "two blue squares left of a green triangle", "a large yellow square"]
# shapes-world lines in GenEval's phrasing, for runs of the tiny UMM
TINY_PROMPTS = [
    "a photo of a red circle",
    "a photo of two squares",
    "a photo of a blue triangle",
    "a photo of a circle",
    "a photo of a blue triangle left of a large circle",
]
needs_janus = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5"),
    reason="the Janus adapter targets transformers >= 5 (4.x is X-Omni's stack)",
)


# ==================================================================================================
# helpers
def run_main(*argv, **kw):
    """gvu.main in-process on these flags (any value, str()-ed); the SystemExit message, or None if
    it finished. kw go to gvu.main (reward_fn)."""
    try:
        gvu.main([str(a) for a in argv], **kw)
    except SystemExit as e:
        return e.code
    return None


def eval_error(argv):
    """eval_geneval's CLI in-process, expected to fail: its one-line 'error: ...' message."""
    with pytest.raises(SystemExit) as exc:
        eval_geneval.main([str(a) for a in argv])
    msg = exc.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def write(path, data):
    """Write str (UTF-8) or bytes to path; returns the path as a str."""
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def write_lines(path, rows):
    """One row per line: dicts as JSON, strings as they are (a prompt file, a metadata file)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def log_rows(out, *drop):
    """A run's log.jsonl rows, without the keys in `drop`."""
    return [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(out / "log.jsonl")]


def meta(tag, include, exclude=None, prompt="p"):
    """A hand-made GenEval metadata dict."""
    m = {"tag": tag, "include": include, "prompt": prompt}
    return m | ({"exclude": exclude} if exclude else {})


def images_for(umm, n, seed=0):
    """n images decoded from random codes (one generator for the codes and the decoder's noise)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, umm.image_vocab_size, (n, umm.grid[0] * umm.grid[1]), generator=g)
    return umm.decode_images(codes, g)


def rendered(n, seed=0):
    """n shapes-world renders of training lines, and their prompts (what the shipped tiny UMM
    learnt to read)."""
    metas = read_jsonl(os.path.join(ROOT, "prompts", "train.jsonl"))[:n]
    rng = np.random.default_rng(seed)
    return [shapes.render(shapes.sample_scene(m, rng)) for m in metas], [m["prompt"] for m in metas]


def context_ids(umm, texts):
    return umm.tokenizer(texts, add_special_tokens=False).input_ids


def per_image_context_ids(umm, images):
    """The per-image path: one caption_prompt (one image-tokenizer call) per image."""
    return context_ids(umm, [umm.caption_prompt(im, INSTRUCTION) for im in images])


def geometric_means(token_logprobs):
    """Per-token log-probs (a list of (L_i,) tensors) -> (rewards (N,) fp64, lengths)."""
    rewards = torch.stack([lp.mean().exp() for lp in token_logprobs])
    return rewards, [len(lp) for lp in token_logprobs]


def tiny_token_logprobs(umm, images, prompts):
    """Reference for the tiny UMM (and bench's X-Omni-shaped one), the official code's loop: per
    image, one full uncached forward per answer token (+ end of turn), log-softmax over the text
    rows."""
    tok, out = umm.tokenizer, []
    for image, prompt in zip(images, prompts):
        ctx = tok(umm.caption_prompt(image, INSTRUCTION), add_special_tokens=False).input_ids
        ans = tok(prompt + umm.answer_suffix, add_special_tokens=False).input_ids
        logits = [
            umm.lm(input_ids=torch.tensor([ctx + ans[:j]])).logits[0, -1, : umm.image_offset]
            for j in range(len(ans))
        ]
        out.append(torch.stack([F.log_softmax(x.double(), -1)[a] for x, a in zip(logits, ans)]))
    return out


# ==================================================================================================
# Janus-Pro: a tiny random JanusForConditionalGeneration (a 2-layer Llama, a 1-layer SigLIP on
# 32 px, a 64-code VQ-VAE on a 4 x 4 grid, a byte-level BPE tokenizer with Janus's special tokens)
# and its JanusProcessor.
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
HIDDEN, CODES, PX = 64, 64, 32


def janus_tokenizer():
    """Byte-level BPE (as DeepSeek's) with Janus's special tokens, trained on the prompts and the
    instruction, BOS added by the post-processor. Only the model has a real vocabulary's rows;
    prompts tokenise into more pieces than with DeepSeek's BPE."""
    image_tokens = dict(
        image_token="<image_placeholder>", boi_token="<begin_of_image>", eoi_token="<end_of_image>"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        PROMPTS + [INSTRUCTION, "a photo of one circle and one square"],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=[BOS, EOS, PAD_TOKEN, USER, ASSISTANT, *image_tokens.values()],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD_TOKEN,
        extra_special_tokens=image_tokens,
    )


def build_janus(seed=0):
    """A tiny random JanusForConditionalGeneration (~0.5M params) and its JanusProcessor."""
    tok = janus_tokenizer()
    n_img = (PX // 8) ** 2
    # as the converted Janus-Pro processors
    processor = JanusProcessor(
        janus_image_processor_class()(
            size={"height": PX, "width": PX}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tok,
        num_image_tokens=n_img,
        use_default_system_prompt=True,
    )
    cfg = JanusConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok) + 5,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=PX,
            patch_size=8,
            mlp_ratio=2.0,
            projection_dim=HIDDEN,
            num_image_tokens=n_img,
        ),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=CODES,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 1, 1, 1],
            num_res_blocks=1,
            projection_dim=HIDDEN,
            image_token_embed_dim=HIDDEN,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"),
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    gc = model.generation_config  # as convert_janus_weights_to_hf.py sets it
    gc.temperature, gc.guidance_scale, gc.bos_token_id = 1.0, 5.0, tok.bos_token_id
    gc.pad_token_id = tok.convert_tokens_to_ids(PAD_TOKEN)
    gc.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")}
    return JanusPro(model, processor), processor


def janus_token_logprobs(umm, processor, images, prompts):
    """Reference: Janus's own processor (text + pixel_values) and forward, one image at a time, one
    full uncached forward per prompt token, the conversation tokenised as one string."""
    out = []
    for im, p in zip(images, prompts):
        head = f"{USER}: <image_placeholder>\n{INSTRUCTION}\n\n{ASSISTANT}:"
        ctx = processor(text=head, images=[im]).input_ids[0]
        enc = processor(text=f"{head} {p}{EOS}", images=[im])
        ids = enc.input_ids[0]
        assert ids[: len(ctx)].tolist() == ctx.tolist()
        logits = [
            umm.lm(input_ids=ids[None, :t], pixel_values=enc.pixel_values).logits[0, -1]
            for t in range(len(ctx), len(ids))
        ]
        out.append(
            torch.stack([F.log_softmax(x.double(), -1)[t] for x, t in zip(logits, ids[len(ctx) :])])
        )
    return out


# ==================================================================================================
# X-Omni: adapters.XOmni on a tiny stand-in for X-Omni/X-Omni-En's remote code, written into a
# folder and loaded through the real AutoModelForCausalLM.from_pretrained(...,
# trust_remote_code=True) path (no downloads). The stand-in keeps the remote code's names, id layout
# and call signatures (XOmniConfig, XOmniForCausalLM with XOmniModel's [hidden | image mask] stream,
# lm/mm embeddings, norms and heads, init_vision, set_generation_mode, tokenize_image, mmdecode,
# detokenize_image, image_tokenizer.decode, decoder_pipe(latents, [text], ...)) at toy sizes. Runs
# on transformers 5.x and on X-Omni's 4.52.4.
XOMNI_CONFIG_PY = '''
from transformers import Qwen2Config


class XOmniConfig(Qwen2Config):
    """X-Omni's config fields over Qwen2's (vision_config rides along in kwargs, as in the real
    checkpoint)."""
    model_type = "x-omni"

    def __init__(self, num_mm_adap_layers=4, num_mm_head_layers=4, mm_vocab_size=16448,
                 image_vocab_size=16384, mm_special_tokens=("<SOM>", "<EOM>", "<IMAGE>"), **kwargs):
        super().__init__(**kwargs)
        self.num_mm_adap_layers, self.num_mm_head_layers = num_mm_adap_layers, num_mm_head_layers
        self.mm_vocab_size, self.image_vocab_size = mm_vocab_size, image_vocab_size
        self.mm_special_tokens = mm_special_tokens
'''

XOMNI_MODELING_PY = r'''
"""A toy stand-in for X-Omni's modeling_xomni.py (+ its SigLIP-VQ tokenizer and FLUX-based
decoder), for tests."""
import os
import re
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from PIL import Image
from transformers import Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import (Qwen2DecoderLayer, Qwen2Model,
                                                      Qwen2PreTrainedModel, Qwen2RMSNorm,
                                                      Qwen2RotaryEmbedding)

from .configuration_xomni import XOmniConfig


# --- the SigLIP-VQ image tokenizer (modeling_siglip_tokenizer.py's names) ----------------------
def create_anyres_preprocess(short_size, long_size, patch_size, min_short_size, max_aspect_ratio,
                             **_):
    """PIL -> (3, H, W) in [-1, 1], sides multiples of patch_size between short_size and
    long_size; None if too small."""
    def transform(image):
        image = image.convert("RGB")
        w, h = image.size
        if min(w, h) < min_short_size or max(w, h) / min(w, h) > max_aspect_ratio:
            return None
        s = max(1.0, short_size / min(w, h))
        s = min(s, long_size / max(w, h)) if max(w, h) * s > long_size else s
        size = [max(patch_size, round(x * s / patch_size) * patch_size) for x in (w, h)]
        arr = np.asarray(image.resize(size, Image.BICUBIC), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(arr).permute(2, 0, 1)
    return transform


class TinyViT(nn.Module):
    """Stands in for the SigLIP ViT: one feature per 16 x 16 patch, and the patch grid."""
    def __init__(self, width, patch=16):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)

    def forward(self, x):
        f = self.proj(x)
        return f.flatten(2).transpose(1, 2), tuple(f.shape[-2:]), None


class TinyVQProjector(nn.Module):
    """Stands in for VQConvProjector: nearest L2-normalised code (IBQ's eval path); decode via
    the raw codebook."""
    def __init__(self, z_channels, codebook_size, codebook_dim):
        super().__init__()
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)

    def encode(self, x, h, w):  # (B, h*w, C) -> (B, h, w)
        z = self.quant_conv(x.transpose(1, 2).reshape(len(x), -1, h, w)).permute(0, 2, 3, 1)
        z = F.normalize(z.reshape(1, -1, z.shape[-1]), dim=-1)
        codebook = F.normalize(self.embedding.weight, dim=-1)
        return torch.cdist(z, codebook[None])[0].argmin(-1).view(len(x), h, w)

    def decode(self, tokens, bhwc):  # (B*h*w,) -> (B, C, h, w)
        return self.post_quant_conv(self.embedding(tokens).view(bhwc).permute(0, 3, 1, 2))


class SiglipTokenizer(nn.Module):
    def __init__(self, siglip_name, siglip_path, projector_path, z_channels, codebook_size,
                 codebook_dim, with_norm=True):
        super().__init__()
        self.vit = TinyViT(z_channels)
        self.vqproj = TinyVQProjector(z_channels, codebook_size, codebook_dim)
        load = lambda path: torch.load(path, map_location="cpu", weights_only=True)
        self.vit.load_state_dict(load(siglip_path))
        self.vqproj.load_state_dict(load(projector_path))

    def encode(self, x):
        features, (h, w), _ = self.vit(x)
        return self.vqproj.encode(features, h, w)

    def decode(self, tokens, bhwc):
        return self.vqproj.decode(tokens, bhwc)


# --- the FLUX-based decoder (modeling_siglip_flux.py's names; FLUX.1-dev's component names) ----
class FluxTransformer2DModelWithSigLIP(ModelMixin, ConfigMixin):
    """Stands in for the decoder transformer: velocity from noisy pixels, SigLIP features per
    16 px cell, text."""
    @register_to_config
    def __init__(self, siglip_channels=8, text_dim=8, hidden=8, cell=16):
        super().__init__()
        self.siglip_in, self.text_in, self.pooled_in = (
            nn.Linear(d, hidden) for d in (siglip_channels, text_dim, text_dim))
        self.time_in = nn.Linear(1, hidden)
        self.out = nn.Conv2d(3 + hidden, 3, 3, padding=1)

    def forward(self, x, t, siglip, text, pooled):
        n, _, H, W = x.shape
        c = self.config.cell
        glob = self.text_in(text).mean(1) + self.pooled_in(pooled)
        glob = glob + self.time_in(x.new_full((n, 1), t))
        cond = (self.siglip_in(siglip) + glob[:, None]).transpose(1, 2)
        cond = cond.reshape(n, -1, H // c, W // c)
        return self.out(torch.cat([x, F.interpolate(cond, scale_factor=c)], 1))


class TinyTextEncoder(ModelMixin, ConfigMixin):
    """Stands in for FLUX's CLIP (pooled: one vector per prompt) and T5 (one vector per token)
    encoders."""
    @register_to_config
    def __init__(self, dim=8, pooled=False):
        super().__init__()
        self.embed = nn.Embedding(256, dim)

    def forward(self, ids):
        e = self.embed(ids)
        return e.mean(1) if self.config.pooled else e


class ByteTokenizer:
    def __init__(self, length):
        self.length = length

    def __call__(self, texts):
        n = self.length
        return torch.tensor([(list(t.encode())[:n] + [0] * n)[:n] for t in texts])


class FluxPipelineWithSigLIP:
    """Stands in for the FluxPipeline subclass: its components, encode_prompt, and
    __call__(siglip latents, prompt, ...) with true CFG against the negative prompt; noise from
    `generator` (the global RNG when None)."""
    def __init__(self, transformer, text_encoder, text_encoder_2):
        self.transformer = transformer
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = ByteTokenizer(4), ByteTokenizer(6)

    @classmethod
    def from_pretrained(cls, path, transformer, torch_dtype=None):
        load = lambda sub: TinyTextEncoder.from_pretrained(os.path.join(path, sub),
                                                           torch_dtype=torch_dtype)
        return cls(transformer, load("text_encoder"), load("text_encoder_2"))

    def set_progress_bar_config(self, **kwargs):
        pass

    def to(self, device):
        for m in (self.transformer, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device)
        return self

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt=1,
                      prompt_embeds=None, pooled_prompt_embeds=None, max_sequence_length=6,
                      lora_scale=None):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        if pooled_prompt_embeds is None:
            pooled_prompt_embeds = self.text_encoder(self.tokenizer(prompt).to(device))
        if prompt_embeds is None:
            prompt_embeds = self.text_encoder_2(self.tokenizer_2(prompt_2 or prompt).to(device))
        return prompt_embeds, pooled_prompt_embeds, torch.zeros(prompt_embeds.shape[1], 3)

    @torch.no_grad()
    def __call__(self, siglip_latents, prompt=None, negative_prompt=None, height=None, width=None,
                 num_inference_steps=3, guidance_scale=1.0, true_cfg_scale=1.0,
                 true_cfg_scale_2=1.0, generator=None, prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil"):
        n, device = len(siglip_latents), self.transformer.device
        text = self.encode_prompt(prompt, None, device, 1, prompt_embeds, pooled_prompt_embeds)[:2]
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        cfg = true_cfg_scale > 1 and has_negative
        if cfg:
            neg = self.encode_prompt(negative_prompt, None, device, 1, negative_prompt_embeds,
                                     negative_pooled_prompt_embeds)[:2]
        x = torch.randn((n, 3, height, width), generator=generator)
        x = x.to(device, self.transformer.dtype)
        for i in range(num_inference_steps):
            t = 1 - i / num_inference_steps
            v = self.transformer(x, t, siglip_latents, *text)
            if cfg:
                v_neg = self.transformer(x, t, siglip_latents, *neg)
                v = v_neg + true_cfg_scale * (v - v_neg)
            x = x - v / num_inference_steps
        arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte()
        arr = arr.permute(0, 2, 3, 1).cpu().numpy()
        return SimpleNamespace(images=[Image.fromarray(a) for a in arr])


# --- the LM (modeling_xomni.py's names) ---------------------------------------------------------
class XOmniDecoderLayer(Qwen2DecoderLayer):
    """Carries [hidden | image-token mask]; the first num_mm_adap_layers and last
    num_mm_head_layers update image positions only. Returns what the Qwen2 layer returns (a tuple
    in transformers 4.x, a tensor in 5.x)."""
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        last_lm_layer = config.num_hidden_layers - config.num_mm_head_layers
        self.is_lm_layer = config.num_mm_adap_layers <= layer_idx < last_lm_layer

    def forward(self, hidden_states, **kwargs):
        h, mask = hidden_states.chunk(2, -1)
        out = super().forward(h, **kwargs)
        new = out[0] if isinstance(out, tuple) else out
        if not self.is_lm_layer:
            new = torch.where(mask.bool(), new, h)
        new = torch.cat([new, mask], -1)
        return (new, *out[1:]) if isinstance(out, tuple) else new


class XOmniModel(Qwen2Model, Qwen2PreTrainedModel):
    model_type, config_class = "x-omni", XOmniConfig

    def __init__(self, config):
        Qwen2PreTrainedModel.__init__(self, config)  # as X-Omni's: Qwen2Model.__init__ is skipped
        self.vocab_size = config.vocab_size
        self.lm_embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mm_embed_tokens = nn.Embedding(config.mm_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [XOmniDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.lm_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mm_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.lm_embed_tokens

    def embed_tokens(self, input_ids):
        """ids >= vocab_size are image tokens: their own table, and the mask channel."""
        is_mm = input_ids >= self.config.vocab_size
        mm = self.mm_embed_tokens((input_ids - self.config.vocab_size).clamp(min=0))
        x = torch.where(is_mm[..., None], mm, self.lm_embed_tokens(input_ids.masked_fill(is_mm, 0)))
        return torch.cat([x, is_mm[..., None].to(x.dtype).expand_as(x)], -1)

    def norm(self, hidden_states):
        h, mask = hidden_states.chunk(2, -1)
        return torch.where(mask.bool(), self.mm_norm(h), self.lm_norm(h))


class XOmniForCausalLM(Qwen2ForCausalLM):
    model_type, config_class = "x-omni", XOmniConfig
    _keys_to_ignore_on_load_missing = [r"image_tokenizer\."]

    def __init__(self, config):
        super().__init__(config)
        self.model = XOmniModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mm_head = nn.Linear(config.hidden_size, config.mm_vocab_size, bias=False)
        self.generation_mode = "text"
        self.post_init()

    @property
    def device(self):
        return next(iter(self.parameters())).device

    def init_vision(self, flux_pipe_path, **kwargs):
        self.som_token, self.eom_token, self.img_token = self.config.mm_special_tokens[:3]
        vc = SimpleNamespace(**self.config.vision_config)
        self.vision_config, self.transform_config = vc, SimpleNamespace(**vc.transform)
        self.encoder_config = SimpleNamespace(**vc.encoder)
        self.decoder_config = SimpleNamespace(**vc.decoder)
        self.vision_dtype = getattr(torch, vc.dtype)
        self.image_transform = create_anyres_preprocess(**vc.transform)
        for key in ("siglip_path", "projector_path"):
            path = os.path.join(self.name_or_path, getattr(self.encoder_config, key))
            setattr(self.encoder_config, key, path)
        self.image_tokenizer = SiglipTokenizer(**vars(self.encoder_config))
        self.image_tokenizer.to(self.device, self.vision_dtype)
        transformer = FluxTransformer2DModelWithSigLIP.from_pretrained(
            self.name_or_path, siglip_channels=self.encoder_config.z_channels,
            torch_dtype=self.vision_dtype, subfolder=self.decoder_config.model_path, **kwargs)
        self.decoder_pipe = FluxPipelineWithSigLIP.from_pretrained(
            flux_pipe_path, transformer=transformer, torch_dtype=self.vision_dtype)
        self.decoder_pipe.set_progress_bar_config(disable=True)

    def set_generation_mode(self, mode):
        assert mode in ("text", "image"), mode
        self.generation_mode = mode

    def mmdecode(self, tokenizer, token_ids, force_text=None, **kwargs):
        ids = torch.as_tensor(token_ids).reshape(-1).tolist()
        doc = tokenizer.decode(ids, **kwargs).replace(tokenizer.pad_token, "").replace("<SEP>", "")
        texts, images = [], []
        for chunk in doc.split(self.eom_token):
            text, _, image_str = chunk.partition(self.som_token)
            texts.append(text)
            if self.img_token in image_str:
                meta, codes = image_str.split(self.img_token)
                H, W = map(int, meta.split(" "))
                codes = [int(k) for k in re.findall(r"<MM-Token-(\d+)>", codes)][:H * W]
                images.append(self.detokenize_image(texts, images, codes, (H, W)))
        return texts, images

    @torch.no_grad()
    def tokenize_image(self, image):
        x = self.image_transform(image)
        assert x is not None, "image too small or too elongated"
        codes = self.image_tokenizer.encode(x[None].to(self.device, self.vision_dtype))
        _, H, W = codes.shape
        body = "".join(f"<MM-Token-{k}>" for k in codes.reshape(-1).tolist())
        return f"{self.som_token}{H} {W}{self.img_token}{body}{self.eom_token}"

    @torch.no_grad()
    def detokenize_image(self, texts, images, token_ids, shape):
        assert len(texts) == 1 and len(images) == 0, "one image per sample"
        H, W = shape
        tokens = torch.tensor(token_ids, device=self.device)
        latents = self.image_tokenizer.decode(tokens, (1, H, W, self.encoder_config.codebook_dim))
        latents = latents.reshape(*latents.shape[:2], -1).transpose(1, 2).contiguous()
        dc, up = self.decoder_config, self.decoder_config.upscale_factor
        return self.decoder_pipe(latents, [texts[0]], negative_prompt=[""], height=H * up,
                                 width=W * up, num_inference_steps=dc.num_inference_steps,
                                 guidance_scale=1.0, true_cfg_scale=dc.cfg_scale,
                                 true_cfg_scale_2=dc.cfg_scale_2).images[0]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, num_logits_to_keep=0, **kwargs):
        """Every id's logit, fp32: the current mode's head, the other mode's rows at the dtype's
        minimum."""
        self.model.has_sliding_layers = False
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, inputs_embeds=inputs_embeds)
        hidden = hidden.last_hidden_state[:, -num_logits_to_keep:]
        V, K = self.config.vocab_size, self.config.image_vocab_size
        logits = hidden.new_full((*hidden.shape[:-1], V + self.config.mm_vocab_size),
                                 torch.finfo(hidden.dtype).min)
        if self.generation_mode == "text":
            logits[..., :V] = self.lm_head(hidden)
        else:
            logits[..., V:V + K] = self.mm_head(hidden)[..., :K]
        return CausalLMOutputWithPast(logits=logits.float())
'''

XO_PX, XO_CODES, XO_GRID = 48, 32, 3  # 48 px images: 3 x 3 codes of 16 px, 32 image codes
XO_PREFIX = "<SOM>3 3<IMAGE>"  # generate.py's f'<SOM>{token_h} {token_w}<IMAGE>', spelled out
# Qwen2.5's
XO_CHAT = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_xomni_tokenizer():
    """Byte-level BPE with Qwen's chat tokens and X-Omni's <SOM> <EOM> <IMAGE>; then <MM-Token-k> at
    vocab_size + k. Returns (tokenizer, vocab_size)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = PROMPTS + [INSTRUCTION, "You are a helpful assistant. system user assistant"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=[
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<SOM>",
                "<EOM>",
                "<IMAGE>",
            ],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    vocab_size = tok.get_vocab_size()
    tok.add_special_tokens([f"<MM-Token-{k}>" for k in range(XO_CODES)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=XO_CHAT,
    )
    return fast, vocab_size


def write_xomni(root):
    """Write the stand-in under root: (model folder, FLUX folder), with its code, config (with
    auto_map) and tokenizer, and random weights saved by its own classes."""
    xdir, fdir = root / "xomni_tiny", root / "flux_tiny"
    xdir.mkdir()
    (xdir / "configuration_xomni.py").write_text(XOMNI_CONFIG_PY)
    (xdir / "modeling_xomni.py").write_text(XOMNI_MODELING_PY)
    tok, vocab_size = build_xomni_tokenizer()
    tok.save_pretrained(xdir)
    vision = dict(
        dtype="float32",
        transform=dict(
            short_size=XO_PX,
            long_size=2 * XO_PX,
            patch_size=16,
            min_short_size=16,
            max_aspect_ratio=3.0,
        ),
        encoder=dict(
            siglip_name="tiny",
            siglip_path="vision/siglip.pt",
            projector_path="vision/projector.pt",
            z_channels=8,
            codebook_size=XO_CODES,
            codebook_dim=8,
            with_norm=True,
        ),
        decoder=dict(
            model_path="decoder",
            upscale_factor=16,
            num_inference_steps=3,
            cfg_scale=2.0,
            cfg_scale_2=1.0,
        ),
    )
    config_json = dict(
        model_type="x-omni",
        architectures=["XOmniForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_xomni.XOmniConfig",
            "AutoModelForCausalLM": "modeling_xomni.XOmniForCausalLM",
        },
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        num_mm_adap_layers=1,
        num_mm_head_layers=1,
        mm_vocab_size=XO_CODES + 4,
        image_vocab_size=XO_CODES,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        vision_config=vision,
    )
    (xdir / "config.json").write_text(json.dumps(config_json))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(xdir, trust_remote_code=True), trust_remote_code=True
    )
    model.save_pretrained(xdir)
    mod = sys.modules[type(model).__module__]  # the stand-in's own classes make its vision weights
    (xdir / "vision").mkdir()
    torch.save(mod.TinyViT(8).state_dict(), xdir / "vision" / "siglip.pt")
    torch.save(mod.TinyVQProjector(8, XO_CODES, 8).state_dict(), xdir / "vision" / "projector.pt")
    mod.FluxTransformer2DModelWithSigLIP(siglip_channels=8).save_pretrained(xdir / "decoder")
    for sub, pooled in (("text_encoder", True), ("text_encoder_2", False)):  # CLIP and T5 slots
        mod.TinyTextEncoder(pooled=pooled).save_pretrained(fdir / sub)
    return str(xdir), str(fdir)


def load_xomni(dirs, **kw):
    """adapters.XOmni on the stand-in's folders (48 px, decoding two images at a time)."""
    return XOmni.from_pretrained(
        *dirs, trust_remote_code=True, image_size=XO_PX, decode_batch=2, **kw
    )


def xomni_token_logprobs(model, tok, images, prompts):
    """Reference: chat.py's context (tokenize_image + chat template) scored one token at a time by
    the stand-in's own full forward: log-softmax over its whole row (in text mode every image row is
    at the dtype minimum)."""
    model.set_generation_mode("text")
    end, out = tok.convert_tokens_to_ids("<|im_end|>"), []
    for im, p in zip(images, prompts):
        user = [{"role": "user", "content": model.tokenize_image(im) + "\n" + INSTRUCTION}]
        ctx = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=False)
        ids = tok.apply_chat_template(
            user + [{"role": "assistant", "content": p}], return_dict=False
        )
        assert ids[: len(ctx)] == ctx
        stop = ids.index(end, len(ctx))  # the answer, then its end of turn
        logits = [
            model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
            for t in range(len(ctx), stop + 1)
        ]
        out.append(
            torch.stack([F.log_softmax(x.double(), -1)[t] for x, t in zip(logits, ids[len(ctx) :])])
        )
    return out
