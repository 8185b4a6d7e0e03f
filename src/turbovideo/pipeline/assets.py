"""What a pipeline loads from a checkpoint folder: which DiT variant, and the VAE, umT5 and tokenizer
that every model of a worker shares."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
from torch import nn

from turbovideo import catalog
from turbovideo.catalog import ModelSpec, prefer_quantized
from turbovideo.models import load_text_encoder, load_tokenizer, load_vae, vae_dtype
from turbovideo.models.tokenizer import TOKENIZER_FILE, PromptTokenizer

# The VAE, umT5 and tokenizer that every model shares, per set of files (by inode, so the per-model
# folders of symlinks or hard links the checkpoint cache makes share them too) and device.
# Held weakly: the modules go with the last pipeline that uses them.
_SHARED_ASSETS: dict[tuple, tuple[weakref.ref, weakref.ref, PromptTokenizer, str]] = {}


def shared_assets(
    folder: Path, spec: ModelSpec, device: torch.device
) -> tuple[nn.Module, nn.Module, PromptTokenizer, str]:
    """The VAE, text encoder, tokenizer and encoder identity of ``folder``, loaded (to the host) once
    while any pipeline holds them, so a worker serving T2V and I2V holds one 11 GB umT5, not two. A file
    replaced or rewritten in place (its size or time changes) is loaded anew."""
    vae_file = folder / catalog.VAE_FILE
    encoder_file = folder / catalog.TEXT_ENCODER_FILE
    tokenizer_dir = folder / catalog.TOKENIZER_DIR
    try:
        files = [os.stat(p) for p in (vae_file, encoder_file, tokenizer_dir / TOKENIZER_FILE)]
        identity = ((f.st_dev, f.st_ino, f.st_size, f.st_mtime_ns) for f in files)
        key = (str(device), spec.vae_config, spec.text_encoder_config, *identity)
    except OSError:
        key = None  # a missing file: the loaders below say which, in their words
    if key in _SHARED_ASSETS:
        vae_ref, encoder_ref, tokenizer, encoder_id = _SHARED_ASSETS[key]
        vae, text_encoder = vae_ref(), encoder_ref()
        if vae is not None and text_encoder is not None:
            return vae, text_encoder, tokenizer, encoder_id
    tokenizer = load_tokenizer(tokenizer_dir)
    assets = (
        load_vae(vae_file, device="cpu", dtype=vae_dtype(device), name=spec.vae_config),
        load_text_encoder(encoder_file, device="cpu", name=spec.text_encoder_config),
        tokenizer,
        f"{_file_identity(encoder_file)}|{_file_identity(Path(tokenizer.source))}",
    )
    for stale in [k for k, (v, e, *_) in _SHARED_ASSETS.items() if v() is None or e() is None]:
        del _SHARED_ASSETS[stale]
    if key is not None:
        _SHARED_ASSETS[key] = (weakref.ref(assets[0]), weakref.ref(assets[1]), *assets[2:])
    return assets


def pick_variant(spec: ModelSpec, folder: Path, quantized: bool | None, device: torch.device) -> bool:
    """``quantized`` if given, else the card's preference (``prefer_quantized``), else the other variant
    when only its DiT files are in ``folder``."""
    if quantized is not None:
        return quantized
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    preferred = prefer_quantized(total)
    if not all((folder / f.filename).is_file() for f in spec.dit_files(preferred)) and all(
        (folder / f.filename).is_file() for f in spec.dit_files(not preferred)
    ):
        return not preferred
    return preferred


def _file_identity(path: Path) -> str:
    """Name, size and modification time: changes when the file is replaced, cheap to compute."""
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
