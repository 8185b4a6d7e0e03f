"""W8A8 reference (spec §5.3, §5.4): the block quantizer bit for bit, the GEMM against float64, Int8Linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from turbovideo.models import int8
from turbovideo.models.int8 import Int8Linear, int8_gemm_reference, int8_linear_reference, quantize_blockwise


def test_ties_round_half_to_even_and_plus_amax_saturates():
    x = torch.zeros(128, 128)
    values = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.4, 127.5, 128.0, -128.0]
    x[0, : len(values)] = torch.tensor(values)  # amax 128 -> multiplier exactly 1
    q, scale = quantize_blockwise(x.bfloat16())
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q[0, : len(values)].tolist() == [0, 2, 2, 0, -2, -2, 127, 127, 127, -128]
    assert scale.tolist() == [[1.0]]


def test_all_zero_tile_uses_the_amax_floor():
    q, scale = quantize_blockwise(torch.zeros(5, 130))
    assert q.shape == (5, 130) and not q.any()
    assert scale.shape == (1, 2)
    assert torch.equal(scale, torch.full((1, 2), 1e-8, dtype=torch.float32) / 128)


def test_tiles_straddle_samples_and_partial_tiles_pad_with_zeros():
    # Two samples of 100 tokens flattened to M = 200: tile row 0 holds sample 0 and 28 rows of sample 1.
    x = torch.full((2, 100, 200), 0.25)
    x[1, 10, 3] = 8.0  # flattened row 110 -> tile (0, 0)
    x[1, 50, 150] = -4.0  # flattened row 150 -> tile (1, 1), a partial tile in both directions
    q, scale = quantize_blockwise(x.reshape(200, 200))
    assert scale.tolist() == [[8.0 / 128, 0.25 / 128], [0.25 / 128, 4.0 / 128]]
    assert q[0, 0] == 4  # 0.25 * 128/8
    assert q[110, 3] == 127  # +amax saturates
    assert q[0, 150] == 127  # 0.25 is the amax of tile (0, 1)
    assert q[150, 150] == -128 and q[150, 149] == 8


def scaled_problem(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qx = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    sx = torch.rand(-(-m // 128), -(-k // 128), generator=g) * 1e-2 + 1e-4
    sw = torch.rand(-(-n // 128), -(-k // 128), generator=g) * 1e-2 + 1e-4
    return qx, sx, qw, sw


def spec_formula_float64(qx, sx, qw, sw):
    """sum_kb P_kb * (sx[m//128, kb] * sw[n//128, kb]) with no rounding at all."""
    m, k = qx.shape
    out = torch.zeros(m, qw.shape[0], dtype=torch.float64)
    for kb in range(-(-k // 128)):
        cols = slice(kb * 128, (kb + 1) * 128)
        partial = qx[:, cols].double() @ qw[:, cols].double().T
        scale = (
            sx[:, kb].repeat_interleave(128)[:m, None] * sw[:, kb].repeat_interleave(128)[None, : qw.shape[0]]
        )
        out += partial * scale.double()
    return out


def test_gemm_matches_float64_spec_formula():
    problem = scaled_problem(200, 136, 640)  # partial M and N tiles, 5 K blocks
    out = int8_gemm_reference(*problem)
    assert out.dtype == torch.float32
    exact = spec_formula_float64(*problem)
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)
    # The fp32 accumulator is rounded after every K block, not once at the end: by hand, bit for bit.
    qx, sx, qw, sw = problem
    acc = torch.zeros(200, 136, dtype=torch.float32)
    for kb in range(5):
        cols, scales = slice(kb * 128, (kb + 1) * 128), slice(kb, kb + 1)
        one_block = spec_formula_float64(qx[:, cols], sx[:, scales], qw[:, cols], sw[:, scales])
        acc = (acc.double() + one_block).float()
    assert torch.equal(out, acc)
    assert not torch.equal(out, exact.float())  # rounding once would be told apart


def test_gemm_partials_are_exact_at_the_int32_extreme():
    qx = torch.full((3, 256), -128, dtype=torch.int8)
    qw = torch.full((2, 256), -128, dtype=torch.int8)
    ones = torch.ones(1, 2)
    assert torch.equal(int8_gemm_reference(qx, ones, qw, ones), torch.full((3, 2), 2.0 * 2**21))


def test_one_block_gemm_rounds_once():
    qx, sx, qw, sw = scaled_problem(64, 32, 128, seed=3)
    expected = spec_formula_float64(qx, sx, qw, sw).float()
    assert torch.equal(int8_gemm_reference(qx, sx, qw, sw), expected)


def test_linear_rounds_the_product_then_adds_the_bias_in_the_activation_dtype():
    x = torch.randn(10, 256).bfloat16()
    qw, sw = quantize_blockwise(torch.randn(64, 256))
    bias = torch.randn(64).bfloat16()
    y = int8_linear_reference(x, qw, sw, bias)
    qx, sx = quantize_blockwise(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, int8_gemm_reference(qx, sx, qw, sw).bfloat16() + bias)


def test_linear_writes_the_square_sums_of_its_output_per_128_columns():
    layer = Int8Linear.from_linear(nn.Linear(128, 200).bfloat16())
    x = torch.randn(3, 7, 128).bfloat16()
    sums = torch.empty(21, 2)
    y = layer(x, square_sums=sums)
    assert torch.equal(y, layer(x))
    flat = y.reshape(21, 200).float()
    expected = torch.stack([flat[:, :128].square().sum(-1), flat[:, 128:].square().sum(-1)], dim=-1)
    torch.testing.assert_close(sums, expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="not with a residual"):
        layer(x, residual=(y, None), square_sums=sums)


def test_linear_writes_the_row_moments_of_what_it_returns():
    layer = Int8Linear.from_linear(nn.Linear(128, 256).bfloat16())
    x = torch.randn(3, 7, 128).bfloat16()
    stream = (torch.randn(3, 7, 256) + 5.0).bfloat16()  # a mean far from zero: the deviations matter
    gate = torch.randn(3, 1, 256)
    moments = torch.empty(21, 2, 2)
    y = layer(x, residual=(stream, gate), row_moments=moments)
    assert torch.equal(y, layer(x, residual=(stream, gate)))
    chunks = y.reshape(21, 2, 128).double()
    mean = chunks.mean(-1)
    expected = torch.stack([mean, (chunks - mean[..., None]).square().sum(-1)], dim=-1)
    torch.testing.assert_close(moments.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(moments, int8.chunk_moments(y.reshape(21, 256)))
    with pytest.raises(ValueError, match="multiple"):
        int8.chunk_moments(torch.zeros(2, 200))


def test_linear_writes_each_samples_column_amax_of_its_output():
    layer = Int8Linear.from_linear(nn.Linear(128, 200).bfloat16())
    x = torch.randn(3, 7, 128).bfloat16()
    x[1, :, :] *= 100.0  # one sample's ranges far above the others'
    amax = torch.full((3, 200), float("nan"))
    y = layer(x, column_amax=amax)
    assert torch.equal(y, layer(x))
    assert torch.equal(amax, y.float().abs().amax(dim=1))
    assert amax[1].min() > amax[0].max() and amax[1].min() > amax[2].max()
    assert torch.equal(amax, int8.sample_column_amax(y.reshape(21, 200), 3))
    with pytest.raises(ValueError, match="column_amax is of a linear's own"):
        layer(x, residual=(y, None), column_amax=amax)
    with pytest.raises(ValueError, match="column_amax is of a linear's own"):
        layer(x, gelu_int8=True, column_amax=amax)


def test_from_linear_is_close_to_the_float_linear():
    linear = nn.Linear(256, 192).bfloat16()
    quantized = Int8Linear.from_linear(linear)
    assert quantized.int8_weight.dtype == torch.int8 and quantized.scale.shape == (2, 2)
    assert quantized.bias.dtype == torch.bfloat16
    error = (quantized.dequantized_weight() - linear.weight.detach().float()).abs()
    step = quantized.scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:192, :256]
    saturated = quantized.int8_weight == 127  # +amax lands on 128 and is clipped one step down
    assert (error[~saturated] <= step[~saturated] / 2 + 1e-7).all()
    assert (error[saturated] <= step[saturated] + 1e-7).all()
    x = torch.randn(3, 7, 256).bfloat16()
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    y = quantized(x)
    assert y.shape == (3, 7, 192)
    assert ((y.float() - expected).norm() / expected.norm()).item() < 2e-2


def test_forward_goes_through_the_installed_implementation():
    calls = []

    def doubled(x, weight, scale, bias):
        calls.append(x.shape)
        return 2 * int8_linear_reference(x, weight, scale, bias)

    layer = Int8Linear.from_linear(nn.Linear(128, 128))
    x = torch.randn(2, 5, 128)
    reference = layer(x)
    int8.set_int8_impl(doubled)
    try:
        assert torch.equal(layer(x), 2 * reference)
    finally:
        int8.set_int8_impl(None)
    assert calls == [(10, 128)]
    assert torch.equal(layer(x), reference)


def test_layer_gives_its_gelu_quantized_for_the_next_linear():
    layer = Int8Linear.from_linear(nn.Linear(128, 200))
    x = torch.randn(2, 70, 128).bfloat16()
    hidden = layer(x, gelu_int8=True)
    assert isinstance(hidden, int8.QuantizedActivation)
    assert hidden.values.shape == (2, 70, 200) and hidden.values.dtype == torch.int8
    values, scales = int8.quantize_blockwise(F.gelu(layer(x).reshape(140, 200), approximate="tanh"))
    assert torch.equal(hidden.values.reshape(140, 200), values) and torch.equal(hidden.scales, scales)
    with pytest.raises(ValueError, match="gelu_int8 returns"):
        layer(x, residual=(torch.zeros(2, 70, 200).bfloat16(), None), gelu_int8=True)
