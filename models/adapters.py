"""
Adapters: real unified multimodal models behind the small interface that gvu.py drives (gvu.UMM;
TinyUMM is its reference implementation), and `load_umm`, which picks the class for --model and
keeps the trust-remote-code policy: X-Omni's code runs only when asked for.

JanusPro wraps transformers' native `JanusForConditionalGeneration`
(deepseek-community/Janus-Pro-1B, -7B). Janus keeps generation and understanding apart around one
Llama:

    T2I:  "<|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>" -> Llama -> generation_head
              -> VQ code k
          code k -> generation_embeddings -> generation_aligner -> next Llama input
              (24 x 24 codes)
          codes -> VQ-VAE decoder -> 384 px image
    I2T:  image -> SigLIP normalisation -> vision_model -> aligner -> the 576 <image_placeholder>
              slots -> Llama -> lm_head -> text

gvu.py sees one id space: text ids [0, V) from the tokenizer, and image code k as id
`image_offset + k` with `image_offset = V` (the text vocabulary size; such ids never reach the text
embedding table). `hidden_states` routes each id to its embedding path; `logits` reads the
generation head in image mode and the text head in text mode.

CFG: Janus samples with classifier-free guidance 5 (its own `generate` and the official code; pass
`--cfg-scale 5`). Its unconditional branch is the conditional prompt with every token between BOS
and <begin_of_image> replaced by the pad token, same length, all attended (`uncond_prompt`). gvu
samples from the guided distribution but computes the ratio and the KL with the conditional policy
only (T2I-R1's convention), so CFG only shapes which codes are sampled.

    umm = JanusPro.from_pretrained("deepseek-community/Janus-Pro-1B", device="cuda")

XOmni wraps X-Omni's own remote code (X-Omni/X-Omni-En on the hub: configuration_xomni.py,
modeling_xomni.py, modeling_siglip_tokenizer.py, modeling_siglip_flux.py), loaded with
trust_remote_code. One Qwen2.5-7B with two embedding tables and two heads; the image codes are
ordinary ids `config.vocab_size + k`, printed <MM-Token-k>:

    T2I:  "{prompt}<SOM>{h} {w}<IMAGE>" -> LM -> mm_head rows [0, K) -> code k
              -> id vocab_size + k -> next input
          codes -> SigLIP-VQ codebook -> FLUX.1-dev-based decoder (FluxPipelineWithSigLIP)
              -> h*16 x w*16 px
    I2T:  image -> tokenize_image: "<SOM>{H} {W}<IMAGE><MM-Token-k>...<EOM>"
              -> Qwen chat template -> lm_head

    umm = XOmni.from_pretrained(
        "X-Omni/X-Omni-En", flux="black-forest-labs/FLUX.1-dev", trust_remote_code=True,
        device="cuda"
    )
"""

import inspect
import json
import os
import re

import torch
import torch.nn.functional as F
from PIL import Image

from models.tiny_umm import TinyUMM

# Janus's "deepseek" chat roles (sep "\n\n", sep2 EOS)
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
PAD_TOKEN = "<｜▁pad▁｜>"  # Janus's pad token, used when a tokenizer names none
# the adapter reads get_image_features(...).pooler_output: transformers 5's return type
JANUS_TRANSFORMERS = "5"


def require_transformers(version, who):
    """Refuse, in one line, a transformers older than `version` (before any weights load)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(version):
        raise InputError(
            f"{who} needs transformers >= {version}; "
            f"this environment has {transformers.__version__}"
        )


def janus_image_processor_class():
    """Janus's image processor without torchvision: its own module in transformers 5, the plain
    class in 4.x."""
    try:
        from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

        return JanusImageProcessorPil
    except ImportError:
        from transformers import JanusImageProcessor

        return JanusImageProcessor


def is_model_type(name_or_path, model_type):
    """A folder whose config.json says `model_type` (read as JSON: no code runs), or a hub id
    that names it."""
    cfg = os.path.join(name_or_path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return json.load(f).get("model_type") == model_type
    return not os.path.exists(name_or_path) and model_type in name_or_path.lower()


class ImagesRequired(ValueError):
    """hidden_states saw <image_placeholder> tokens but was given no images to fill them with."""


class JanusPro:
    """gvu's UMM API over `JanusForConditionalGeneration` + its tokenizer and image processor."""

    # LoRA on the LM's linear layers only: the SigLIP tower also has q_proj/k_proj/v_proj
    lora_targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

    def __init__(
        self,
        model,
        processor_or_tokenizer,
        image_processor=None,
        system_prompt=None,
        decode_batch=16,
    ):
        """model: JanusForConditionalGeneration. processor_or_tokenizer: a JanusProcessor (its
        tokenizer and image processor are used) or a tokenizer, then `image_processor` (default:
        Janus's SigLIP normalisation, mean = std = 0.5, at the vision tower's size). system_prompt:
        text before the understanding turn, verbatim; None = the processor's choice (the converted
        Janus-Pro processors set use_default_system_prompt, as the official VLChatProcessor does for
        understanding), else ""."""
        require_transformers(JANUS_TRANSFORMERS, "the Janus-Pro adapter")
        proc = processor_or_tokenizer
        if hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
            tokenizer, image_processor = proc.tokenizer, image_processor or proc.image_processor
        else:
            tokenizer = proc
        vcfg = model.config.vision_config
        if image_processor is None:
            image_processor = janus_image_processor_class()(
                size={"height": vcfg.image_size, "width": vcfg.image_size},
                image_mean=[0.5] * 3,
                image_std=[0.5] * 3,
            )
        self.lm, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        if system_prompt is None:
            from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

            system_prompt = (
                DEFAULT_SYSTEM_PROMPT if getattr(proc, "use_default_system_prompt", False) else ""
            )
        self.system_prompt, self.decode_batch = system_prompt, decode_batch
        if tokenizer.pad_token is None:
            tokenizer.pad_token = PAD_TOKEN
        # CFG's unconditional rows use generate's pad (<｜▁pad▁｜> in the converted checkpoints'
        # generation config)
        gen_pad = getattr(model.generation_config, "pad_token_id", None)
        self.cfg_pad_token = (
            tokenizer.convert_ids_to_tokens(gen_pad) if gen_pad is not None else tokenizer.pad_token
        )
        self.image_token = getattr(tokenizer, "image_token", None) or "<image_placeholder>"
        self.boi_token = getattr(tokenizer, "boi_token", None) or "<begin_of_image>"
        self.eoi_token = getattr(tokenizer, "eoi_token", None) or "<end_of_image>"
        self.image_token_id = model.config.image_token_id
        for t in (
            self.image_token,
            self.boi_token,
            self.eoi_token,
            tokenizer.pad_token,
            self.cfg_pad_token,
        ):
            ids = tokenizer(t, add_special_tokens=False).input_ids
            assert len(ids) == 1, f"{t!r} must be one token, got {ids}"
        assert tokenizer.convert_tokens_to_ids(self.image_token) == self.image_token_id, (
            "config.image_token_id"
        )
        # the tokenizer adds BOS itself (gvu's rollout relies on it); caption contexts are tokenised
        # without special tokens, so they spell BOS out
        self.bos = tokenizer.bos_token
        self.adds_bos = tokenizer("a").input_ids[0] == tokenizer.bos_token_id

        self.image_offset = model.config.text_config.vocab_size  # text ids live in [0, V)
        assert len(tokenizer) <= self.image_offset, (
            "tokenizer ids must stay below the text vocabulary size"
        )
        self.image_vocab_size = model.config.vq_config.num_embeddings  # K (16384)
        self.grid = tuple(model.model.vqmodel.quantize.quant_state_dims)  # (24, 24)
        # the VQ decoder doubles the size at each level but one
        levels = len(model.config.vq_config.channel_multiplier)
        # its only output size: 24 * 16 = 384 px for Janus-Pro
        self.image_size = self.grid[0] * 2 ** (levels - 1)
        # 576 understanding slots
        self.num_image_tokens = model.model.vision_model.embeddings.num_patches
        if hasattr(proc, "num_image_tokens"):
            assert proc.num_image_tokens == self.num_image_tokens, (
                "processor and vision tower disagree"
            )
        self.generation_mode = "text"
        params = inspect.signature(model.model.language_model.forward).parameters
        # transformers 5.x : 4.x
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        model.model.vqmodel.requires_grad_(False).eval()  # frozen: GvU trains LoRA on the LM only

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=None, **kwargs):
        """Load a transformers-format Janus(-Pro) checkpoint (hub id or folder) and its processor.
        dtype: None keeps float32 weights (gvu adds bf16 autocast on CUDA); torch.bfloat16 halves
        the memory."""
        require_transformers(JANUS_TRANSFORMERS, "the Janus-Pro adapter")
        from transformers import JanusForConditionalGeneration, JanusProcessor

        model = JanusForConditionalGeneration.from_pretrained(
            name_or_path, dtype=dtype or torch.float32
        )
        processor = JanusProcessor.from_pretrained(name_or_path)
        return cls(model.to(device).eval(), processor, **kwargs)

    @staticmethod
    def is_janus(name_or_path):
        """A folder whose config.json says model_type "janus", or a hub id naming Janus."""
        return is_model_type(name_or_path, "janus")

    def to(self, device):
        self.lm.to(device)
        return self

    # --- prompts -----------------------------------------------------------------------------
    def set_generation_mode(self, mode):
        assert mode in ("text", "image"), mode
        self.generation_mode = mode

    def _t2i_chat(self, prompt):
        """Janus's T2I prompt, as its official code: the sft template, system prompt "", then
        <begin_of_image>."""
        bos = "" if self.adds_bos else self.bos
        return f"{bos}{USER}: {prompt}\n\n{ASSISTANT}:{self.boi_token}"

    def t2i_prompt(self, prompt):
        """Text before the first image code (the tokenizer adds BOS). t2i_prompt("") is Janus's
        unconditional form: the empty prompt's chat with everything between BOS and BOI padded."""
        return self._t2i_chat(prompt) if prompt else self.uncond_prompt("")

    def uncond_prompt(self, prompt):
        """Janus's CFG unconditional prompt for `prompt`: same length as t2i_prompt(prompt), every
        token between BOS and <begin_of_image> replaced by generate's pad token (attended, as in
        Janus's generate)."""
        ids = self.tokenizer(self._t2i_chat(prompt), add_special_tokens=False).input_ids
        n = len(ids) - 1 - (0 if self.adds_bos else 1)  # minus BOI (and a spelled-out BOS)
        return ("" if self.adds_bos else self.bos) + self.cfg_pad_token * n + self.boi_token

    def caption_prompt(self, image, instruction):
        """Understanding context, tokenised without special tokens: BOS, the system prompt, the
        user turn with the image (BOI, num_image_tokens placeholders, EOI) and the instruction, then
        the assistant turn: what JanusProcessor makes of the chat template's text. The image's
        pixels enter through hidden_states(..., images=...)."""
        img = self.boi_token + self.image_token * self.num_image_tokens + self.eoi_token
        return f"{self.bos}{self.system_prompt}{USER}: {img}\n{instruction}\n\n{ASSISTANT}:"

    def caption_prompts(self, images, instruction):
        """caption_prompt per image: the same text for each (the pixels enter in hidden_states)."""
        return [self.caption_prompt(im, instruction) for im in images]

    # understanding reads SigLIP features of pixels, not VQ codes: no --reward-input codes
    understands_codes = False

    # the chat template writes "<|Assistant|>: {answer}" (byte-level BPE: "Ġword")
    answer_prefix = " "

    @property
    def answer_suffix(self):
        """What ends an assistant turn: Janus's sep2, the EOS token <｜end▁of▁sentence｜>."""
        return self.tokenizer.eos_token

    def unknown_words(self, text):
        return []  # byte-level BPE: every string is representable

    # --- the LM ---------------------------------------------------------------------------------
    def image_pixel_values(self, images):
        """list of PIL -> (N, 3, S, S) through Janus's image processor: resize, pad to square,
        SigLIP normalisation."""
        rgb = [im.convert("RGB") for im in images]
        pv = self.image_processor(rgb, return_tensors="pt")["pixel_values"]
        return pv.to(
            self.lm.device, self.lm.model.vision_model.embeddings.patch_embedding.weight.dtype
        )

    def embed(self, input_ids, images=None):
        """Input embeddings (B, T, D): text ids -> text table; ids >= image_offset -> generation
        path; <image_placeholder> slots of row i -> understanding features of images[i]."""
        janus = self.lm.model
        is_code = input_ids >= self.image_offset
        embeds = janus.language_model.get_input_embeddings()(input_ids.masked_fill(is_code, 0))
        if is_code.any():
            gen = self.lm.prepare_embeddings_for_image_generation(
                input_ids[is_code] - self.image_offset
            )
            embeds = embeds.masked_scatter(is_code[..., None], gen.to(embeds.dtype))
        slots = input_ids == self.image_token_id
        if slots.any():
            if images is None:
                raise ImagesRequired(
                    "input_ids hold <image_placeholder> tokens: pass images=[one PIL per row] to "
                    "hidden_states (gvu.caption_token_logprobs must pass its micro-batch's images)"
                )
            assert len(images) == len(input_ids), f"{len(images)} images for {len(input_ids)} rows"
            per_row = slots.sum(1)
            assert (per_row == self.num_image_tokens).all(), (
                f"placeholders per row {per_row.tolist()}"
            )
            pixels = self.image_pixel_values(images)
            feats = janus.get_image_features(pixels).pooler_output  # (B, 576, D)
            embeds = embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))
        return embeds

    def hidden_states(self, input_ids, attention_mask, position_ids=None, cache=None, images=None):
        """Final-layer hidden states (B, T, D) of the language model (after its final norm).
        `cache` (a DynamicCache) is updated in place. images: one PIL per row, or None."""
        out = self.lm.model.language_model(
            inputs_embeds=self.embed(input_ids, images),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_kw: cache},
        )
        return out.last_hidden_state

    def logits(self, hidden):
        """Image mode: the generation head over the K VQ codes. Text mode: lm_head over the text
        ids [0, V)."""
        if self.generation_mode == "image":
            return self.lm.model.generation_head(hidden)
        return self.lm.lm_head(hidden)

    @torch.no_grad()
    def decode_images(self, codes, generator=None, prompts=None):
        """codes (N, h*w) in [0, K) -> N PIL images via the VQ-VAE decoder, in batches.
        Deterministic: `generator` and `prompts` are accepted for API parity and unused (the VQ
        decoder reads no text). Pixels as in Janus: clip((x + 1) / 2 * 255)."""
        images = []
        for chunk in codes.to(self.lm.device).split(self.decode_batch):
            x = self.lm.decode_image_tokens(chunk).float()  # (n, H, W, 3) in about [-1, 1]
            arr = ((x + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()
            images += [Image.fromarray(a) for a in arr]
        return images


# --------------------------------------------------------------------------------------------------
# X-Omni: remote code. The names used below come from X-Omni/X-Omni-En's modeling_xomni.py
# (XOmniForCausalLM, XOmniModel and their init_vision, set_generation_mode, tokenize_image,
# mmdecode, detokenize_image, forward), configuration_xomni.py (XOmniConfig) and
# modeling_siglip_tokenizer.py (SiglipTokenizer.decode), and from the GitHub repo
# X-Omni-Team/X-Omni's generate.py and chat.py.
# modeling_siglip_flux.py (the decoder pipeline) was read in the copy GvU's official repo
# (matrix0721/GvU, omni_r1/models/) ships: FluxPipelineWithSigLIP subclasses diffusers'
# FluxPipeline; its __call__ takes the *_prompt_embeds and generator arguments
# (_prepare_decoder_text checks them when the model loads) and encodes text with
# FluxPipeline.encode_prompt, as _encode_decoder_text does.
END_OF_TURN = "<|im_end|>"  # Qwen's end of turn; chat.py stops generation at it


def dtype_kwarg():
    """from_pretrained's dtype keyword: `dtype` from transformers 4.56, `torch_dtype` before
    (X-Omni's 4.52)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def chat_answer_affixes(tokenizer, end_of_turn=END_OF_TURN):
    """(what the chat template writes between the assistant header and an answer, the token that
    ends it), read off the template itself rather than assumed."""
    user = [{"role": "user", "content": "?"}]
    head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": "\x00"}], tokenize=False
    )
    assert full.startswith(head), (
        "the chat template writes the assistant header differently with an answer"
    )
    prefix, after = full[len(head) :].split("\x00", 1)
    assert after.startswith(end_of_turn), (
        f"the chat template does not end an answer with {end_of_turn!r}: {after!r}"
    )
    return prefix, end_of_turn


class XOmni:
    """gvu's UMM API over X-Omni's `XOmniForCausalLM` (after `init_vision`) and its tokenizer.

    The remote model keeps two of everything around one Qwen2.5 stack: `model.lm_embed_tokens` /
    `mm_embed_tokens` (ids >= config.vocab_size are image codes), `model.lm_norm` / `mm_norm`,
    `lm_head` / `mm_head`; the first num_mm_adap_layers and last num_mm_head_layers decoder layers
    update image positions only. Its `forward` builds fp32 logits over all ~168k ids (text and image
    vocabularies, the other mode's rows at dtype min) at every position; gvu never calls it:
    `hidden_states` runs `model.model` (normed final states) and `logits` applies the current
    mode's head rows only: the same numbers (tested against a stand-in's own forward).

    Departure: X-Omni's `detokenize_image` gives FLUX the prompt text too ('' as the negative
    prompt); here the decoder's text condition is the empty prompt for every image. GvU trains the
    autoregressive policy, and a decoder that also reads the prompt could repair an image whose
    codes got it wrong, rewarding the policy for the decoder's work."""

    # LoRA on the LM's linear layers only: image_tokenizer (the SigLIP ViT) is a submodule too
    lora_targets = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    patch = 16  # generate.py's --downsample-size: one image code per 16 x 16 pixels
    # 32 x 32 codes; generate.py's default is 1152 (72 x 72); GvU's official runs use 576
    default_image_size = 512

    def __init__(self, model, tokenizer, image_size=None, decode_batch=8, decoder_text="none"):
        """model: XOmniForCausalLM on which init_vision has run. image_size: the square size to
        generate, in pixels, a multiple of 16 (None: default_image_size). decode_batch: images per
        decoder call (a memory knob). decoder_text: the FLUX decoder's text condition, "none" (the
        empty prompt) or "prompt" (each image's T2I prompt, as X-Omni's mmdecode and GvU's official
        code do); see decode_images."""
        image_size = image_size or self.default_image_size
        assert image_size % self.patch == 0 and decoder_text in ("none", "prompt"), (
            image_size,
            decoder_text,
        )
        self.image_size, self.decoder_text = image_size, decoder_text
        cfg = model.config
        self.lm, self.tokenizer, self.decode_batch = model, tokenizer, decode_batch
        self.som, self.eom, self.img = cfg.mm_special_tokens[:3]  # '<SOM>', '<EOM>', '<IMAGE>'
        # XOmniModel.embed_tokens: id >= vocab_size is code id - vocab_size
        self.image_offset = cfg.vocab_size
        # K; forward's image logits are mm_head rows [0, K)
        self.image_vocab_size = cfg.image_vocab_size
        self.grid = (image_size // self.patch,) * 2  # (h, w) codes, generate.py's token_h, token_w
        # mmdecode parses codes from these
        ends = [f"<MM-Token-{k}>" for k in (0, self.image_vocab_size - 1)]
        got = tokenizer.convert_tokens_to_ids(ends)
        assert got == [self.image_offset, self.image_offset + self.image_vocab_size - 1], (
            f"{ends} are ids {got}"
        )
        for t in (self.som, self.img, self.eom, END_OF_TURN):
            assert len(tokenizer(t, add_special_tokens=False).input_ids) == 1, (
                f"{t!r} must be one token"
            )
        self.answer_prefix, self.answer_suffix = chat_answer_affixes(tokenizer)
        self.generation_mode = "text"
        params = inspect.signature(model.model.forward).parameters
        # transformers 5.x : 4.x
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # XOmniModel skips Qwen2Model.__init__; X-Omni's forward sets it too
        model.model.has_sliding_layers = False
        model.image_tokenizer.requires_grad_(False).eval()  # frozen: GvU trains LoRA on the LM only
        self._empty_text = self._prepare_decoder_text()  # (1, L, D), (1, D'): the embeddings of ""
        model.decoder_pipe.to(model.device)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path, flux, trust_remote_code=False, device="cpu", dtype=None, **kwargs
    ):
        """Load as X-Omni's generate.py and chat.py do: the fast tokenizer, AutoModelForCausalLM
        with the repository's own code, moved to `device`, then `init_vision(flux)` (SigLIP-VQ
        tokenizer + the FLUX.1-dev based decoder). trust_remote_code reaches transformers as given
        (False: transformers refuses). dtype: None = bfloat16 on CUDA (X-Omni's), else float32."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, **{dtype_kwarg(): dtype}
        )
        # the flag reaches the tokenizer too: transformers 5 would otherwise ask on stdin about the
        # config's auto_map
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, use_fast=True, trust_remote_code=trust_remote_code
        )
        model.to(device).eval()
        model.init_vision(flux)
        return cls(model, tokenizer, **kwargs)

    @staticmethod
    def is_xomni(name_or_path):
        """A folder whose config.json says model_type "x-omni" (read as JSON: no code runs), or a
        hub id naming X-Omni."""
        return is_model_type(name_or_path, "x-omni")

    def to(self, device):
        self.lm.to(device)  # the image tokenizer is a submodule of lm
        # a diffusers pipeline (without its text encoders with decoder_text "none")
        self.lm.decoder_pipe.to(device)
        return self

    @torch.no_grad()
    def _prepare_decoder_text(self):
        """The FLUX decoder's text side. X-Omni's detokenize_image passes the text before <SOM>
        (the T2I prompt) as the prompt and '' as the negative prompt. Returns the embeddings of ''
        (CLIP + T5, encoded once); with decoder_text "none" both encoders and their tokenizers are
        then dropped (~10 GB): the decoder is still conditioned on the SigLIP-VQ features of the
        codes, just not on text. With "prompt" they stay, and decode_images encodes each batch's
        prompts."""
        pipe = self.lm.decoder_pipe
        want = {
            "prompt_embeds",
            "pooled_prompt_embeds",
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
            "generator",
        }
        params = inspect.signature(pipe.__call__).parameters
        missing = (
            set() if any(p.kind == p.VAR_KEYWORD for p in params.values()) else want - set(params)
        )
        assert not missing, (
            f"the decoder pipeline {type(pipe).__name__} does not take {sorted(missing)}"
        )
        device = self.lm.device
        pipe.text_encoder.to(device)
        pipe.text_encoder_2.to(device)
        empty = self._encode_decoder_text([""])
        if self.decoder_text == "none":
            for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
                setattr(pipe, name, None)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return empty

    def _encode_decoder_text(self, texts):
        """FLUX's CLIP + T5 embeddings of `texts`, (n, L, D) and (n, D'), made by the pipeline."""
        embeds, pooled, _ = self.lm.decoder_pipe.encode_prompt(
            prompt=texts, prompt_2=texts, device=self.lm.device
        )
        return embeds, pooled

    # --- prompts -----------------------------------------------------------------------------
    def set_generation_mode(self, mode):
        assert mode in ("text", "image"), mode
        self.generation_mode = mode
        self.lm.set_generation_mode(mode)  # keep the remote model's own state in step

    def t2i_prompt(self, prompt):
        """generate.py's input: the raw prompt (no chat template) then the image prefix
        '<SOM>{h} {w}<IMAGE>'."""
        h, w = self.grid
        return f"{prompt}{self.som}{h} {w}{self.img}"

    def uncond_prompt(self, prompt):
        """generate.py's CFG negative prompt: the image prefix alone."""
        return self.t2i_prompt("")

    def tokenize_image(self, image):
        """X-Omni's own tokenize_image: anyres resize, SigLIP-VQ
        -> '<SOM>{H} {W}<IMAGE><MM-Token-k>...<EOM>'."""
        # lm.train() reaches this submodule; its codes must not depend on that
        self.lm.image_tokenizer.eval()
        return self.lm.tokenize_image(image)

    def caption_prompt(self, image, instruction):
        """chat.py's understanding context: one user turn '{image string}\\n{instruction}' through
        the chat template, with the assistant header (tokenised without special tokens: Qwen adds
        none)."""
        msgs = [{"role": "user", "content": self.tokenize_image(image) + "\n" + instruction}]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def caption_prompts(self, images, instruction):
        """caption_prompt for a batch. Images of one size (decode_images' are) go through the
        SigLIP-VQ tokenizer in ONE call, with the steps of X-Omni's tokenize_image (image_transform,
        then image_tokenizer.encode on a batch of one); other sizes, one call each. `images` may
        also be codes (N, h*w) already: X-Omni's generated codes and understanding codes share one
        SigLIP-VQ vocabulary (--reward-input codes)."""
        if torch.is_tensor(images):
            texts = [self.codes_text(c, self.grid) for c in images]
        elif len({im.size for im in images}) == 1:
            self.lm.image_tokenizer.eval()
            x = torch.stack([self.lm.image_transform(im) for im in images])  # (N, 3, H, W)
            x = x.to(self.lm.device, self.lm.vision_dtype)
            codes = self.lm.image_tokenizer.encode(x)  # (N, h, w)
            texts = [self.codes_text(c.reshape(-1), c.shape) for c in codes]
        else:
            texts = [self.tokenize_image(im) for im in images]
        chats = [[{"role": "user", "content": t + "\n" + instruction}] for t in texts]
        return self.tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)

    def codes_text(self, codes, shape):
        """One image's codes (h*w,) on an (h, w) grid -> tokenize_image's
        '<SOM>{h} {w}<IMAGE><MM-Token-k>...<EOM>'."""
        body = "".join(f"<MM-Token-{k}>" for k in codes.tolist())
        return f"{self.som}{shape[0]} {shape[1]}{self.img}{body}{self.eom}"

    understands_codes = True  # one SigLIP-VQ vocabulary for generation and understanding

    def unknown_words(self, text):
        return []  # byte-level BPE: every string is representable

    # --- the LM ---------------------------------------------------------------------------------
    def hidden_states(self, input_ids, attention_mask, position_ids=None, cache=None, images=None):
        """Final hidden states (B, T, D) of XOmniModel: lm_norm at text positions, mm_norm at
        image codes (the remote `norm`). `cache` (a DynamicCache) is updated in place. `images` is
        unused: X-Omni reads images as codes in the text (caption_prompt)."""
        out = self.lm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_kw: cache},
        )
        return out.last_hidden_state

    def logits(self, hidden):
        """Image mode: mm_head rows [0, K), the codes (X-Omni's forward puts them at ids
        vocab_size + k). Text mode: lm_head over the text ids [0, vocab_size). LoRA never touches
        the heads, so slicing is exact."""
        if self.generation_mode == "image":
            return F.linear(hidden, self.lm.mm_head.weight[: self.image_vocab_size])
        return self.lm.lm_head(hidden)

    @torch.no_grad()
    def decode_images(self, codes, generator=None, prompts=None):
        """codes (N, h*w) in [0, K) -> N PIL images of h*16 x w*16 px, `decode_batch` per decoder
        call (X-Omni's detokenize_image decodes one): SigLIP-VQ codebook -> features (n, h*w, C) ->
        the FLUX-based decoder with the checkpoint's steps and CFG scales, its noise drawn from
        `generator`. prompts: each row's T2I prompt, the text condition when decoder_text is
        "prompt" (negative: ''); ignored with "none" ('' for both)."""
        (h, w), dec, pipe = self.grid, self.lm.decoder_config, self.lm.decoder_pipe
        if self.decoder_text == "prompt":
            assert prompts is not None and len(prompts) == len(codes), (
                "decoder_text='prompt': one prompt per image"
            )
        embeds, pooled = self._empty_text
        images = []
        for s, chunk in zip(
            range(0, len(codes), self.decode_batch),
            codes.to(self.lm.device).split(self.decode_batch),
        ):
            n = len(chunk)
            feats = self.lm.image_tokenizer.decode(
                chunk.reshape(-1), (n, h, w, self.lm.encoder_config.codebook_dim)
            )
            # (n, C, h, w) -> (n, h*w, C), as detokenize_image
            feats = feats.flatten(2).transpose(1, 2).contiguous()
            empty = dict(
                prompt_embeds=embeds.repeat(n, 1, 1), pooled_prompt_embeds=pooled.repeat(n, 1)
            )
            text = empty
            if self.decoder_text == "prompt":
                prompt_embeds, pooled_prompt_embeds = self._encode_decoder_text(prompts[s : s + n])
                text = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
            out = pipe(
                feats,
                **text,
                **{"negative_" + k: v for k, v in empty.items()},
                height=h * dec.upscale_factor,
                width=w * dec.upscale_factor,
                num_inference_steps=dec.num_inference_steps,
                guidance_scale=1.0,
                true_cfg_scale=dec.cfg_scale,
                true_cfg_scale_2=dec.cfg_scale_2,
                generator=generator,
            )
            images += out.images
        return images


# -----------------------------------------------------------------------------
# loading: --model -> a UMM, with the trust-remote-code policy
class InputError(Exception):
    """Bad input from the user: reported as one line, never as a traceback."""


def pick_device(name="auto"):
    """'auto' -> cuda > mps > cpu; any other name if this machine has it (else InputError)."""
    if name == "auto":
        return (
            "cuda"
            if torch.cuda.is_available()
            else "mps"
            if torch.backends.mps.is_available()
            else "cpu"
        )
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(
            f"--device {name}: not a device (auto | cuda | cuda:N | mps | cpu)"
        ) from None
    have = {
        "cpu": 1,
        "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": int(torch.backends.mps.is_available()),
    }.get(dev.type, 0)
    if (dev.index or 0) >= have:
        raise InputError(f"--device {name}: this machine has no such device")
    return name


def use_bf16(dtype, device):
    """--dtype -> bf16 or not. 'auto': bf16 (real weights loaded in bf16, bf16 autocast) on a CUDA
    GPU that has it, fp32 elsewhere; the trainer and the evaluation both decide by this rule."""
    return dtype == "bfloat16" or (
        dtype == "auto" and torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
    )


def load_umm(
    name,
    seed=0,
    trust_remote_code=False,
    flux="",
    device="cpu",
    bf16=False,
    image_size=0,
    decoder_text="none",
):
    """The UMM for --model. Real checkpoints load their weights in bf16 when bf16 is on (LoRA
    stays fp32). X-Omni's model class is Python code from its repository: it runs only with
    trust_remote_code. image_size: pixels per side to generate, 0 = the model's default (X-Omni: any
    multiple of 16; the tiny UMM and Janus-Pro: their decoder's one size). decoder_text: "prompt"
    conditions X-Omni's FLUX decoder on each image's T2I prompt; the other decoders read codes only,
    so they accept "none" alone."""

    def no_text(kind):
        if decoder_text != "none":
            raise InputError(
                f"--decoder-text {decoder_text}: {kind}'s decoder reads image codes only, "
                "not text; use --decoder-text none"
            )

    def native_size(umm, kind):
        if image_size and image_size != umm.image_size:
            raise InputError(
                f"--image-size {image_size}: {kind} generates {umm.image_size} px images only"
            )
        return umm

    if name == "tiny-random" or (os.path.isdir(name) and TinyUMM.is_tiny_umm(name)):
        no_text("the tiny UMM")
        return native_size(
            TinyUMM.random(seed) if name == "tiny-random" else TinyUMM.from_pretrained(name),
            "the tiny UMM",
        )
    if XOmni.is_xomni(name):
        if not trust_remote_code:
            raise InputError(
                f"--model {name} is X-Omni, whose model is Python code from its repository: "
                "pass --trust-remote-code to run that code (it is never implied)"
            )
        if not flux:
            raise InputError(
                f"--model {name} is X-Omni, which decodes images with a FLUX.1-dev based decoder: "
                "pass --flux PATH (a FLUX.1-dev folder or hub id)"
            )
        if image_size < 0 or image_size % XOmni.patch:
            raise InputError(
                f"--image-size {image_size}: X-Omni makes one image code per {XOmni.patch} px, "
                f"so the size must be a multiple of {XOmni.patch} (GvU's paper: 576)"
            )
        return XOmni.from_pretrained(
            name,
            flux,
            trust_remote_code=True,
            device=device,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            image_size=image_size or None,
            decoder_text=decoder_text,
        )
    if JanusPro.is_janus(name):
        # from_pretrained checks the transformers version before loading; on the CPU
        no_text("Janus-Pro")
        return native_size(
            JanusPro.from_pretrained(name, dtype=torch.bfloat16 if bf16 else None), "Janus-Pro"
        )
    raise InputError(
        f"--model {name}: not 'tiny-random', a tiny UMM folder (tiny_umm.json), "
        "a Janus(-Pro) or an X-Omni checkpoint"
    )


def lora_modules(umm, only=""):
    """What gets LoRA: the model's own targets (umm.lora_targets, as peft matches them), or, with
    --lora-targets, those of them whose last name is listed in `only`, as one anchored regex of
    their full names (peft fullmatches a string, so no other module whose name merely ends like one
    of them is wrapped). An unknown name is an InputError, raised before anything is written."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if not only:
        return umm.lora_targets
    own = LoraConfig(target_modules=umm.lora_targets)
    keep = [k.strip() for k in only.split(",") if k.strip()]
    names = (n for n, _ in umm.lm.named_modules() if check_target_module_exists(own, n))
    last = {n: n.rsplit(".", 1)[-1] for n in names}
    missing = [k for k in keep if k not in last.values()]
    if missing or not keep:
        raise InputError(
            f"--lora-targets: the model has no LoRA layer named {', '.join(missing) or repr(only)} "
            f"(its layers: {', '.join(sorted(set(last.values())))})"
        )
    return "|".join(re.escape(n) for n, k in last.items() if k in keep)


def enable_checkpointing(lm):
    """Non-reentrant gradient checkpointing; active in train mode only, so rollouts keep the cache
    (transformers 5 renamed the method)."""
    enable = getattr(lm, "activation_checkpointing_enable", None)
    (enable or lm.gradient_checkpointing_enable)({"use_reentrant": False})


# -----------------------------------------------------------------------------
# the sampler: gvu's flags, or, with --generation-config, transformers' generate's rule for them
# transformers 4.5x's GenerationConfig() values of the sampling settings gvu has (min_p: None, i.e.
# off). The official code pins transformers 4.51.3; transformers 5 leaves them all None
GENERATE_DEFAULTS = dict(temperature=1.0, top_k=50, top_p=1.0, min_p=0.0)
# what such a generation_config.json could also set, that generate applies and gvu's sampler does
# not (with their 4.5x defaults): reported, never applied
NOT_SAMPLED = dict(repetition_penalty=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
NOT_SAMPLED |= dict(no_repeat_ngram_size=0)
FLAG, DEFAULT, CHECKPOINT = "flag/config", "transformers' default", "generation_config.json"
VALID = dict(
    temperature=lambda v: v > 0,
    top_k=lambda v: isinstance(v, int) and v >= 0,
    top_p=lambda v: 0 < v <= 1,
    min_p=lambda v: 0 <= v < 1,
)


def sampler_settings(lm, args):
    """The sampler a run uses: ({temperature, top_k, top_p, min_p: value}, a record of every
    value with its source). `args`: anything with those attributes, cfg_scale and
    generation_config (gvu.Args, eval_geneval's flags).

    generation_config off: args' values (source "flag/config"). On: transformers 4.50-4.5x's rule
    for a GenerationConfig handed to generate, as the official trainer hands it one
    (GenerationMixin._prepare_generation_config): a value equal to transformers' default gives way
    to the model's own generation_config (lm.generation_config, which from_pretrained reads from the
    checkpoint's generation_config.json) where that holds another value, and only if the file was
    saved with transformers >= 4.50. A default left standing is "transformers' default". The
    official code sets guidance_scale itself, so cfg_scale is never taken from the file."""
    from packaging.version import Version

    config = getattr(lm, "generation_config", None) if args.generation_config else None
    saved = getattr(config, "transformers_version", None)
    applies = saved is not None and Version(Version(saved).base_version) >= Version("4.50.0")
    theirs = lambda key: getattr(config, key, None) if applies else None
    values, record = {}, {}
    for key, default in GENERATE_DEFAULTS.items():
        value, source = getattr(args, key), FLAG
        if args.generation_config and value == default:  # left at transformers' default
            source = DEFAULT
            if theirs(key) not in (None, default):
                value, source = theirs(key), CHECKPOINT
        if source == CHECKPOINT and not VALID[key](value):
            raise InputError(
                f"--generation-config: the model's generation_config.json sets {key} = {value!r}, "
                "which gvu's sampler cannot use; set --" + key.replace("_", "-") + " instead"
            )
        values[key], record[key] = value, dict(value=value, source=source)
    record["cfg_scale"] = dict(value=args.cfg_scale, source=FLAG)
    if args.generation_config:
        ignored = {k: theirs(k) for k, d in NOT_SAMPLED.items() if theirs(k) not in (None, d)}
        record["generation_config"] = dict(
            transformers_version=saved, applies=applies, not_sampled=ignored
        )
    return values, record
