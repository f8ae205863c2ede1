"""The models gvu.py trains, each behind the small interface `gvu.UMM`.

tiny_umm.py   TinyUMM: a tiny UMM of X-Omni's shape from stock parts (Qwen2 LM, word tokenizer,
              diffusers decoder); the reference implementation of the interface, the default --model
adapters.py   JanusPro (transformers' Janus) and XOmni (X-Omni's remote code); `load_umm`, which
              picks the class for --model (trust_remote_code only when asked for); the device and
              dtype choice; `lora_modules` (the layers that get LoRA) and `enable_checkpointing`;
              `sampler_settings` (the sampler a run uses, with --generation-config the checkpoint's)
"""

import warnings

from models.adapters import (
    InputError,
    enable_checkpointing,
    load_umm,
    lora_modules,
    pick_device,
    sampler_settings,
    use_bf16,
)

warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6")  # peft's names
__all__ = [
    "InputError",
    "enable_checkpointing",
    "load_umm",
    "lora_modules",
    "pick_device",
    "sampler_settings",
    "use_bf16",
]
