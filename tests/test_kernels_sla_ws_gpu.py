"""Hopper's warp-specialized sparse attention (kernels/sla_ws.py, Gluon) on a GPU; skipped elsewhere.

Triton's interpreter does not run Gluon, so the CPU suite only compiles it (test_kernels_compile.py).
Here it is checked against the Triton kernel, itself checked against float64 math on the CPU.
"""

import pytest
import torch
from turbovideo.kernels import gluon_hopper, sla, sla_ws
from turbovideo.kernels.rounding import INTERPRETED

from turbovideo.benchmark import rel_error

pytestmark = pytest.mark.skipif(
    INTERPRETED
    or not torch.cuda.is_available()
    or torch.cuda.get_device_capability()[0] != 9
    or not gluon_hopper.available(),
    reason="needs a Hopper GPU and Gluon (Triton 3.6 or later)",
)


def _inputs(batch: int, length: int, heads: int, packed: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    if packed:  # strided views of the DiT's fused qkv projection
        q, k, v = torch.randn(batch, length, 3, heads, 128, device="cuda", generator=g).bfloat16().unbind(2)
    else:
        q, k, v = (
            torch.randn(batch, length, heads, 128, device="cuda", generator=g).bfloat16() for _ in range(3)
        )
    weight = torch.randn(128, 128, device="cuda", generator=g) * 0.2 / 128**0.5
    return q, k, v, weight, torch.randn(128, device="cuda", generator=g) * 0.2


@pytest.mark.parametrize(
    ("batch", "length", "heads", "topk", "packed"),
    [
        (2, 1000, 3, 0.25, False),  # B > 1, partial last query and key blocks, an even block count
        (1, 4000, 2, 0.15, True),  # 9 blocks: the last pair repeats its block, masked
        (1, 100, 1, 0.1, True),  # one block, shorter than a query block
        # More query blocks than SMs: each persistent program walks tiles of several heads and samples.
        (2, 5000, 12, 0.1, True),
        (1, 16384, 24, 0.1, False),
    ],
)
@pytest.mark.parametrize("with_linear", [True, False])
def test_equals_the_triton_kernel(batch, length, heads, topk, packed, with_linear):
    q, k, v, weight, bias = _inputs(batch, length, heads, packed)
    assert sla_ws.takes(q, k, v, *sla.SLA_BLOCKS)
    state = sla.linear_state(k, v, sla.SLA_BLOCKS[1])
    index = sla.select_blocks(q, state, topk, sla.SLA_BLOCKS[0])
    linear = (state, weight, bias) if with_linear else None
    warp_specialized = sla.block_sparse_attention(q, k, v, index, *sla.SLA_BLOCKS, linear)
    triton_kernel = sla.block_sparse_attention(
        q, k, v, index, *sla.SLA_BLOCKS, linear, sla.default_sparse_config(*sla.SLA_BLOCKS)
    )
    # The same math with the softmax's running max taken every 128 keys instead of 64: bf16 rounding apart.
    assert rel_error(warp_specialized, triton_kernel) < 4e-3


def test_other_layouts_and_blocks_run_the_triton_kernel():
    q, k, v, _, _ = _inputs(1, 300, 2, packed=False)
    transposed = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, L, D] storage
    assert not sla_ws.takes(transposed, k, v, *sla.SLA_BLOCKS)
    assert not sla_ws.takes(q, k, v, *sla.SAGESLA_SM90_BLOCKS)
    assert not sla_ws.takes(q.half(), k.half(), v.half(), *sla.SLA_BLOCKS)
