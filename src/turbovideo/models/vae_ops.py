"""The VAE fast path's memory-bound steps: Triton kernels on a GPU, the same math in PyTorch elsewhere.

Both take ``[B, C, ...]`` channels-last activations (see turbovideo.kernels.channel_norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through the Triton kernels (on a GPU) rather than PyTorch ops."""
    return x.is_cuda


def _channels_innermost(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its channels are innermost in memory (always, on a GPU), else a copy that is."""
    if x.stride(1) == 1:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(1, -1, *([1] * (like.dim() - 2)))


def norm_silu_into(
    x: torch.Tensor, gamma: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``out = SiLU(RMSNorm(x + bias))`` over channels (``gamma`` [C]); returns ``out``."""
    if use_triton(x):
        from ..kernels.channel_norm import rms_norm_silu

        return rms_norm_silu(_channels_innermost(x), gamma, out, bias)
    if bias is not None:
        x = x + _per_channel(bias, x)
    torch.ops.aten.silu.out(rms_norm_last_dim(x.movedim(1, -1), gamma), out=out.movedim(1, -1))
    return out


def rms_norm_last_dim(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The VAE's RMS norm over the last dim of ``x`` in one PyTorch op."""
    dim = x.shape[-1]
    # x / ||x|| * sqrt(C) is x * rsqrt(mean(x^2)). rms_norm adds eps to mean(x^2) where upstream
    # clamps ||x|| at 1e-12: the same for any input that is not all zeros (both give 0 there).
    return F.rms_norm(x, (dim,), gamma.to(x.dtype), eps=1e-24 / dim)


def add_bias_(
    y: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y += bias (+ residual (+ residual_bias))``, in place unless ``y`` must first be made channels-last
    (never on a GPU); returns the result."""
    if use_triton(y):
        from ..kernels.channel_norm import add_bias_ as add_bias_kernel

        residual = None if residual is None else _channels_innermost(residual)
        return add_bias_kernel(_channels_innermost(y), bias, residual, residual_bias)
    y.add_(_per_channel(bias, y))
    if residual is not None:
        y.add_(residual)
    if residual_bias is not None:
        y.add_(_per_channel(residual_bias, y))
    return y


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x spatial upsampling of a channels-last ``[N, C, H, W]`` batch."""
    if use_triton(x):
        from ..kernels.upsample import upsample_nearest2x as upsample_kernel

        return upsample_kernel(_channels_innermost(x))
    return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")
