"""Exact rounding helpers shared by the Triton kernels.

On a GPU they are single instructions (cvt.rni, cvt.rn.bf16, div.rn). Triton's ``/`` compiles to an
approximate division on GPUs, so kernels that must match PyTorch divide with ``div_rn``. The Triton
interpreter (CPU tests) has no libdevice and truncates fp32 -> bf16 casts, so there the two roundings
are exact integer/float emulations that give the same bits: round half to even in both cases.
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
def _rint_emulated(x):
    whole = tl.floor(x)
    frac = x - whole  # exact: x and floor(x) share the exponent range
    whole_is_odd = (whole - 2.0 * tl.floor(0.5 * whole)) == 1.0
    round_up = (frac > 0.5) | ((frac == 0.5) & whole_is_odd)
    return tl.where(round_up, whole + 1.0, whole)


@triton.jit
def _to_bf16_native(x):
    return x.to(tl.bfloat16)


@triton.jit
def _to_bf16_emulated(x):
    # Add half a bf16 ulp (minus one unless the kept lsb is odd), then drop the low 16 bits.
    bits = x.to(tl.uint32, bitcast=True)
    bits += ((bits >> 16) & 1) + 0x7FFF
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)


# fp32 -> fp32 integral value, ties to even.
round_half_even = _rint_emulated if INTERPRETED else libdevice.rint
# fp32 -> bf16, round to nearest even.
to_bf16 = _to_bf16_emulated if INTERPRETED else _to_bf16_native
