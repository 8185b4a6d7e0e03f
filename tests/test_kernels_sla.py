"""Triton SLA kernels against float64 math, run on CPU through the Triton interpreter."""

import os

# conftest.py turns the interpreter on for the whole suite; this covers running the module on its own.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from turbovideo.kernels import sagesla, sla, sla_backends  # noqa: E402
from turbovideo.kernels.gpu import GpuLimits  # noqa: E402

from turbovideo.errors import InputError  # noqa: E402
from turbovideo.models import attention, int8  # noqa: E402
from turbovideo.models.attention import select_attention  # noqa: E402
from turbovideo.models.sla_reference import sla_reference  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="these CPU tests run the kernels in Triton's interpreter",
)


def _pool64(x: torch.Tensor, blk: int) -> torch.Tensor:
    """Block means over L of x [B, H, L, D] with the true count of a partial last block."""
    length = x.shape[2]
    return torch.stack([x[:, :, s : s + blk].mean(dim=2) for s in range(0, length, blk)], dim=2)


def _selection64(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int, blkk: int) -> torch.Tensor:
    """Spec §4.1 steps 1-4 in float64 on [B, H, L, D]; sorted indices [B, H, nQ, kk]."""
    score = _pool64(q, blkq) @ _pool64(k - k.mean(dim=2, keepdim=True), blkk).transpose(-1, -2)
    kk = max(1, min(score.shape[-1], int(topk * score.shape[-1])))
    return score.topk(kk, dim=-1).indices.sort(dim=-1).values


def _sla64(q, k, v, weight, bias, block_index, blkq, blkk):
    """Spec §4.1 steps 5-8 in float64 on [B, L, H, D] inputs for given selected key blocks."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    batch, heads, length, dim = q.shape
    n_q, n_k = block_index.shape[2], -(-length // blkk)
    blocks = torch.zeros(batch, heads, n_q, n_k, dtype=torch.bool)
    blocks.scatter_(-1, block_index.long(), True)
    allowed = blocks.repeat_interleave(blkq, dim=2).repeat_interleave(blkk, dim=3)[:, :, :length, :length]
    logits = (q @ k.transpose(-1, -2)) / dim**0.5
    o_s = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v
    phi_q, phi_k = q.softmax(dim=-1), k.softmax(dim=-1)
    o_l = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / (
        1e-5 + (phi_q * phi_k.sum(dim=2, keepdim=True)).sum(-1, keepdim=True)
    )
    o_l = o_l @ weight.double().T + bias.double()
    return (o_s + o_l).transpose(1, 2)


def _qkv(batch, length, heads, dim, dtype=torch.float32):
    qkv = torch.randn(batch, length, 3, heads, dim).to(dtype)
    return qkv.unbind(2)  # strided views, as the DiT's fused qkv projection yields


def _proj(dim, scale=0.2):
    return torch.randn(dim, dim) * scale / dim**0.5, torch.randn(dim) * scale


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    ("batch", "length", "heads", "dim", "blkq", "blkk", "topk"),
    [
        (1, 300, 2, 128, 128, 64, 0.4),  # the `sla` convention, partial last blocks of both sizes
        (2, 200, 1, 64, 64, 128, 0.5),  # the sagesla-sm90 convention, B > 1
        (1, 97, 3, 32, 32, 16, 0.3),  # odd length, H > 1, small blocks
    ],
)
def test_sla_matches_float64(batch, length, heads, dim, blkq, blkk, topk):
    q, k, v = _qkv(batch, length, heads, dim)
    weight, bias = _proj(dim)
    state = sla.linear_state(k, v, blkk)
    index = sla.select_blocks(q, state, topk, blkq)
    expected_index = _selection64(q.double().transpose(1, 2), k.double().transpose(1, 2), topk, blkq, blkk)
    assert torch.equal(index.long(), expected_index)

    out = sla.sla_attention(q, k, v, weight, bias, topk, blkq, blkk)
    expected = _sla64(q, k, v, weight, bias, index, blkq, blkk)
    assert out.shape == (batch, length, heads, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("blkq", "blkk"), [sla.SLA_BLOCKS, sla.SAGESLA_SM90_BLOCKS])
def test_pointer_loads_equal_bulk_copies(blkq, blkk):
    # GPUs without TMA gather K/V blocks through pointers: same blocks, same zeros past L, same result.
    q, k, v = _qkv(2, 300, 2, 64)  # strided views, partial last blocks
    v = v.contiguous()  # K and V strides differ
    weight, bias = _proj(64)
    configs = (sla.SparseConfig(64, 4, 3, tma=True), sla.SparseConfig(64, 8, 2, tma=False))
    bulk, gathered = (sla.sla_attention(q, k, v, weight, bias, 0.5, blkq, blkk, config) for config in configs)
    assert torch.equal(bulk, gathered)


def test_sparse_launch_follows_the_gpu():
    hopper, ada = GpuLimits(90, 227 * 1024), GpuLimits(89, 99 * 1024)
    assert sla.default_sparse_config(128, 64, 128, hopper) == sla.SparseConfig(64, 4, 3, tma=True)
    # No warpgroup MMA or TMA before Hopper: 8 warps, pointer loads, stages that fit 99 KB.
    assert sla.default_sparse_config(128, 64, 128, ada) == sla.SparseConfig(64, 8, 2, tma=False)
    # fp32 tiles (the test path) take twice the bytes: fewer stages, not more shared memory than there is.
    assert sla.default_sparse_config(128, 64, 128, ada, itemsize=4).num_stages == 1
    assert sla._state_launch(128, 128, hopper, itemsize=4) == (8, 1)
    assert sla._state_launch(128, 128, hopper) == (8, 3)


def test_equal_scores_keep_the_lower_blocks():
    q, k, v = _qkv(1, 300, 2, 32)
    state = sla.linear_state(k, v, 32)
    index = sla.select_blocks(torch.zeros_like(q), state, 0.5, 64)  # every pooled score is 0
    assert index.shape == (1, 2, 5, 5)
    assert (index == torch.arange(5, dtype=torch.int32)).all()


def test_top_blocks_is_a_deterministic_topk():
    score = torch.tensor(
        [
            [0.5, -1.0, 2.0, 2.0, -0.0, 0.0, float("-inf"), 3.0],  # tie at the cut: the lower block wins
            [-3.0, -1.0, -2.0, -1.0, -5.0, -4.0, -6.0, -7.0],  # all negative
        ]
    )
    assert sla.top_blocks(score, 3).tolist() == [[2, 3, 7], [1, 2, 3]]
    assert sla.top_blocks(score, 5).tolist() == [[0, 2, 3, 5, 7], [0, 1, 2, 3, 5]]  # +0.0 above -0.0
    assert sla.top_blocks(score, 8).tolist() == [list(range(8))] * 2
    wide = torch.randn(3, 2, 300)
    expected = wide.topk(40, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(sla.top_blocks(wide, 40).long(), expected)
    with pytest.raises(ValueError, match="kk must be in 1..8"):
        sla.top_blocks(score, 0)


@pytest.mark.parametrize("rows_per_program", [sla.STATE_ROWS_PER_PROGRAM, 48])
def test_linear_state_sums(rows_per_program, monkeypatch):
    # 48 rows: three 16-key blocks per program, so 10 blocks take four programs, the last with one block.
    monkeypatch.setattr(sla, "STATE_ROWS_PER_PROGRAM", rows_per_program)
    q, k, v = _qkv(2, 150, 2, 32)
    state = sla.linear_state(k, v, 16)
    k64, v64 = k.double().transpose(1, 2), v.double().transpose(1, 2)
    phi = k64.softmax(dim=-1)
    torch.testing.assert_close(
        state.kv.double(), (phi.transpose(-1, -2) @ v64).flatten(0, 1), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(state.ksum.double(), phi.sum(dim=2).flatten(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.k_mean.double(), k64.mean(dim=2, keepdim=True), rtol=1e-5, atol=1e-6)
    means = torch.stack(
        [k64[:, :, s : s + 16].mean(2) for s in range(0, 150, 16)], dim=2
    )  # last block: 6 rows
    smooth = means - k64.mean(dim=2, keepdim=True)
    torch.testing.assert_close(state.smooth_k_blocks.double(), smooth, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sla.block_means(q, 64).double(), _pool64(q.double().transpose(1, 2), 64))


def test_full_topk_with_zero_projection_is_dense_attention():
    q, k, v = _qkv(1, 190, 2, 64)
    zeros = torch.zeros(64, 64), torch.zeros(64)
    out = sla.sla_attention(q, k, v, *zeros, topk=1.0)
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_strided_inputs_give_the_contiguous_result():
    q, k, v = _qkv(1, 130, 2, 32)
    assert not q.is_contiguous()
    weight, bias = _proj(32)
    strided = sla.sla_attention(q, k, v, weight, bias, 0.5, 64, 32)
    packed = sla.sla_attention(q.contiguous(), k.contiguous(), v.contiguous(), weight, bias, 0.5, 64, 32)
    torch.testing.assert_close(strided, packed, rtol=0, atol=0)
    # [B, H, L, D] storage seen through a transpose is another layout the kernels must absorb.
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    torch.testing.assert_close(
        sla.sla_attention(q_t, k_t, v_t, weight, bias, 0.5, 64, 32), packed, rtol=0, atol=0
    )


def test_separate_linear_pass_equals_fused_epilogue():
    # Two samples of 140 rows: the separate pass's row tiles straddle them, each sample its own state.
    q, k, v = _qkv(2, 140, 2, 32)
    weight, bias = _proj(32)
    state = sla.linear_state(k, v, 32)
    index = sla.select_blocks(q, state, 0.5, 64)
    fused = sla.block_sparse_attention(q, k, v, index, 64, 32, (state, weight, bias))
    o_s = sla.block_sparse_attention(q, k, v, index, 64, 32)
    separate = sla.add_linear_branch(o_s.transpose(1, 2).contiguous().transpose(1, 2), q, state, weight, bias)
    torch.testing.assert_close(separate, fused, rtol=1e-5, atol=1e-6)
    assert _rel(o_s, fused) > 1e-3  # the linear branch did contribute


# Triton 3.9's interpreter multiplies bf16 bit patterns as integers in tl.dot, so here the 16-bit path is
# checked in fp16 (same kernel code); scripts/bench_kernels.py checks bf16 on a GPU at real shapes.
@pytest.mark.parametrize(
    "batch, length, heads", [(1, 200, 2), (2, 256, 2), (2, 150, 2), (3, 50, 2), (1, 650, 1)]
)
def test_the_quantized_linear_branch_is_the_output_quantized(batch, length, heads):
    # As the int8 o projection reads it: 128-row tiles of [B * L, H * D], each of one sample (the kernel)
    # where B = 1 or L is whole tiles, else straddling samples (a quantize pass of its own). One head of
    # 650 rows: three persistent programs (the interpreter's) share its six tiles, two each.
    q, k, v = (x.to(torch.bfloat16) for x in _qkv(batch, length, heads, 128))
    weight, bias = _proj(128)
    state = sla.linear_state(k, v, 64)
    o_s = torch.randn(batch, heads, length, 128).to(torch.bfloat16).transpose(1, 2)
    values, scales = sla.add_linear_branch(o_s, q, state, weight, bias, quantized=True)
    rows, width = batch * length, heads * 128
    expected = int8.quantize_blockwise(
        sla.add_linear_branch(o_s, q, state, weight, bias).reshape(rows, width)
    )
    assert values.shape == (batch, length, width) and scales.shape == (-(-rows // 128), heads)
    assert torch.equal(values.view(rows, width), expected[0]) and torch.equal(scales, expected[1])
    with pytest.raises(ValueError, match="bf16 q with 128-wide heads"):
        sla.add_linear_branch(o_s.float(), q.float(), state, weight, bias, quantized=True)


def test_half_precision_stays_within_rounding_of_float64():
    q, k, v = _qkv(1, 260, 2, 128, torch.float16)
    weight, bias = _proj(128)
    out = sla.sla_attention(q, k, v, weight, bias, 0.3)
    assert out.dtype == torch.float16
    state = sla.linear_state(k, v, 64)
    index = sla.select_blocks(q, state, 0.3, 128)
    assert _rel(out, _sla64(q, k, v, weight, bias, index, 128, 64)) < 2e-3


def test_tiny_lengths_keep_at_least_one_block():
    assert sla.blocks_to_keep(0.1, 3) == 1
    assert sla.blocks_to_keep(0.15, 512) == 76
    assert sla.blocks_to_keep(1.0, 7) == 7
    q, k, v = _qkv(1, 20, 1, 32)
    out = sla.sla_attention(q, k, v, *_proj(32), topk=0.1)
    assert out.isfinite().all()


def test_rejects_mismatched_inputs():
    q, k, v = _qkv(1, 40, 2, 32)
    with pytest.raises(ValueError, match="one shape"):
        sla.sla_attention(q, k[:, :20], v, *_proj(32), topk=0.5)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        sla.sla_attention(*_qkv(1, 40, 2, 24), *_proj(24), topk=0.5)
    with pytest.raises(ValueError, match="BLKK must be a power of two"):
        sla.sla_attention(q, k, v, *_proj(32), topk=0.5, blkk=48)


def _sparge_lut(block_index: torch.Tensor, n_kblocks: int) -> torch.Tensor:
    """SpargeAttn's LUT from ascending block indices: each the step from the one before (block 0 before
    the first), zero-padded to n_kblocks."""
    steps = torch.diff(block_index, dim=-1, prepend=torch.zeros_like(block_index[..., :1]))
    return torch.nn.functional.pad(steps, (0, n_kblocks - block_index.shape[-1]))


def test_sagesla_lut_decodes_to_the_selected_blocks():
    score = torch.tensor([[[[5.0, 0, 0, 4, 3, 0, 0, 0], [0, 0, 1, 0, 0, 2, 0, 3]]]])
    lut, count = sla.top_block_steps(score, 3)
    assert lut.shape == (1, 1, 2, 8) and lut.dtype == torch.int32
    assert lut[0, 0].tolist() == [[0, 3, 1, 0, 0, 0, 0, 0], [2, 3, 2, 0, 0, 0, 0, 0]]
    assert count.tolist() == [[[3, 3]]]
    # Wider rows with ties, every kk: the steps of top_blocks' indices.
    wide = torch.randint(-3, 4, (3, 5, 70)).float()
    for kk in (1, 2, 17, 69, 70):
        lut, count = sla.top_block_steps(wide, kk)
        assert torch.equal(lut, _sparge_lut(sla.top_blocks(wide, kk), 70)), kk
        assert torch.equal(count, torch.full((3, 5), kk, dtype=torch.int32))


def _sparge_quantize64(x_hnd: torch.Tensor, blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SpargeAttn's per-block quantizer in torch: scale = amax / 127 + 1e-7, round half away, truncate."""
    batch, heads, length, dim = x_hnd.shape
    q = torch.empty(x_hnd.shape, dtype=torch.int8)
    scales = torch.empty(batch, heads, -(-length // blk))
    for i, start in enumerate(range(0, length, blk)):
        block = x_hnd[:, :, start : start + blk].float()
        scale = block.abs().amax(dim=(2, 3)) / 127.0 + 1e-7
        values = block / scale[:, :, None, None]
        q[:, :, start : start + blk] = (values + 0.5 * torch.where(values >= 0, 1.0, -1.0)).to(torch.int8)
        scales[:, :, i] = scale
    return q, scales


@pytest.mark.parametrize("with_mean", [False, True])
def test_sagesla_quantizer_reads_the_dit_layout(with_mean):
    # Values on a 1/4 grid keep the bf16 mean subtraction exact in the interpreter too.
    packed = (torch.randint(-32, 33, (2, 150, 2, 3, 64)) / 4).to(torch.bfloat16)
    x = packed[:, :, 0]  # a strided [B, L, H, D] view, as a packed qkv projection yields
    mean = (torch.randint(-4, 5, (2, 3, 1, 64)) / 4).float() if with_mean else None
    q, scales = sagesla.quantize_blocks(x, 64, mean)
    x_hnd = x.transpose(1, 2) - (mean.to(torch.bfloat16) if with_mean else 0)
    expected_q, expected_scales = _sparge_quantize64(x_hnd, 64)
    assert q.shape == (2, 3, 150, 64) and q.is_contiguous() and scales.shape == (2, 3, 3)
    assert torch.equal(q, expected_q)
    assert torch.equal(scales, expected_scales)


def test_sagesla_quantizer_also_yields_the_selection_block_means():
    x = torch.randn(2, 150, 2, 3, 64).to(torch.bfloat16)[:, :, 0]
    means = torch.full((2, 3, 3, 64), float("nan"))
    q, scales = sagesla.quantize_blocks(x, 64, block_means=means)
    assert torch.equal(means, sla.block_means(x, 64))  # on a GPU, to fp32 rounding (test_kernels_sagesla_gpu)
    assert torch.equal(q, sagesla.quantize_blocks(x, 64)[0])


def test_sagesla_keeps_the_selection_and_linear_branch_in_the_input_dtype(monkeypatch):
    # Only SpargeAttn's sparse branch reads bf16 (and 8 bits from it): an fp32 model's selection and
    # linear branch stay fp32, as before q's quantizer also wrote the block means.
    q, k, v = _qkv(1, 200, 2, 64)
    weight, bias = _proj(64)
    o_s = torch.randn(1, 2, 200, 64).to(torch.bfloat16)
    seen = {}

    def sparse_branch(sparge, arch, q_quantized, k, v, state, lut, count, blkk, v_amax=None):
        seen["lut"] = lut
        return o_s

    monkeypatch.setattr(sagesla, "sparge_modules", lambda: object())
    monkeypatch.setattr(sagesla, "cuda_arch", lambda device: "sm90")
    monkeypatch.setattr(sagesla, "_sparse_branch", sparse_branch)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: None)
    out = sagesla.sagesla_attention(q, k, v, weight, bias, topk=0.5)
    blkq, blkk = sagesla.selection_blocks("sm90")
    state = sla.linear_state(k, v, blkk)
    lut = _sparge_lut(sla.select_blocks(q, state, 0.5, blkq), state.smooth_k_blocks.shape[2])
    assert torch.equal(seen["lut"], lut)
    expected = sla.add_linear_branch(o_s.transpose(1, 2), q, state, weight, bias)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_sagesla_v_fp8_layout():
    # Multiples of 1/4 up to 2.25, with 2.25 in every channel, are exact in e4m3 at scale 1: this checks the
    # layout (transposed, padded to 128 tokens, the fp8 MMA's order within 16) and the scales.
    packed = (torch.randint(-9, 10, (2, 150, 2, 3, 32)) / 4).to(torch.bfloat16)
    packed[:, 7] = 2.25
    v = packed[:, :, 1]  # a strided [B, L, H, D] view
    values, scales = sagesla.prepare_v_fp8(v)
    assert values.shape == (2, 3, 32, 256) and values.dtype == torch.float8_e4m3fn
    assert torch.equal(scales, torch.ones(2, 3, 32))
    position = [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]  # of each token of a group of 16
    expected = torch.zeros(2, 3, 32, 256)
    for token in range(150):
        expected[..., 16 * (token // 16) + position[token % 16]] = v[:, token].float()
    assert torch.equal(values.float(), expected)
    v[..., 5] = 0  # an all-zero channel: zero values at a tiny scale, not SpargeAttn's 0 / 0
    values, scales = sagesla.prepare_v_fp8(v)
    assert not values[..., 5, :].float().any() and (scales[..., 5] > 0).all() and scales.isfinite().all()


def test_sagesla_v_fp8_takes_the_channel_amax_the_v_projection_wrote():
    # Two samples of very different ranges, one all-zero channel: the same values and scales as the
    # preparation's own amax pass, from the [B, H * D] amax an int8 v projection writes.
    v = (torch.randn(2, 150, 3, 32) * torch.tensor([1.0, 50.0])[:, None, None, None]).to(torch.bfloat16)
    v[..., 1, 5] = 0
    amax = int8.sample_column_amax(v.reshape(300, 96), 2)
    values, scales = sagesla.prepare_v_fp8(v, amax)
    own_values, own_scales = sagesla.prepare_v_fp8(v)
    assert torch.equal(values.view(torch.uint8), own_values.view(torch.uint8))
    assert torch.equal(scales, own_scales) and (scales[:, 1, 5] > 0).all()
    # The scales come from the amax given: twice the ranges, twice the scales (head 0: no zero channel).
    _, wide_scales = sagesla.prepare_v_fp8(v, 2 * amax)
    assert torch.equal(wide_scales[:, 0], 2 * own_scales[:, 0])
    with pytest.raises(ValueError, match=r"amax must be a contiguous fp32 \[2, 96\] tensor"):
        sagesla.prepare_v_fp8(v, amax[:, :32])


def test_sagesla_takes_v_amax_where_v_goes_in_fp8():
    assert sagesla.fp8_v("sm90") and sagesla.fp8_v("sm89")
    assert not sagesla.fp8_v("sm80") and not sagesla.fp8_v("sm86")


def test_sagesla_block_sizes_follow_the_arch():
    assert sagesla.selection_blocks("sm90") == (64, 128)
    assert sagesla.selection_blocks("sm80") == sagesla.selection_blocks("sm89") == (128, 64)


@pytest.mark.skipif(sagesla.sparge_modules() is not None, reason="SpargeAttn is installed here")
def test_sagesla_without_spargeattn_says_what_to_do():
    assert not sagesla.is_available(torch.device("cpu"))
    q, k, v = _qkv(1, 64, 1, 64)
    with pytest.raises(RuntimeError, match="use attention=sla"):
        sagesla.sagesla_attention(q, k, v, *_proj(64), topk=0.5)


@pytest.mark.parametrize(
    ("dtype", "blocks", "tolerance"), [(torch.float32, (128, 64), 1e-5), (torch.float16, (64, 128), 5e-3)]
)
def test_matches_the_dit_pytorch_reference(dtype, blocks, tolerance):
    q, k, v = _qkv(2, 230, 2, 64, dtype)
    proj_l = torch.nn.Linear(64, 64)
    with torch.no_grad():
        expected = sla_reference(q, k, v, proj_l=proj_l, topk=0.4, block_q=blocks[0], block_k=blocks[1])
        out = sla.sla_attention(q, k, v, proj_l.weight, proj_l.bias, 0.4, *blocks)
    # The reference rounds every step to the input dtype; the kernels accumulate in fp32.
    assert _rel(out, expected) < tolerance


def test_registered_backends_resolve_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_attention("auto", cpu).name == "sla-reference"
    assert select_attention("sla", cpu).name == "sla-reference"
    assert select_attention("dense", cpu).name == "dense"
    # Availability looks only at the device type and installed packages, so this resolves without a GPU.
    assert select_attention("sla", cuda).name == "sla-triton"
    if sagesla.sparge_modules() is None:
        assert select_attention("auto", cuda).name == "sla-triton"
        with pytest.raises(InputError, match=r"^attention=sagesla needs SpargeAttn .*; use attention=sla$"):
            select_attention("sagesla", cuda)
    with pytest.raises(InputError, match="use attention=sla"):
        select_attention("sagesla", cpu)


def test_triton_backend_equals_the_reference_backend():
    q, k, v = _qkv(1, 200, 2, 32)
    proj_l = torch.nn.Linear(32, 32)
    triton_sla = select_attention("sla-triton", torch.device("cuda"))
    reference = select_attention("sla-reference", torch.device("cpu"))
    assert (
        (triton_sla.block_q, triton_sla.block_k) == (reference.block_q, reference.block_k) == sla.SLA_BLOCKS
    )
    with torch.no_grad():
        torch.testing.assert_close(
            triton_sla(q, k, v, proj_l=proj_l, topk=0.5),
            reference(q, k, v, proj_l=proj_l, topk=0.5),
            rtol=1e-4,
            atol=1e-5,
        )


def test_auto_prefers_sagesla_where_it_can_run(monkeypatch):
    attention._load_plugins()
    monkeypatch.setattr(attention, "_REGISTRY", {name: list(c) for name, c in attention._REGISTRY.items()})

    class SpargeGPU(sla_backends.SageSLA):
        name = "sagesla-here"

    # Stands in for SpargeAttn being installed: its kernels cannot run on this machine.
    attention.register_attention("sagesla", SpargeGPU(), lambda device: device.type == "cuda", priority=20)
    assert select_attention("auto", torch.device("cuda")).name == "sagesla-here"
    assert select_attention("auto", torch.device("cpu")).name == "sla-reference"
