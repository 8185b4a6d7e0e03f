"""Triton int8 quantizer and W8A8 GEMM against the PyTorch reference in turbovideo.models.int8.

Without a GPU the kernels run in Triton's interpreter (conftest.py turns it on); on a GPU the same
tests run the compiled kernels. Both must match the reference bit for bit.
"""

import pytest
import torch
import torch.nn.functional as F
from turbovideo.kernels import gluon_hopper, int8_gemm_ws, norms
from turbovideo.kernels.gpu import GpuLimits
from turbovideo.kernels.int8_gemm import WARP_SPECIALIZED, GemmLaunch, gemm_launch, int8_gemm, int8_linear
from turbovideo.kernels.quant import gelu_tanh_quantize, quantize_blockwise
from turbovideo.kernels.rounding import INTERPRETED

from turbovideo.models import int8 as reference

DEVICE = "cpu" if INTERPRETED else "cuda"
_HOPPER = not INTERPRETED and torch.cuda.get_device_capability()[0] >= 9
# The device's own launch, Hopper's 64-row tiles, the pointer loads of GPUs without TMA, and Hopper's
# warp-specialized Gluon kernel (compiled only: Triton's interpreter does not run Gluon).
_POINTERS = GemmLaunch(128, 128, 8, 3, tma=False)
LAUNCHES = pytest.mark.parametrize(
    "launch",
    [
        None,
        GemmLaunch(64, 128, 4, 3, group_m=32),
        _POINTERS,
        pytest.param(
            WARP_SPECIALIZED,
            marks=pytest.mark.skipif(
                not (_HOPPER and gluon_hopper.available()), reason="needs Hopper and Gluon"
            ),
        ),
    ],
    ids=["device", "64-row", "pointers", "warp-specialized"],
)
# Quantizing on load needs whole 128-row scale tiles.
QUANTIZING_LAUNCHES = pytest.mark.parametrize("launch", [None, _POINTERS], ids=["device", "pointers"])


def _bf16(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bfloat16, device=DEVICE)


def test_quantizer_rounds_ties_to_even_and_saturates() -> None:
    # amax 64 -> multiplier 2: x*2 lands exactly on .5 ties; +amax maps to 128 and saturates to 127.
    values = [0.25, 0.75, 1.25, 1.75, -0.25, -0.75, -1.25, 3.25, 64.0, -64.0, 0.0, 31.75]
    x = torch.zeros(128, 128, dtype=torch.bfloat16, device=DEVICE)
    x[5, : len(values)] = _bf16([values])
    q, scale = quantize_blockwise(x)
    expected = [0, 2, 2, 4, 0, -2, -2, 6, 127, -128, 0, 64]
    assert q[5, : len(values)].tolist() == expected
    assert scale.tolist() == [[0.5]]  # 64 / 128
    assert torch.count_nonzero(q).item() == len(values) - 3


def test_quantizer_all_zero_tile_uses_the_amax_floor() -> None:
    x = torch.zeros(130, 256, dtype=torch.bfloat16, device=DEVICE)
    x[129, 200] = 3.0  # only the second row tile, second column tile is non-zero
    q, scale = quantize_blockwise(x)
    floor = torch.tensor(1e-8, dtype=torch.float32) / 128
    assert scale.shape == (2, 2)
    assert scale[0, 0].item() == scale[0, 1].item() == scale[1, 0].item() == floor.item()
    assert scale[1, 1].item() == 3.0 / 128
    assert torch.count_nonzero(q).item() == 1 and q[129, 200].item() == 127


@pytest.mark.parametrize(
    ("shape", "spread"),
    [((2, 100, 256), 1.0), ((1, 300, 384), 30.0), ((3, 45, 200), 1e-3)],
    ids=["tiles-straddle-samples", "three-row-tiles", "ragged-k"],
)
def test_quantizer_matches_reference_bit_for_bit(shape: tuple[int, int, int], spread: float) -> None:
    x = (torch.randn(shape, device=DEVICE) * spread).to(torch.bfloat16)
    x[0, 3, :7] = 0.0  # a few exact zeros and a tile-wide outlier
    x[-1, -1, 5] = 40.0 * spread
    q, scale = quantize_blockwise(x)
    ref_q, ref_scale = reference.quantize_blockwise(x.reshape(-1, shape[-1]))
    assert q.shape == x.shape and q.dtype == torch.int8
    assert torch.equal(q.reshape(-1, shape[-1]), ref_q)
    assert torch.equal(scale, ref_scale)


def test_gelu_quantizer_equals_quantizing_the_gelu_output() -> None:
    x = (torch.randn(2, 150, 384, device=DEVICE) * 3).to(torch.bfloat16)
    x[0, 0, :4] = torch.tensor([0.0, -30.0, 30.0, -0.5])  # zero, both saturated tails, the negative dip
    q, scale = gelu_tanh_quantize(x)
    ref_q, ref_scale = reference.quantize_blockwise(F.gelu(x, approximate="tanh").reshape(-1, 384))
    # The kernel's GELU formula lands within a few fp32 ulps of PyTorch's; after bf16 rounding that
    # moves at most rare values by one int8 step.
    step = (q.reshape(-1, 384).int() - ref_q.int()).abs()
    assert step.max().item() <= 1 and (step > 0).float().mean().item() < 1e-3
    assert torch.allclose(scale, ref_scale, rtol=2**-7, atol=0)
    assert q[0, 0, :3].tolist() == [0, 0, 127]  # GELU(30) = 30 is the tile's amax


def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = torch.randn(n, k, device=DEVICE) / k**0.5
    weight[0, :] *= 20.0  # one tile row with a much larger scale
    q, scale = reference.quantize_blockwise(weight)
    bias = (0.1 * torch.randn(n, device=DEVICE)).to(torch.bfloat16)
    return q, scale, bias


@pytest.mark.parametrize(
    ("batch", "length", "k", "n"),
    [(2, 100, 256, 128), (1, 200, 384, 200), (3, 37, 256, 256), (1, 50, 200, 136), (2, 70, 256, 768)],
    ids=["b2-k256-n128", "m200-k384-n200", "b3-odd-n256", "ragged-k200", "wide-n768"],
)
@LAUNCHES
def test_gemm_on_prequantized_activation_matches_reference(
    batch: int, length: int, k: int, n: int, launch: GemmLaunch | None
) -> None:
    x = torch.randn(batch, length, k, device=DEVICE).to(torch.bfloat16)
    qx, sx = quantize_blockwise(x)
    qw, sw, bias = _weight(n, k)
    if launch == WARP_SPECIALIZED and not int8_gemm_ws.takes_k(k):  # gemm_launch never gives it these
        with pytest.raises(ValueError, match="in pairs"):
            int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch)
        return
    out = int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch)
    assert out.shape == (batch, length, n) and out.dtype == torch.bfloat16
    expected = reference.int8_gemm_reference(qx.reshape(-1, k), sx, qw, sw).to(torch.bfloat16) + bias
    assert torch.equal(out.reshape(-1, n), expected)
    if launch == WARP_SPECIALIZED:  # Triton 3.6 cannot compile it without a bias (Wan's linears all have one)
        with pytest.raises(ValueError, match="needs a bias"):
            int8_gemm(qx, qw, sw, None, a_scale=sx, launch=launch)
        return
    no_bias = int8_gemm(qx, qw, sw, None, a_scale=sx, launch=launch).reshape(-1, n)
    assert torch.equal(
        no_bias, reference.int8_gemm_reference(qx.reshape(-1, k), sx, qw, sw).to(torch.bfloat16)
    )


@pytest.mark.parametrize("gate", ["per-sample", "shared", "none"])
@LAUNCHES
def test_gemm_adds_the_gated_residual_as_the_norm_kernels_do(gate: str, launch: GemmLaunch | None) -> None:
    # Two samples of 70 rows: 64-row tiles straddle them, so a per-sample gate changes within a tile.
    batch, length, k, n = 2, 70, 256, 200
    x = torch.randn(batch, length, k, device=DEVICE).to(torch.bfloat16)
    qx, sx = quantize_blockwise(x)
    qw, sw, bias = _weight(n, k)
    stream = torch.randn(batch, length, n, device=DEVICE).to(torch.bfloat16)
    gates = {
        "per-sample": torch.randn(batch, 1, n, device=DEVICE),
        "shared": torch.randn(1, 1, n, device=DEVICE),
    }
    gate_rows = gates.get(gate)
    out = int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, residual=(stream, gate_rows))
    product = int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch)
    assert torch.equal(out, norms.gated_residual(stream, product, gate_rows))
    flat = (qx.reshape(-1, k), sx)
    expected = reference.int8_linear_reference(
        reference.QuantizedActivation(*flat), qw, sw, bias, residual=(stream, gate_rows)
    )
    assert torch.equal(out, expected)
    assert not torch.equal(out, product)
    with pytest.raises(ValueError, match="residual stream"):
        int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, residual=(stream[:, :, :128], None))


@LAUNCHES
def test_gemm_writes_each_rows_sums_of_squares_per_128_columns(launch: GemmLaunch | None) -> None:
    # 200 columns: the second 128-column tile is partial; rows of very different sizes.
    batch, length, k, n = 2, 70, 256, 200
    x = torch.randn(batch, length, k, device=DEVICE) * torch.exp(torch.randn(batch, length, 1, device=DEVICE))
    qx, sx = quantize_blockwise(x.to(torch.bfloat16))
    qw, sw, bias = _weight(n, k)
    sums = torch.full((batch * length, 2), float("nan"), device=DEVICE)
    out = int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, square_sums=sums)
    assert torch.equal(out, int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch))
    # Summed in another order than PyTorch's.
    torch.testing.assert_close(sums, reference.chunk_square_sums(out.reshape(-1, n)), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"square_sums must be a contiguous fp32 \(140, 2\)"):
        int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, square_sums=sums[:, :1])
    stream = torch.zeros(batch, length, n, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="not with a residual"):
        int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, residual=(stream, None), square_sums=sums)


@LAUNCHES
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "own-output"])
def test_gemm_writes_each_rows_moments_per_128_columns(
    launch: GemmLaunch | None, with_residual: bool
) -> None:
    # 140 rows: the last row tile is partial; a stream far from zero, so the deviations matter. 384
    # columns: the warp-specialized kernel's 128x128 tiles, whose epilogue partition takes the moments
    # (test_wide_tiles_add_the_residual_and_write_the_moments has its 128x256 ones).
    batch, length, k, n = 2, 70, 256, 384
    qx, sx = quantize_blockwise(torch.randn(batch, length, k, device=DEVICE).to(torch.bfloat16))
    qw, sw, bias = _weight(n, k)
    stream = (torch.randn(batch, length, n, device=DEVICE) * 3 + 20).to(torch.bfloat16)
    residual = (stream, torch.randn(batch, 1, n, device=DEVICE)) if with_residual else None
    moments = torch.full((batch * length, n // 128, 2), float("nan"), device=DEVICE)
    assert int8_gemm_ws.tile_halves(n, None, None, None) == 1
    out = int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, residual=residual, row_moments=moments)
    assert torch.equal(out, int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, residual=residual))
    # Summed in another order than PyTorch's.
    expected = reference.chunk_moments(out.reshape(-1, n))
    torch.testing.assert_close(moments, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"row_moments must be a contiguous fp32 \(140, 3, 2\)"):
        int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, row_moments=moments[:, :1])
    with pytest.raises(ValueError, match="whole 128-column tiles"):
        int8_gemm(qx, qw[:200], sw[:2], bias[:200], a_scale=sx, launch=launch, row_moments=moments)


@pytest.mark.skipif(not (_HOPPER and gluon_hopper.available()), reason="needs Hopper and Gluon")
@pytest.mark.parametrize("gate", ["per-sample", "shared", "none"])
def test_wide_tiles_add_the_residual_and_write_the_moments(gate: str) -> None:
    # The warp-specialized kernel's 128x256 tiles with the stream through its operand ring and the
    # moments from its consumers: two samples of 70 rows (a tile straddles them, the last is partial),
    # two column tiles, four K blocks (two pairs before the stream's).
    batch, length, k, n = 2, 70, 512, 512
    qx, sx = quantize_blockwise(torch.randn(batch, length, k, device=DEVICE).to(torch.bfloat16))
    qw, sw, bias = _weight(n, k)
    stream = (torch.randn(batch, length, n, device=DEVICE) * 3 + 20).to(torch.bfloat16)
    gate_rows = {
        "per-sample": torch.randn(batch, 1, n, device=DEVICE),
        "shared": torch.randn(1, 1, n, device=DEVICE),
    }
    residual = (stream, gate_rows.get(gate))
    moments = torch.full((batch * length, n // 128, 2), float("nan"), device=DEVICE)
    assert int8_gemm_ws.tile_halves(n, None, None, None) == 2
    out = int8_gemm(
        qx, qw, sw, bias, a_scale=sx, launch=WARP_SPECIALIZED, residual=residual, row_moments=moments
    )
    product = int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=WARP_SPECIALIZED)
    assert torch.equal(out, norms.gated_residual(stream, product, residual[1]))
    torch.testing.assert_close(moments, reference.chunk_moments(out.reshape(-1, n)), rtol=1e-5, atol=1e-5)


@LAUNCHES
@pytest.mark.parametrize(
    ("batch", "length"),
    [(2, 70), (3, 50), (1, 140)],
    ids=["tile-straddles-samples", "three-a-tile", "one-sample"],
)
def test_gemm_writes_each_samples_column_amax(launch: GemmLaunch | None, batch: int, length: int) -> None:
    # 200 columns: the second 128-column tile is partial. Samples of very different ranges, so a row
    # counted in the wrong sample changes its amax; 140 or 150 rows: the last row tile is partial.
    k, n = 256, 200
    x = (
        torch.randn(batch, length, k, device=DEVICE)
        * (10.0 ** torch.arange(batch, device=DEVICE))[:, None, None]
    )
    qx, sx = quantize_blockwise(x.to(torch.bfloat16))
    qw, sw, bias = _weight(n, k)
    amax = torch.full((batch, n), float("nan"), device=DEVICE)  # the GEMM starts it from zeros
    out = int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, column_amax=amax)
    assert torch.equal(out, int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch))
    assert torch.equal(amax, reference.sample_column_amax(out.reshape(-1, n), batch))
    with pytest.raises(
        ValueError, match=r"column_amax must be fp32 \[B, 200\] for B samples of the \d+ rows"
    ):
        int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, column_amax=amax.new_zeros(9, n))
    with pytest.raises(ValueError, match="not with other options"):
        int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, residual=(out, None), column_amax=amax)


@LAUNCHES
def test_gemm_quantizes_its_gelu_for_the_next_linear(launch: GemmLaunch | None) -> None:
    # 140 rows: the last 128-row tile is mostly padding, whose rows must quantize as zeros although the
    # kernel computes GELU(bias) there. Column 3's bias is far above what its products leave of it, so
    # counting the padding would change that tile's scale. Columns 128-255 are about their biases, all
    # below 0.5, where the largest |GELU| is a negative one's (column 130's). 400 columns: the last
    # column tile is partial. K: the warp-specialized kernel's GELU needs a long K loop to pay.
    batch, length, k, n = 2, 70, int8_gemm_ws.GELU_MIN_K, 400
    x = torch.randn(batch, length, k, device=DEVICE).abs()
    qx, sx = quantize_blockwise(x.to(torch.bfloat16))
    weight = 0.1 * torch.randn(n, k, device=DEVICE) / k**0.5
    weight[3] = -torch.rand(k, device=DEVICE) / k**0.5
    weight[128:256] *= 1e-3
    qw, sw = reference.quantize_blockwise(weight)
    bias = 0.1 * torch.randn(n, device=DEVICE)
    bias[3], bias[128:256], bias[130] = 2.0, 0.05 * torch.randn(128, device=DEVICE), -0.75
    bias = bias.to(torch.bfloat16)
    values, scales = int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, gelu_int8=True)
    assert values.shape == (batch, length, n) and values.dtype == torch.int8
    expected = gelu_tanh_quantize(int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch))
    assert torch.equal(values, expected[0]) and torch.equal(scales, expected[1])
    assert torch.allclose(scales[:, 1], torch.tensor(0.17 / 128, device=DEVICE), rtol=1e-2)
    # PyTorch's GELU: a rare value one bf16 rounding, so one int8 step, away (as the GELU quantizer).
    exact = reference.int8_linear_reference(
        reference.QuantizedActivation(qx.reshape(-1, k), sx), qw, sw, bias, gelu_int8=True
    )
    assert (values.reshape(-1, n).int() - exact.values.int()).abs().max().item() <= 1
    assert torch.allclose(scales, exact.scales, rtol=2**-7, atol=0)
    stream = torch.zeros(batch, length, n, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="gelu_int8 returns"):
        int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=launch, residual=(stream, None), gelu_int8=True)


@pytest.mark.parametrize(
    ("batch", "length", "k", "n"), [(2, 100, 384, 200), (1, 128, 256, 128), (1, 60, 136, 72)]
)
@QUANTIZING_LAUNCHES
def test_gemm_quantizing_bf16_activation_matches_reference_linear(
    batch: int, length: int, k: int, n: int, launch: GemmLaunch | None
) -> None:
    x = (torch.randn(batch, length, k, device=DEVICE) * 4).to(torch.bfloat16)
    qw, sw, bias = _weight(n, k)
    out = int8_gemm(x, qw, sw, bias, launch=launch)
    expected = reference.int8_linear_reference(x.reshape(-1, k), qw, sw, bias)
    assert torch.equal(out.reshape(-1, n), expected)


def test_gemm_is_the_spec_formula_in_float64() -> None:
    """Anchor independent of the reference: dequantized float64 product, bf16-rounded, then + bias."""
    k, n = 384, 160
    x = torch.randn(2, 70, k, device=DEVICE).to(torch.bfloat16)
    qx, sx = quantize_blockwise(x)
    qw, sw, bias = _weight(n, k)
    out = int8_gemm(qx, qw, sw, bias, a_scale=sx).reshape(-1, n).double()

    def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        tiles = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
        return q.double() * tiles[: q.shape[0], : q.shape[1]]

    exact = dequant(qx.reshape(-1, k), sx) @ dequant(qw, sw).T
    # Two bf16 roundings (product, bias add) allow about 2^-8 relative, plus fp32 accumulation noise.
    error = (out - (exact + bias.double())).abs()
    assert (error <= exact.abs() * 2**-7 + bias.double().abs() * 2**-8 + 1e-3).all()


def test_gemm_rejects_mismatched_operands() -> None:
    qw, sw, bias = _weight(128, 256)
    x = torch.randn(4, 256, device=DEVICE).to(torch.bfloat16)
    with pytest.raises(ValueError, match="a_scale"):
        int8_gemm(quantize_blockwise(x)[0], qw, sw, bias)
    with pytest.raises(ValueError, match="features"):
        int8_gemm(x[:, :128], qw, sw, bias)
    with pytest.raises(ValueError, match="bf16"):
        int8_gemm(x.float(), qw, sw, bias)
    with pytest.raises(ValueError, match="128-row tiles"):
        int8_gemm(x, qw, sw, bias, launch=GemmLaunch(64, 128, 4, 3))
    with pytest.raises(ValueError, match="128-row tiles"):
        int8_gemm(x, qw, sw, bias, launch=WARP_SPECIALIZED)


def test_int8_linear_takes_bf16_or_prequantized_activations() -> None:
    layer = reference.Int8Linear(256, 200).to(DEVICE)
    layer._randomize_(torch.Generator(device=DEVICE).manual_seed(1))
    x = torch.randn(2, 70, 256, device=DEVICE).to(torch.bfloat16)
    prequantized = reference.QuantizedActivation(*quantize_blockwise(x))
    expected = reference.int8_linear_reference(x.reshape(-1, 256), layer.int8_weight, layer.scale, layer.bias)
    reference.set_int8_impl(int8_linear)
    try:
        from_bf16, from_int8 = layer(x), layer(prequantized)
    finally:
        reference.set_int8_impl(None)
    assert from_bf16.shape == from_int8.shape == (2, 70, 200)
    assert torch.equal(from_bf16.reshape(-1, 200), expected)
    assert torch.equal(from_int8, from_bf16)
    # The default implementation: the kernels on CUDA, the reference (same bits) elsewhere.
    assert torch.equal(layer(prequantized), from_bf16)


def test_launch_follows_the_gpu() -> None:
    hopper, a100, ada = GpuLimits(90, 227 * 1024), GpuLimits(80, 163 * 1024), GpuLimits(89, 99 * 1024)
    # Hopper: bulk tensor copies; 64-row tiles on int8 input, whole 128-row scale tiles to quantize on load.
    assert gemm_launch(False, hopper) == GemmLaunch(64, 128, 4, 3, group_m=32, tma=True)
    assert gemm_launch(True, hopper).block_m == 128 and gemm_launch(True, hopper).tma
    # Before Hopper: pointer loads, and only as many stages as shared memory holds.
    assert [gemm_launch(quantize, gpu).num_stages for gpu in (a100, ada) for quantize in (False, True)] == [
        3,
        3,
        3,
        2,
    ]
    assert not any(gemm_launch(quantize, gpu).tma for gpu in (a100, ada) for quantize in (False, True))
    assert gemm_launch(False, None).tma  # the interpreter runs the Hopper path
    # Hopper's products over a video's tokens run the warp-specialized kernel where Gluon is.
    if gluon_hopper.available():
        assert gemm_launch(False, hopper, m=32760, n=1536) == WARP_SPECIALIZED
        assert gemm_launch(False, hopper, m=75600, n=13824) == WARP_SPECIALIZED
    assert gemm_launch(False, hopper, m=512, n=5120) == gemm_launch(False, hopper)  # a prompt's tokens
    assert gemm_launch(False, hopper, m=32760, n=5124) == gemm_launch(False, hopper)  # rows TMA cannot store
    assert not gemm_launch(False, hopper, m=32760, n=1536, k=1664).warp_specialized  # 13 K blocks
    assert not gemm_launch(True, hopper, m=32760, n=1536).warp_specialized
    assert not gemm_launch(False, hopper, m=32760, n=1536, has_bias=False).warp_specialized
    assert not any(gemm_launch(False, gpu, m=32760, n=1536).warp_specialized for gpu in (a100, ada, None))
