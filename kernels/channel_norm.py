"""Channel-wise kernels for the channels-last activations of the Wan VAE decoder and encoder.

The VAE's convs run in cuDNN; what sits between them is memory-bound and, left to PyTorch, costs
more than half of a 480p decode: RMS norm and SiLU as separate passes, and every conv bias added by
a broadcast kernel that does not vectorise over channels-last tensors. Here each is one pass:

* ``rms_norm_silu``: SiLU(RMSNorm(x + bias)) over channels, written straight into the caller's
  buffer (the causal conv's input). ``bias`` is the previous conv's bias, deferred to this read.
* ``add_bias_``: ``y += bias (+ residual + residual_bias)`` in place, the residual add of a block and
  the deferred biases of both convs feeding it in one pass.

Tensors are ``[B, C, ...]`` with channels innermost in memory (``channels_last_3d`` or
``channels_last``, or a frame slice of such a tensor): per sample, rows of C contiguous values at a
fixed row stride. Statistics and arithmetic are fp32 with one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ELEMENTS_PER_PROGRAM = 8192


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...]`` channels-innermost -> a ``[B, rows, C]`` view (no copy), or ValueError."""
    if x.stride(1) != 1:
        raise ValueError(f"expected a channels-last tensor, got strides {x.stride()} for {list(x.shape)}")
    try:
        return x.movedim(1, -1).view(x.shape[0], -1, x.shape[1])
    except RuntimeError as error:
        raise ValueError(f"the non-channel dims of {list(x.shape)} {x.stride()} do not form rows") from error


def row_tile_shape(channels: int) -> tuple[int, int]:
    """(rows, channels) of a program's tile over a channels-last tensor: all channels, padded to a
    power of two, and enough rows for ~8K elements (memory-bound kernels)."""
    block_c = triton.next_power_of_2(channels)
    return max(1, _ELEMENTS_PER_PROGRAM // block_c), block_c


def _launch(channels: int, rows: int, batch: int) -> tuple[int, int, tuple[int, int]]:
    block_r, block_c = row_tile_shape(channels)
    return block_r, block_c, (triton.cdiv(rows, block_r), batch)


@triton.jit
def _row_tile(R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: sample, row offsets [BLOCK_R, 1] (int64), channels, channel and tile masks."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < R)[:, None] & col_ok[None, :]
    return tl.program_id(1).to(tl.int64), rows.to(tl.int64)[:, None], cols, col_ok, mask


@triton.jit
def _per_channel(ptr, cols, col_ok):
    """A [1, BLOCK_C] fp32 row of per-channel values (zero past C)."""
    return tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _rms_norm_silu_kernel(
    x_ptr,
    out_ptr,
    gamma_ptr,
    bias_ptr,
    R,
    C,
    stride_xb,
    stride_xr,
    stride_ob,
    stride_or,
    scale,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b, rows64, cols, col_ok, mask = _row_tile(R, C, BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + b * stride_xb + rows64 * stride_xr + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_BIAS:
        x = tl.where(mask, x + _per_channel(bias_ptr, cols, col_ok), 0.0)
    # Upstream: x / max(||x||, 1e-12) * sqrt(C) * gamma.
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
    y = x / norm[:, None] * (scale * _per_channel(gamma_ptr, cols, col_ok))
    y = y / (1.0 + tl.exp(-y))
    tl.store(
        out_ptr + b * stride_ob + rows64 * stride_or + cols[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def rms_norm_silu(
    x: torch.Tensor, gamma: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``out = SiLU(x' / max(||x'||, 1e-12) * sqrt(C) * gamma)`` with ``x' = x + bias`` over channels."""
    src, dst = _rows(x), _rows(out)
    if src.shape != dst.shape:
        raise ValueError(f"out {list(out.shape)} must have the shape of x {list(x.shape)}")
    batch, rows, channels = src.shape
    block_r, block_c, grid = _launch(channels, rows, batch)
    _rms_norm_silu_kernel[grid](
        src,
        dst,
        gamma,
        gamma if bias is None else bias,  # unread placeholder without a bias
        rows,
        channels,
        src.stride(0),
        src.stride(1),
        dst.stride(0),
        dst.stride(1),
        channels**0.5,
        HAS_BIAS=bias is not None,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out


@triton.jit
def _add_bias_kernel(
    y_ptr,
    bias_ptr,
    res_ptr,
    res_bias_ptr,
    R,
    C,
    stride_yb,
    stride_yr,
    stride_rb,
    stride_rr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RESIDUAL_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b, rows64, cols, col_ok, mask = _row_tile(R, C, BLOCK_R, BLOCK_C)
    y_ptrs = y_ptr + b * stride_yb + rows64 * stride_yr + cols[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + _per_channel(bias_ptr, cols, col_ok)
    if HAS_RESIDUAL:
        residual = tl.load(res_ptr + b * stride_rb + rows64 * stride_rr + cols[None, :], mask=mask, other=0.0)
        y += residual.to(tl.float32)
    if HAS_RESIDUAL_BIAS:
        y += _per_channel(res_bias_ptr, cols, col_ok)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_bias_(
    y: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: ``y += bias`` and, given a residual, ``+ residual (+ residual_bias)``, per channel."""
    dst = _rows(y)
    res = dst if residual is None else _rows(residual)
    if res.shape != dst.shape:
        raise ValueError(f"residual {list(residual.shape)} must have the shape of y {list(y.shape)}")
    batch, rows, channels = dst.shape
    block_r, block_c, grid = _launch(channels, rows, batch)
    _add_bias_kernel[grid](
        dst,
        bias,
        res,
        bias if residual_bias is None else residual_bias,  # unread placeholder
        rows,
        channels,
        dst.stride(0),
        dst.stride(1),
        res.stride(0),
        res.stride(1),
        HAS_RESIDUAL=residual is not None,
        HAS_RESIDUAL_BIAS=residual_bias is not None,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return y
