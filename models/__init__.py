"""The models gvu.py trains, each behind the small interface `gvu.UMM`.

tiny_umm.py   TinyUMM: a tiny UMM of X-Omni's shape from stock parts (Qwen2 LM, word tokenizer,
              diffusers decoder); the reference implementation of the interface and the default
              --model
adapters.py   JanusPro (transformers' Janus) and XOmni (X-Omni's remote code), `load_umm` (picks
              the class for --model; trust_remote_code only when asked for), the device and dtype
              choice
"""

# gvu.py's imports
from models.adapters import InputError, load_umm, pick_device, use_bf16  # noqa: F401
