"""Fused norm / modulation / residual / RMSNorm+RoPE kernels against the DiT's PyTorch reference ops.

Without a GPU the kernels run in Triton's interpreter (conftest.py turns it on). Element-wise math
is bit-exact; LayerNorm and RMSNorm statistics are summed in a different order than PyTorch, so in
rare elements an intermediate differs by one bf16 ulp (checked against the magnitude of the summed
terms, since a cancelling sum turns it into more ulps of the small result).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from turbovideo.kernels import norms
from turbovideo.kernels.rope import rms_norm, rms_norm_rope
from turbovideo.kernels.rounding import INTERPRETED

from turbovideo.models.int8 import chunk_moments, quantize_blockwise
from turbovideo.models.layers import RMSNorm, apply_rope, rope_angles

DEVICE = "cpu" if INTERPRETED else "cuda"
EPS = 1e-6


def _assert_one_rounding_apart(out: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor) -> None:
    """out may differ from expected by an intermediate's rounding carried through, plus the final
    rounding on the other side: two bf16 ulps of the largest term that was summed (``terms``, fp32).

    Statistics summed in another order move an intermediate by an ulp at most; where the final sum
    cancels (e.g. shift close to -h * (1 + scale)) that is several ulps of the small result.
    """
    assert out.dtype == expected.dtype == torch.bfloat16 and out.shape == expected.shape
    error = (out.float() - expected.float()).abs()
    assert (error <= terms * 2**-6).all()
    assert (error > 0).float().mean().item() < 0.01  # and only where a rounding was a near-tie


def _stream(batch: int, length: int, dim: int) -> torch.Tensor:
    # A non-zero mean and a spread of magnitudes make the LayerNorm statistics matter.
    x = torch.randn(batch, length, dim, device=DEVICE) * torch.linspace(0.5, 4.0, dim, device=DEVICE) + 0.7
    return x.to(torch.bfloat16)


def _modulation(batch: int, dim: int) -> tuple[torch.Tensor, ...]:
    """The block's six fp32 [B, 1, D] modulation rows, as views into one [B, 6, D] tensor."""
    return (torch.randn(batch, 6, dim, device=DEVICE) * 0.5).chunk(6, dim=1)


def _layer_norm_ref(x: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, EPS).to(torch.bfloat16)


def _modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (_layer_norm_ref(x).float() * (1 + scale) + shift).to(torch.bfloat16)


# The last is wider than 2048, where rows are reduced in wider steps (kernels.norms._row_pass_shape).
SHAPES = [(2, 37, 64), (1, 45, 320), (3, 50, 256), (1, 1000, 2304)]
SHAPE_IDS = ["tiny-dim-b2", "odd-dim", "tiles-straddle-samples", "wide-rows"]


@pytest.mark.parametrize(("batch", "length", "dim"), SHAPES, ids=SHAPE_IDS)
def test_layer_norm_modulate_matches_reference(batch: int, length: int, dim: int) -> None:
    x = _stream(batch, length, dim)
    shift, scale, *_ = _modulation(batch, dim)
    out = norms.layer_norm_modulate(x, shift, scale, EPS)
    terms = (_layer_norm_ref(x).float() * (1 + scale)).abs() + shift.abs()
    _assert_one_rounding_apart(out, _modulate_ref(x, shift, scale), terms)


@pytest.mark.parametrize(("batch", "length", "dim"), SHAPES, ids=SHAPE_IDS)
def test_layer_norm_emits_int8_tiles_of_its_bf16_output(batch: int, length: int, dim: int) -> None:
    x = _stream(batch, length, dim)
    shift, scale, *_ = _modulation(batch, dim)
    q, q_scale = norms.layer_norm_modulate(x, shift, scale, EPS, quantize=True)
    ref_q, ref_scale = quantize_blockwise(norms.layer_norm_modulate(x, shift, scale, EPS).reshape(-1, dim))
    assert torch.equal(q.reshape(-1, dim), ref_q)
    assert torch.equal(q_scale, ref_scale)


def test_affine_layer_norm_matches_reference() -> None:
    x = _stream(2, 41, 192)
    weight = 1 + 0.1 * torch.randn(192, device=DEVICE)
    bias = 0.1 * torch.randn(192, device=DEVICE)
    terms = (_layer_norm_ref(x).float() * weight).abs() + bias.abs()
    _assert_one_rounding_apart(
        norms.layer_norm_affine(x, weight, bias, EPS), _layer_norm_ref(x, weight, bias), terms
    )
    q, q_scale = norms.layer_norm_affine(x, weight, bias, EPS, quantize=True)
    ref_q, ref_scale = quantize_blockwise(norms.layer_norm_affine(x, weight, bias, EPS).reshape(-1, 192))
    assert torch.equal(q.reshape(-1, 192), ref_q) and torch.equal(q_scale, ref_scale)


@pytest.mark.parametrize("affine", [False, True], ids=["modulate", "affine"])
def test_layer_norm_from_row_moments_equals_its_own_statistics(affine: bool) -> None:
    """The statistics merged from the per-128-column moments an int8 GEMM writes round differently
    from the statistics pass's, so a rare value lands one int8 step away."""
    batch, length, dim = 2, 70, 384
    x = _stream(batch, length, dim) + 30.0  # a mean far from zero: the merge must keep the deviations
    moments = chunk_moments(x.reshape(-1, dim))
    if affine:
        weight, bias = 1 + 0.1 * torch.randn(dim, device=DEVICE), 0.1 * torch.randn(dim, device=DEVICE)
        norm = functools.partial(norms.layer_norm_affine, x, weight, bias, EPS, quantize=True)
    else:
        shift, scale, *_ = _modulation(batch, dim)
        norm = functools.partial(norms.layer_norm_modulate, x, shift, scale, EPS, quantize=True)
    (q, q_scale), (ref_q, ref_scale) = norm(moments=moments), norm()
    step = (q.int() - ref_q.int()).abs()
    assert step.max().item() <= 1 and (step > 0).float().mean().item() < 1e-3
    torch.testing.assert_close(q_scale, ref_scale, rtol=2**-7, atol=0)
    with pytest.raises(ValueError, match=r"moments must be fp32 \[140, D / 128, 2\]"):
        norm(moments=moments[:, :2])
    with pytest.raises(ValueError, match="int8 LayerNorm without a residual"):
        norms.layer_norm_modulate(x, *_modulation(batch, dim)[:2], EPS, moments=moments)


def test_gated_residual_rounds_product_then_sum() -> None:
    x = _stream(2, 33, 160)
    update = torch.randn(2, 33, 160, device=DEVICE).to(torch.bfloat16)
    gate = _modulation(2, 160)[2]
    assert torch.equal(norms.gated_residual(x, update, gate), x + update * gate.to(torch.bfloat16))
    assert torch.equal(norms.gated_residual(x, update, None), x + update)


def test_residual_then_norm_in_one_pass_equals_the_two_steps() -> None:
    batch, length, dim = 2, 70, 192
    x = _stream(batch, length, dim)
    update = torch.randn(batch, length, dim, device=DEVICE).to(torch.bfloat16)
    shift, scale, gate, *_ = _modulation(batch, dim)
    weight = 1 + 0.1 * torch.randn(dim, device=DEVICE)
    bias = 0.1 * torch.randn(dim, device=DEVICE)
    stream = x + update * gate.to(torch.bfloat16)

    new_x, normed = norms.residual_layer_norm_affine(x, update, gate, weight, bias, EPS)
    assert torch.equal(new_x, stream)
    assert torch.equal(normed, norms.layer_norm_affine(stream, weight, bias, EPS))

    new_x, (q, q_scale) = norms.residual_layer_norm_modulate(
        x, update, None, shift, scale, EPS, quantize=True
    )
    assert torch.equal(new_x, x + update)
    ref_q, ref_scale = norms.layer_norm_modulate(x + update, shift, scale, EPS, quantize=True)
    assert torch.equal(q, ref_q) and torch.equal(q_scale, ref_scale)


def test_modulation_is_per_sample() -> None:
    x = _stream(1, 20, 64).repeat(2, 1, 1)
    shift, scale, *_ = _modulation(2, 64)
    out = norms.layer_norm_modulate(x, shift, scale, EPS)
    terms = (_layer_norm_ref(x[1:]).float() * (1 + scale[1:])).abs() + shift[1:].abs()
    _assert_one_rounding_apart(out[1:], _modulate_ref(x[1:], shift[1:], scale[1:]), terms)
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize(
    ("batch", "grid", "heads", "head_dim"),
    [(2, (3, 4, 5), 2, 32), (1, (2, 3, 3), 3, 128), (1, (1, 3, 3), 20, 128), (1, (1, 1, 5), 12, 128)],
    # The last two are taken in column steps, two rows a program: 2560 wide, and 1.3B's 1536 with an odd
    # row count (the last program's second row masked).
    ids=["tiny-b2", "head128", "rows-in-chunks", "1.3B-width"],
)
def test_rms_norm_rope_matches_reference(
    batch: int, grid: tuple[int, int, int], heads: int, head_dim: int
) -> None:
    length, dim = grid[0] * grid[1] * grid[2], heads * head_dim
    x = (torch.randn(batch, length, dim, device=DEVICE) * 3).to(torch.bfloat16)
    norm = RMSNorm(dim, EPS).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, device=DEVICE))
    angles = rope_angles(grid, head_dim, DEVICE)
    out = rms_norm_rope(x, norm.weight.detach(), torch.cos(angles), torch.sin(angles), EPS)
    expected = apply_rope(norm(x).unflatten(-1, (heads, head_dim)), angles.cos(), angles.sin()).flatten(-2)
    pairs = expected.float().unflatten(-1, (-1, 2))
    magnitude = pairs.norm(dim=-1, keepdim=True).expand_as(pairs).flatten(-2)  # a rotation keeps it
    _assert_one_rounding_apart(out, expected, magnitude)


# cross-attention's k (512-ish rows), and rows taken in column steps
@pytest.mark.parametrize(("rows", "dim"), [(300, 64), (7, 2560)], ids=["narrow", "rows-in-chunks"])
def test_rms_norm_without_rotation_matches_reference(rows: int, dim: int) -> None:
    x = (torch.randn(2, rows, dim, device=DEVICE) * 3).to(torch.bfloat16)
    norm = RMSNorm(dim, EPS).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, device=DEVICE))
        expected = norm(x)
    _assert_one_rounding_apart(rms_norm(x, norm.weight.detach(), EPS), expected, expected.float().abs())


def test_norm_kernels_reject_fp32_streams() -> None:
    shift, scale, *_ = _modulation(1, 64)
    with pytest.raises(ValueError, match="bf16"):
        norms.layer_norm_modulate(torch.randn(1, 8, 64, device=DEVICE), shift, scale)
