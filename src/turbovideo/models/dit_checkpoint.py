"""What a DiT state dict is (architecture, quantization) and its conversion to the ``-quant`` layout."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from .checkpoint import CheckpointError, StateDict
from .dit_configs import DIT_CONFIGS, DiTConfig
from .int8 import quantize_blockwise

# The 10 block linears upstream stores as int8 (spec §5.1); proj_l and everything outside blocks stay float.
_QUANTIZED_WEIGHT = re.compile(r"^(blocks\.\d+\.(?:self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02]))\.weight$")
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def linear_patch_embedding(state: StateDict) -> StateDict:
    """``state`` with a Conv3d patch embedding [D, C, pt, ph, pw] flattened to the Linear [D, C*pt*ph*pw].

    Upstream's training export (dcp_to_pth) keeps Wan's Conv3d shape; modify_model reshapes it
    row-major for the published files (spec §2.1, §3.2). Only files with SLA's proj_l are
    TurboDiffusion ones: an original Wan file is left as it is, to be named as such.
    """
    weight = state.get("patch_embedding.weight")
    if weight is None or weight.dim() != 5 or not any(".proj_l." in key for key in state):
        return state
    return {**state, "patch_embedding.weight": weight.flatten(1)}


def is_quantized(state: StateDict) -> bool:
    return any(key.endswith(".int8_weight") for key in state)


def identify(state: StateDict) -> DiTConfig | None:
    """The named config whose patch embedding and block count match the file, if any (spec §2.2)."""
    shape = _patch_shape(state)
    if shape is None:
        return None
    dim, features = shape
    blocks = _block_count(state)
    for config in DIT_CONFIGS.values():
        if (config.dim, config.in_dim * config.patch_volume, config.num_layers) == (dim, features, blocks):
            return config
    return None


def variant_label(config: DiTConfig, quantized: bool) -> str:
    return config.label + (" -quant" if quantized else "")


def describe_dit_state(state: StateDict) -> str:
    """A noun phrase saying what the file holds, for error messages ("a Wan2.1-14B -quant checkpoint")."""
    config = identify(state)
    if config is not None:
        return f"a {variant_label(config, is_quantized(state))} checkpoint"
    shape = _patch_shape(state)
    if shape is not None:
        return f"a Wan DiT checkpoint of an unknown size (dim {shape[0]}, {_block_count(state)} blocks)"
    patch = state.get("patch_embedding.weight")
    if patch is not None and patch.dim() == 5:
        return "an original Wan checkpoint (Conv3d patch embedding), not a TurboDiffusion one"
    if any(k.startswith("encoder.") for k in state) and any(k.startswith("decoder.") for k in state):
        return "a VAE checkpoint, not a DiT"
    if "token_embedding.weight" in state:
        return "a umT5 text-encoder checkpoint, not a DiT"
    return f"a file without Wan DiT keys (its first keys are {', '.join(sorted(state)[:3])})"


def quantize_dit_state(state: StateDict) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the ``-quant`` layout of an unquantized DiT state dict, one tensor at a time.

    Each block linear's ``weight`` becomes ``int8_weight`` + ``scale``; every other tensor passes through.
    """
    state = linear_patch_embedding(state)
    if is_quantized(state):
        raise CheckpointError(f"the file is already {describe_dit_state(state)}; nothing to quantize")
    if _patch_shape(state) is None:
        raise CheckpointError(
            f"the file is not a Wan DiT checkpoint: it looks like {describe_dit_state(state)}"
        )
    for key, tensor in state.items():
        match = _QUANTIZED_WEIGHT.match(key)
        if match is None:
            yield key, tensor
            continue
        int8_weight, scale = quantize_blockwise(tensor)
        yield f"{match.group(1)}.int8_weight", int8_weight
        yield f"{match.group(1)}.scale", scale


def _patch_shape(state: StateDict) -> tuple[int, int] | None:
    weight = state.get("patch_embedding.weight")
    if weight is None or weight.dim() != 2:
        return None
    return tuple(weight.shape)


def _block_count(state: StateDict) -> int:
    indices = {int(m.group(1)) for k in state if (m := _BLOCK_INDEX.match(k))}
    return max(indices) + 1 if indices else 0
