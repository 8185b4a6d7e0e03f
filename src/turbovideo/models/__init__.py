"""Model definitions and loaders (Wan DiT, Wan2.1 VAE, umT5-XXL, tokenizer).

Public names are resolved lazily so that importing one model does not import the others.
"""

from turbovideo.lazy import lazy_exports

_EXPORTS = {
    "build_dit": "dit",
    "load_dit": "dit",
    "DIT_CONFIGS": "dit",
    "DiTConfig": "dit",
    "DiTInputs": "dit",
    "TextKeys": "dit",
    "WanDiT": "dit",
    "build_vae": "vae",
    "load_vae": "vae",
    "VAE_CONFIGS": "vae",
    "latent_frames": "vae",
    "latent_shape": "vae",
    "pixel_frames": "vae",
    "vae_dtype": "vae",
    "build_text_encoder": "text_encoder",
    "load_text_encoder": "text_encoder",
    "encode_prompts": "text_encoder",
    "prompt_rows": "text_encoder",
    "TEXT_ENCODER_CONFIGS": "text_encoder",
    "load_tokenizer": "tokenizer",
    "clean_text": "tokenizer",
    "TokenBatch": "tokenizer",
    "CheckpointError": "checkpoint",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
