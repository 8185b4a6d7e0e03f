"""Blockwise int8 quantization (upstream-spec §5.3) as Triton building blocks.

A tile of 128 rows x 128 columns of a row-major [M, K] matrix shares one fp32 scale:
amax = max(1e-8, max |x|), q = saturate_int8(round_half_even(x * (128 / amax))), scale = amax / 128.
+amax maps to 128 and saturates to 127. Rows are tiled on the flattened matrix, so a tile may hold
rows of two samples. ``quantize_tile`` is shared by the standalone quantizer below, the GEMM prologue
(kernels/int8_gemm.py) and the norm kernels that emit int8 directly (kernels/norms.py), so every path
produces the same bits; ``quantize_with`` and ``gelu_tanh`` by the GEMM that quantizes its GELU
(kernels/int8_gemm_ws.py, a Gluon kernel: these helpers compile in it too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import INTERPRETED, div_rn, round_to_int8, to_bf16_pairs

QUANT_BLOCK = 128


@triton.jit
def quantize_tile(x):
    """fp32 tile (out-of-range elements loaded as 0) -> (int8 tile, its fp32 scale)."""
    amax = tl.maximum(tl.max(tl.abs(x)), 1e-8)
    return quantize_with(x, amax), amax * (1.0 / 128.0)


@triton.jit
def quantize_with(x, amax):
    """The int8 values of part of a tile whose amax (at least 1e-8) is known: for a kernel that holds a
    tile piece by piece."""
    multiplier = div_rn(128.0, amax)  # IEEE, as the reference divides
    # |x * multiplier| <= 128 (+ rounding): only +128 saturates, clamped before the rounding.
    return round_to_int8(tl.minimum(x * multiplier, 127.0))


@triton.jit
def _exp2_fast(x):
    return tl.inline_asm_elementwise(
        "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _divide_fast(a, b):
    return tl.inline_asm_elementwise(
        "div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _exp2_plain(x):
    return tl.exp2(tl.minimum(x, 127.0))  # finite: NumPy warns where ex2 overflows to inf


@triton.jit
def _divide_plain(a, b):
    return a / b


# The interpreter (CPU tests) runs no PTX: there, NumPy's exp2 and an IEEE division.
_exp2 = _exp2_plain if INTERPRETED else _exp2_fast
_divide = _divide_plain if INTERPRETED else _divide_fast

# -2 sqrt(2/pi) log2(e), and times 0.044715: tanh's argument, doubled and in powers of two.
_GELU_C1 = tl.constexpr(-2.302208198144325)
_GELU_C3 = tl.constexpr(-0.1029432395800235)


@triton.jit
def gelu_tanh(x):
    """PyTorch's tanh-approximate GELU, 0.5 x (1 + tanh(u)), written as x / (1 + 2^(-2u log2 e)).

    The same function without tanh's cancellation where tanh(u) -> -1. The GELU kernel is bound by its
    arithmetic, so this is seven instructions an element: the exponent as x (c1 + c3 x^2), and the
    hardware's approximate exp2 and division without denormals (2 ulp each; a denormal GELU quantizes
    to zero anyway, the tile's amax being at least 1e-8). libdevice's tanhf took 2.7x the time (H100).
    """
    # Past x ~ -10 the power overflows to inf and the quotient is -0, against a true GELU below 1e-36:
    # both quantize to zero.
    return _divide(x, 1.0 + _exp2(x * (_GELU_C1 + _GELU_C3 * (x * x))))


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm, K_BLOCKS, GELU: tl.constexpr, BLOCK: tl.constexpr
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:  # the bf16 tensor the unfused GELU would write (GELU(0) = 0 keeps the padding zero)
        x = to_bf16_pairs(gelu_tanh(x)).to(tl.float32)
    q, scale = quantize_tile(x)
    tl.store(q_ptr + rows64 * stride_qm + cols[None, :], q, mask=mask)
    tl.store(scale_ptr + pid_m * K_BLOCKS + pid_k, scale)


def scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the per-tile scale grid of a [rows, cols] matrix."""
    return triton.cdiv(rows, QUANT_BLOCK), triton.cdiv(cols, QUANT_BLOCK)


def quantize_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a bf16/fp16 ``[..., K]`` activation per 128x128 tile of its flattened ``[M, K]`` view.

    Returns int8 ``[..., K]`` and fp32 scales ``[ceil(M/128), ceil(K/128)]``.
    """
    return _quantize(x, gelu=False)


def gelu_tanh_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_blockwise(gelu_tanh(x))`` in one pass, for the FFN's second linear.

    The GELU output is rounded to x's dtype before quantization, as the unfused ops do. Its fp32
    value is within a few ulps of PyTorch's (another formula, fast exp and division), so a rare
    element can land one bf16 rounding, and then at most one int8 step, apart; on an H100 none of
    the 1.3 billion elements of the two Wan ffn widths did.
    """
    return _quantize(x, gelu=True)


def _quantize(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    allowed = (torch.bfloat16,) if gelu else (torch.bfloat16, torch.float16)
    if x.dtype not in allowed:
        raise ValueError(f"int8 activation quantization takes {', '.join(map(str, allowed))}, got {x.dtype}")
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows, cols = flat.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scales = torch.empty(scale_shape(rows, cols), dtype=torch.float32, device=x.device)
    grid = scales.shape
    _quantize_kernel[grid](
        flat,
        q,
        scales,
        rows,
        cols,
        flat.stride(0),
        q.stride(0),
        grid[1],
        GELU=gelu,
        BLOCK=QUANT_BLOCK,
        num_warps=16 if gelu else 8,  # GELU's arithmetic wants more warps in flight (H100 sweep)
    )
    return q.view(x.shape), scales
