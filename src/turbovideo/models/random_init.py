"""Seeded random weights, so every model runs its real code path without a download.

Tiny configs use them for CPU tests and the embedded default; real-size configs use them for GPU
benchmarks and parity runs. Values are chosen so that mapping mistakes show up (no zero heads,
no unit norms): weights N/sqrt(fan_in), biases 0.1*N, norm scales 1 + 0.1*N.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def materialize(module: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocate a module built on ``meta`` on ``device`` and fill it with seeded random values.

    A module that defines ``_randomize_(generator)`` fills its own direct tensors (e.g. int8
    weights with their scales); every other floating tensor gets the generic rule.
    """
    device = torch.device(device)
    if device.type == "meta":
        return module
    module.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            custom = getattr(sub, "_randomize_", None)
            if custom is not None:
                custom(generator)
                continue
            for name, tensor in _direct_tensors(sub):
                if tensor.is_floating_point():
                    tensor.copy_(random_like(name, tensor, generator))
    return module


def random_like(name: str, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random tensor for the parameter ``name`` (its last dotted part decides the rule)."""
    noise = torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        values = 0.1 * noise
    elif tensor.dim() <= 1 or leaf in ("gamma", "scale"):
        values = 1.0 + 0.1 * noise
    else:
        fan_in = math.prod(tensor.shape[1:]) or 1
        values = noise / math.sqrt(fan_in)
    return values.to(tensor.dtype)


def _direct_tensors(module: nn.Module):
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)
