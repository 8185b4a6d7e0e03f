"""Exact rounding helpers shared by the Triton kernels.

On a GPU they are single instructions (cvt.rn.bf16, div.rn, add.rn). Triton's ``/`` compiles to an
approximate division on GPUs, so kernels that must match PyTorch divide with ``div_rn``. The Triton
interpreter (CPU tests) has no libdevice and truncates fp32 -> bf16 casts, so there the bf16 rounding
is an exact integer emulation that gives the same bits (round half to even).
"""

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def div_rn(a, b):
    """IEEE round-to-nearest fp32 division."""
    return tl.math.div_rn(a, b)


@triton.jit
def reciprocal(x):
    """1 / x as Triton's fp32 ``/`` rounds it (an approximate division on GPUs), for dividing a tile's
    rows by one number each: the tile times each row's reciprocal is the quotient Triton's ``/`` gives,
    whose division is the reciprocal times the dividend, with one reciprocal a row instead of one an
    element."""
    return 1.0 / x


@triton.jit
def inverse_rms(square_sum, n, eps):
    """1 / sqrt(square_sum / n + eps), each step rounded as PyTorch's fp32 norms round it: a norm's 1 / std
    from a row's sum of (centred) squares over ``n`` values."""
    return div_rn(1.0, tl.sqrt_rn(div_rn(square_sum, n * 1.0) + eps))


@triton.jit
def _add_plain(a, b):
    return a + b


# fp32 addition rounded on its own: never contracted with a preceding multiply into an FMA.
add_rn = _add_plain if INTERPRETED else libdevice.add_rn


@triton.jit
def round_to_int8(x):
    """fp32 -> int8, round half to even, for x that rounds into [-128, 127], with a float add, no conversion.

    Adding 1.5 * 2^23 rounds x to an integer as IEEE addition rounds (ties to even) and leaves it in
    the low mantissa bits, in two's complement: the sum's low byte is the int8. Conversion instructions
    issue at a fraction of the add rate: with rint and a float-to-int conversion instead, the GEMM that
    quantizes on load took 17.9 ms at 14B's q/k/v/o shape (then 12.3) and GELU -> int8 1.52 ms (then
    1.28; H200). Taking the low byte instead of subtracting the constant and clamping the integer saves
    those two instructions too.
    """
    return add_rn(x, 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _to_bf16_native(x):
    return x.to(tl.bfloat16)


@triton.jit
def _to_bf16_pairs(x):
    return tl.inline_asm_elementwise(
        "cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.bfloat16, is_pure=True, pack=2
    )


@triton.jit
def _to_bf16_emulated(x):
    # Add half a bf16 ulp (minus one unless the kept lsb is odd), then drop the low 16 bits.
    bits = x.to(tl.uint32, bitcast=True)
    bits += ((bits >> 16) & 1) + 0x7FFF
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)


# fp32 -> bf16, round to nearest even.
to_bf16 = _to_bf16_emulated if INTERPRETED else _to_bf16_native
# The same, two values an instruction (F2FP; Triton's own cast is an F2F a value, a slow conversion
# instruction), for kernels bound by their arithmetic: GELU -> int8 ran 6-9 % faster (H200). Memory-bound
# kernels ran slower with it (the gated residual 0.64 against 0.56-0.57 ms at the 14B width).
to_bf16_pairs = _to_bf16_emulated if INTERPRETED else _to_bf16_pairs


@triton.jit
def _dot_native(a, b, acc=None):
    return tl.dot(a, b, acc)


@triton.jit
def _dot_widened(a, b, acc=None):
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


# The product of bf16 tiles (plus acc), fp32 out. The interpreter multiplies bf16 tiles wrongly (Triton
# 3.9); bf16 values widen exactly, and their products are exact in fp32 either way.
dot_bf16 = _dot_widened if INTERPRETED else _dot_native
