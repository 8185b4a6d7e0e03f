"""What the kernels' rounding helpers (kernels/rounding.py) promise about the GPU's arithmetic."""

import pytest
import torch
import triton
import triton.language as tl
from turbovideo.kernels.rounding import INTERPRETED, reciprocal


@triton.jit
def _divide_rows_kernel(a_ptr, b_ptr, quotient_ptr, product_ptr, N: tl.constexpr):
    row = tl.program_id(0)
    cols = row * N + tl.arange(0, N)
    a = tl.load(a_ptr + cols)
    b = tl.load(b_ptr + row)
    tl.store(quotient_ptr + cols, a / b)
    tl.store(product_ptr + cols, a * reciprocal(b))


@pytest.mark.skipif(INTERPRETED, reason="a GPU's approximate division; the interpreter divides exactly")
@pytest.mark.parametrize(
    ("a_scale", "b_scale"),
    [(1.0, 1.0), (1e-3, 1e3), (1e3, 1e-5), (1e-20, 1e-20), (1e30, 1e30), (1.0, 1e37), (1e-38, 1.0)],
)
def test_dividing_rows_by_their_reciprocal_is_tritons_division(a_scale: float, b_scale: float) -> None:
    # The SLA, SageSLA and cross-attention kernels divide each row of a tile by one number as a product
    # with its reciprocal: the same bits only because Triton's fp32 division is that product.
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, n = 4096, 128
    a = torch.randn(rows, n, device="cuda", generator=g) * a_scale
    b = (torch.rand(rows, device="cuda", generator=g) + 0.01) * b_scale
    quotient, product = torch.empty_like(a), torch.empty_like(a)
    _divide_rows_kernel[(rows,)](a, b, quotient, product, N=n)
    assert torch.equal(product, quotient)
