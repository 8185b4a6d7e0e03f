"""The fused cross-attention kernel (kernels/cross_attention.py) against PyTorch's RMSNorm of q and its
attention, quantized.

Without a GPU the kernel runs in Triton's interpreter (conftest.py); on a GPU the compiled kernel runs.
The attention's own rounding (bf16 probabilities, another summation order) and the RMSNorm's, folded
into the scores and keys, may move an int8 value by one step; anything structural (a wrong sample's text, a missing
bias or scale, another row's norm) moves many by far more.
"""

import pytest
import torch
import torch.nn.functional as F
from turbovideo.kernels.cross_attention import cross_attention_quantized
from turbovideo.kernels.quant import quantize_blockwise
from turbovideo.kernels.rounding import INTERPRETED

from turbovideo.models.int8 import chunk_square_sums
from turbovideo.models.layers import RMSNorm

DEVICE = "cpu" if INTERPRETED else "cuda"


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2).float()


@pytest.mark.parametrize(
    ("batch", "length", "heads", "keys", "with_bias"),
    [(2, 150, 2, 48, True), (3, 37, 1, 70, False), (1, 128, 2, 5, True)],
    ids=["tile-straddles-samples", "three-samples-a-tile-two-key-blocks", "one-tile"],
)
def test_cross_attention_writes_the_quantized_attention(
    batch: int, length: int, heads: int, keys: int, with_bias: bool
) -> None:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    dim = heads * 128
    q, k, v = (torch.randn(batch, rows, dim, generator=g) for rows in (length, keys, keys))
    # Rows of very different sizes and channels of different weights: the norm must see its own row.
    q *= torch.exp(2 * torch.randn(batch, length, 1, generator=g))
    norm = RMSNorm(dim, eps=1e-6)
    norm.weight.data = 0.5 + torch.rand(dim, generator=g)
    # Each sample's text differs, so a row attending to another sample's keys shows.
    v += torch.arange(batch)[:, None, None]
    bias = None
    if with_bias:  # the padding's stand-in keys carry log(copies)
        bias = torch.zeros(1, 1, 1, keys)
        bias[..., keys // 2 :] = 2.5
    q, k, v = (t.bfloat16().to(DEVICE) for t in (q, k, v))
    bias = bias.bfloat16().to(DEVICE) if bias is not None else None
    norm = norm.to(DEVICE)
    weighted_k = (k.float() * norm.weight.data).bfloat16()  # q's norm weight goes into the keys
    values, scales = cross_attention_quantized(
        q, weighted_k, v, bias, heads, q_square_sums=chunk_square_sums(q.reshape(-1, dim)), eps=norm.eps
    )

    mask = bias.float() if bias is not None else None
    attention = F.scaled_dot_product_attention(
        _heads(norm(q), heads), _heads(k, heads), _heads(v, heads), attn_mask=mask
    )
    attention_rows = attention.transpose(1, 2).flatten(2)
    expected, expected_scales = quantize_blockwise(attention_rows.bfloat16())
    assert values.shape == (batch, length, dim) and values.dtype == torch.int8
    assert scales.shape == expected_scales.shape
    torch.testing.assert_close(scales, expected_scales, rtol=1e-2, atol=0)
    steps = (values.int() - expected.int()).abs()
    # One step of rounding; one more in a tile whose amax rounded to a neighbouring bf16 value, which
    # rescales the whole tile (by up to 0.8 %: most of a step near the amax).
    rescaled = (scales != expected_scales).int().repeat_interleave(128, 0)[: batch * length]
    allowed = 1 + rescaled.repeat_interleave(128, 1).view(batch, length, dim)
    assert (steps <= allowed).all()
    # Against the fp32 attention, in steps of each tile's scale: half a step of rounding, a step at the
    # saturated amax, and the bf16 rounding before quantization (up to 0.7 steps apart where the values
    # are large in their tile: sample 2's). Equality with the quantized reference says less there: a
    # bf16 rounding apart moves most values by a step.
    tile_scales = scales.repeat_interleave(128, 0)[: batch * length].repeat_interleave(128, 1)
    error = (values.float() * tile_scales.view(batch, length, dim) - attention_rows).abs()
    error /= tile_scales.view(batch, length, dim)
    assert error.max() <= 1.5 and error.mean() <= 0.35


def test_cross_attention_checks_heads_and_norm_inputs() -> None:
    q = torch.zeros(1, 4, 128, dtype=torch.bfloat16, device=DEVICE)
    sums = torch.zeros(4, 1, device=DEVICE)
    norm = {"q_square_sums": sums, "eps": 1e-6}
    with pytest.raises(ValueError, match="128-wide heads, not 128 / 2"):
        cross_attention_quantized(q, q, q, None, num_heads=2, **norm)
    with pytest.raises(ValueError, match=r"q_square_sums must be fp32 \(4, 1\)"):
        cross_attention_quantized(q, q, q, None, num_heads=1, **{**norm, "q_square_sums": sums[:2]})
