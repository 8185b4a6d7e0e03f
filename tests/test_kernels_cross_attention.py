"""The fused cross-attention kernel (kernels/cross_attention.py) against PyTorch's attention, quantized.

Without a GPU the kernel runs in Triton's interpreter (conftest.py); on a GPU the compiled kernel runs.
The attention's own rounding (bf16 probabilities, another summation order) may move an int8 value by
one step; anything structural (a wrong sample's text, a missing bias or scale) moves many by far more.
"""

import pytest
import torch
import torch.nn.functional as F
from turbovideo.kernels.cross_attention import cross_attention_quantized
from turbovideo.kernels.quant import quantize_blockwise
from turbovideo.kernels.rounding import INTERPRETED

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
    # Each sample's text differs, so a row attending to another sample's keys shows.
    v += torch.arange(batch)[:, None, None]
    bias = None
    if with_bias:  # the padding's stand-in keys carry log(copies)
        bias = torch.zeros(1, 1, 1, keys)
        bias[..., keys // 2 :] = 2.5
    q, k, v = (t.bfloat16().to(DEVICE) for t in (q, k, v))
    bias = bias.bfloat16().to(DEVICE) if bias is not None else None
    values, scales = cross_attention_quantized(q, k, v, bias, heads)

    mask = bias.float() if bias is not None else None
    attention = F.scaled_dot_product_attention(
        _heads(q, heads), _heads(k, heads), _heads(v, heads), attn_mask=mask
    )
    expected, expected_scales = quantize_blockwise(attention.transpose(1, 2).flatten(2).bfloat16())
    assert values.shape == (batch, length, dim) and values.dtype == torch.int8
    assert scales.shape == expected_scales.shape
    torch.testing.assert_close(scales, expected_scales, rtol=1e-2, atol=0)
    steps = (values.int() - expected.int()).abs()
    assert steps.max() <= 1
    assert (steps == 0).float().mean() > 0.8


def test_cross_attention_takes_128_wide_heads_only() -> None:
    q = torch.zeros(1, 4, 128, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="128-wide heads, not 128 / 2"):
        cross_attention_quantized(q, q, q, None, num_heads=2)
