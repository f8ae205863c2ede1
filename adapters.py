"""
Adapters: real unified multimodal models behind the small API that gvu.py drives (TinyUMM's API).

JanusPro wraps transformers' native `JanusForConditionalGeneration` (deepseek-community/Janus-Pro-1B,
-7B). Janus keeps generation and understanding apart around one Llama:

    T2I:  "<|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>" -> Llama -> generation_head -> VQ code k
          code k -> generation_embeddings -> generation_aligner -> next Llama input   (24 x 24 codes)
          codes -> VQ-VAE decoder -> 384 px image
    I2T:  image -> SigLIP normalisation -> vision_model -> aligner -> the 576 <image_placeholder> slots
          -> Llama -> lm_head -> text

gvu.py sees one id space: text ids [0, V) from the tokenizer, and image code k as id `image_offset + k`
with `image_offset = V` (the text vocabulary size; such ids never reach the text embedding table).
`hidden_states` routes each id to its embedding path; `logits` reads the generation head in image mode
and the text head in text mode.

CFG: Janus samples with classifier-free guidance 5 (its own `generate` and the official code; pass
`--cfg-scale 5`). Its unconditional branch is the conditional prompt with every token between BOS and
<begin_of_image> replaced by the pad token, same length, all attended (`uncond_prompt`). gvu samples
from the guided distribution but computes the ratio and the KL with the conditional policy only
(T2I-R1's convention), so CFG only shapes which codes are sampled.

    umm = JanusPro.from_pretrained("deepseek-community/Janus-Pro-1B", device="cuda")
"""
import inspect
import os

import torch
from PIL import Image

USER, ASSISTANT = "<|User|>", "<|Assistant|>"  # Janus's "deepseek" chat roles (sep "\n\n", sep2 EOS)
PAD_TOKEN = "<｜▁pad▁｜>"  # Janus's pad token, used when a tokenizer names none


def janus_image_processor_class():
    """Janus's image processor without torchvision: its own module in transformers 5, the plain class in 4.x."""
    try:
        from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil
        return JanusImageProcessorPil
    except ImportError:
        from transformers import JanusImageProcessor
        return JanusImageProcessor


class ImagesRequired(ValueError):
    """hidden_states saw <image_placeholder> tokens but was given no images to fill them with."""


class JanusPro:
    """gvu's UMM API over `JanusForConditionalGeneration` + its tokenizer and image processor."""

    # LoRA on the language model's linear layers only: the SigLIP tower also has q_proj/k_proj/v_proj
    lora_targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

    def __init__(self, model, processor_or_tokenizer, image_processor=None, system_prompt=None, decode_batch=16):
        """model: JanusForConditionalGeneration. processor_or_tokenizer: a JanusProcessor (its tokenizer and
        image processor are used) or a tokenizer, then `image_processor` (default: Janus's SigLIP
        normalisation, mean = std = 0.5, at the vision tower's size). system_prompt: text before the
        understanding turn, verbatim; None = the processor's choice (the converted Janus-Pro processors set
        use_default_system_prompt, as the official VLChatProcessor does for understanding), else ""."""
        proc = processor_or_tokenizer
        if hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
            tokenizer, image_processor = proc.tokenizer, image_processor or proc.image_processor
        else:
            tokenizer = proc
        vcfg = model.config.vision_config
        if image_processor is None:
            image_processor = janus_image_processor_class()(
                size={"height": vcfg.image_size, "width": vcfg.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        self.lm, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        if system_prompt is None:
            from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT
            system_prompt = DEFAULT_SYSTEM_PROMPT if getattr(proc, "use_default_system_prompt", False) else ""
        self.system_prompt, self.decode_batch = system_prompt, decode_batch
        if tokenizer.pad_token is None:
            tokenizer.pad_token = PAD_TOKEN
        # CFG's unconditional rows use generate's pad (<｜▁pad▁｜> in the converted checkpoints' generation config)
        gen_pad = getattr(model.generation_config, "pad_token_id", None)
        self.cfg_pad_token = tokenizer.convert_ids_to_tokens(gen_pad) if gen_pad is not None else tokenizer.pad_token
        self.image_token = getattr(tokenizer, "image_token", None) or "<image_placeholder>"
        self.boi_token = getattr(tokenizer, "boi_token", None) or "<begin_of_image>"
        self.eoi_token = getattr(tokenizer, "eoi_token", None) or "<end_of_image>"
        self.image_token_id = model.config.image_token_id
        for t in (self.image_token, self.boi_token, self.eoi_token, tokenizer.pad_token, self.cfg_pad_token):
            ids = tokenizer(t, add_special_tokens=False).input_ids
            assert len(ids) == 1, f"{t!r} must be one token, got {ids}"
        assert tokenizer.convert_tokens_to_ids(self.image_token) == self.image_token_id, "config.image_token_id"
        # the tokenizer adds BOS itself (gvu's rollout relies on it); caption contexts are tokenised without
        # special tokens, so they spell BOS out
        self.bos = tokenizer.bos_token
        self.adds_bos = tokenizer("a").input_ids[0] == tokenizer.bos_token_id

        self.image_offset = model.config.text_config.vocab_size  # text ids live in [0, V)
        assert len(tokenizer) <= self.image_offset, "tokenizer ids must stay below the text vocabulary size"
        self.image_vocab_size = model.config.vq_config.num_embeddings  # K (16384)
        self.grid = tuple(model.model.vqmodel.quantize.quant_state_dims)  # (24, 24)
        self.num_image_tokens = model.model.vision_model.embeddings.num_patches  # 576 understanding slots
        if hasattr(proc, "num_image_tokens"):
            assert proc.num_image_tokens == self.num_image_tokens, "processor and vision tower disagree"
        self.generation_mode = "text"
        params = inspect.signature(model.model.language_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.x : 4.x
        model.model.vqmodel.requires_grad_(False).eval()  # frozen: GvU trains LoRA on the LM only

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=None, **kwargs):
        """Load a transformers-format Janus(-Pro) checkpoint (hub id or folder) and its processor.
        dtype: None keeps float32 weights (gvu adds bf16 autocast on CUDA); torch.bfloat16 halves memory."""
        from transformers import JanusForConditionalGeneration, JanusProcessor
        model = JanusForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype or torch.float32)
        processor = JanusProcessor.from_pretrained(name_or_path)
        return cls(model.to(device).eval(), processor, **kwargs)

    @staticmethod
    def is_janus(name_or_path):
        """A folder whose config.json says model_type "janus", or a hub id naming Janus."""
        cfg = os.path.join(name_or_path, "config.json")
        if os.path.isfile(cfg):
            import json
            with open(cfg) as f:
                return json.load(f).get("model_type") == "janus"
        return not os.path.exists(name_or_path) and "janus" in name_or_path.lower()

    def to(self, device):
        self.lm.to(device)
        return self

    # --- prompts -----------------------------------------------------------------------------
    def set_generation_mode(self, mode):
        assert mode in ("text", "image"), mode
        self.generation_mode = mode

    def _t2i_chat(self, prompt):
        """Janus's T2I prompt (official code: sft template, system prompt "", then <begin_of_image>)."""
        bos = "" if self.adds_bos else self.bos
        return f"{bos}{USER}: {prompt}\n\n{ASSISTANT}:{self.boi_token}"

    def t2i_prompt(self, prompt):
        """Text before the first image code (the tokenizer adds BOS). t2i_prompt("") is Janus's
        unconditional form: the empty prompt's chat with everything between BOS and BOI padded."""
        return self._t2i_chat(prompt) if prompt else self.uncond_prompt("")

    def uncond_prompt(self, prompt):
        """Janus's CFG unconditional prompt for `prompt`: same length as t2i_prompt(prompt), every token
        between BOS and <begin_of_image> replaced by generate's pad token (attended, as in Janus's generate)."""
        ids = self.tokenizer(self._t2i_chat(prompt), add_special_tokens=False).input_ids
        n = len(ids) - 1 - (0 if self.adds_bos else 1)  # minus BOI (and a spelled-out BOS)
        return ("" if self.adds_bos else self.bos) + self.cfg_pad_token * n + self.boi_token

    def caption_prompt(self, image, instruction):
        """Understanding context, tokenised without special tokens: BOS, the system prompt, the user turn
        with the image (BOI, num_image_tokens placeholders, EOI) and the instruction, then the assistant
        turn: what JanusProcessor makes of the chat template's text. The image's pixels enter through
        hidden_states(..., images=...)."""
        img = self.boi_token + self.image_token * self.num_image_tokens + self.eoi_token
        return f"{self.bos}{self.system_prompt}{USER}: {img}\n{instruction}\n\n{ASSISTANT}:"

    answer_prefix = " "  # the chat template writes "<|Assistant|>: {answer}" (byte-level BPE: "Ġword")

    @property
    def answer_suffix(self):
        """What ends an assistant turn: Janus's sep2, the EOS token <｜end▁of▁sentence｜>."""
        return self.tokenizer.eos_token

    def unknown_words(self, text):
        return []  # byte-level BPE: every string is representable

    # --- the LM ---------------------------------------------------------------------------------
    def image_pixel_values(self, images):
        """list of PIL -> (N, 3, S, S): Janus's image processor (resize, pad to square, SigLIP norm)."""
        pv = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return pv.to(self.lm.device, self.lm.model.vision_model.embeddings.patch_embedding.weight.dtype)

    def embed(self, input_ids, images=None):
        """Input embeddings (B, T, D): text ids -> text table; ids >= image_offset -> generation path;
        <image_placeholder> slots of row i -> understanding features of images[i]."""
        janus = self.lm.model
        is_code = input_ids >= self.image_offset
        embeds = janus.language_model.get_input_embeddings()(input_ids.masked_fill(is_code, 0))
        if is_code.any():
            gen = self.lm.prepare_embeddings_for_image_generation(input_ids[is_code] - self.image_offset)
            embeds = embeds.masked_scatter(is_code[..., None], gen.to(embeds.dtype))
        slots = input_ids == self.image_token_id
        if slots.any():
            if images is None:
                raise ImagesRequired("input_ids hold <image_placeholder> tokens: pass images=[one PIL per row] to "
                                     "hidden_states (gvu.prompt_token_logprobs must pass its micro-batch's images)")
            assert len(images) == len(input_ids), f"{len(images)} images for {len(input_ids)} rows"
            per_row = slots.sum(1)
            assert (per_row == self.num_image_tokens).all(), f"placeholders per row {per_row.tolist()}"
            feats = janus.get_image_features(self.image_pixel_values(images)).pooler_output  # (B, 576, D)
            embeds = embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))
        return embeds

    def hidden_states(self, input_ids, attention_mask, position_ids=None, cache=None, images=None):
        """Final-layer hidden states (B, T, D) of the language model (after its final norm).
        `cache` (a DynamicCache) is updated in place. images: one PIL per row, or None."""
        out = self.lm.model.language_model(
            inputs_embeds=self.embed(input_ids, images), attention_mask=attention_mask, position_ids=position_ids,
            use_cache=cache is not None, **{self._cache_kw: cache})
        return out.last_hidden_state

    def logits(self, hidden):
        """Image mode: the generation head over the K VQ codes. Text mode: lm_head over text ids [0, V)."""
        if self.generation_mode == "image":
            return self.lm.model.generation_head(hidden)
        return self.lm.lm_head(hidden)

    @torch.no_grad()
    def decode_images(self, codes, generator=None):
        """codes (N, h*w) in [0, K) -> N PIL images via the VQ-VAE decoder, in batches. Deterministic:
        `generator` is accepted for API parity and unused. Pixels as in Janus: clip((x + 1) / 2 * 255)."""
        images = []
        for chunk in codes.to(self.lm.device).split(self.decode_batch):
            x = self.lm.decode_image_tokens(chunk).float()  # (n, H, W, 3) in about [-1, 1]
            arr = ((x + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()
            images += [Image.fromarray(a) for a in arr]
        return images

