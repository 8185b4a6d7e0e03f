"""Model definitions and loaders (Wan DiT, Wan2.1 VAE, umT5-XXL, tokenizer).

Public names are resolved lazily so that importing one model does not import the others.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "build_dit": "dit",
    "load_dit": "dit",
    "DIT_CONFIGS": "dit",
    "DiTConfig": "dit",
    "DiTInputs": "dit",
    "WanDiT": "dit",
    "build_vae": "vae",
    "load_vae": "vae",
    "VAE_CONFIGS": "vae",
    "latent_frames": "vae",
    "pixel_frames": "vae",
    "build_text_encoder": "text_encoder",
    "load_text_encoder": "text_encoder",
    "encode_prompts": "text_encoder",
    "TEXT_ENCODER_CONFIGS": "text_encoder",
    "load_tokenizer": "tokenizer",
    "clean_text": "tokenizer",
    "TokenBatch": "tokenizer",
    "CheckpointError": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
