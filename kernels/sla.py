"""Sparse-linear attention (SLA, upstream-spec §4.1) as Triton kernels on the DiT's [B, L, H, D] layout.

Five Triton launches and two small matmuls per call (small torch ops cost the host more than the GPU):

1. ``linear_state``: one pass over k and v computing, per (batch, head), KV = φ(k)ᵀ v and ksum = Σ φ(k)
   (φ = softmax over the head dim) and, in the same pass, the key-block means and the mean of k over L
   that the selection needs; a second kernel sums the pass's per-program partials and smooths the
   key-block means by the mean.
2. ``select_blocks``: query-block means of q (Triton), the pooled score against the smoothed key
   blocks (one batched matmul), then top-k per row of the small [B, H, nQ, nK] score (Triton).
3. ``block_sparse_attention``: flash-attention over the selected key blocks only, with the linear branch
   (φ(q)·KV / (1e-5 + φ(q)·ksum), then proj_l, folded into KV by one matmul) and the sum o_s + o_l
   fused into its epilogue.

Inputs may be any strided views with a unit head-dim stride (e.g. slices of a packed qkv tensor):
layouts are absorbed in kernel strides and bulk-copy descriptors, nothing is transposed or made
contiguous. Accumulation is fp32 throughout; upstream rounds every
intermediate tensor op to bf16, so the two differ by bf16 rounding only.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .gpu import GpuLimits, gpu_limits, sm_count
from .quant import QUANT_BLOCK, quantize_blockwise, quantize_with, scale_shape
from .rounding import div_rn, reciprocal, to_bf16, to_bf16_pairs
from .sla_ws import sparse_attention_ws, takes

LOG2E = 1.4426950408889634
# Keys one linear-state program reduces, each program writing one [D, D] partial for a final sum: enough
# programs to fill the GPU at the 1.3B shape (H100 sweep at BLKK 64: flat between 768 and 1536 rows;
# H200 at BLKK 128: 0.222 ms against 0.258 ms with 2048 rows, the same at the 14B shape).
STATE_ROWS_PER_PROGRAM = 1024
# Rows of KV each program of the partials' sum owns. H200, whole state at the 1.3B shape: 0.183 ms with
# 8 rows, 0.203 ms with 32 (its 48 programs left most of the GPU idle), 0.181 ms with 4.
_FINISH_ROWS = 8
# The linear branch's persistent pass that writes int8 tiles (_add_linear_quantized_kernel). H200: 8 warps
# and 3 stages 0.175 / 0.155 ms at the 1.3B shape, 1.11 / 1.12 ms at 14B's; 2 stages 0.19 / 1.32; 4 warps
# 0.26-0.28 / 2.2 (ptxas spills); the one-tile-a-program pass before it 0.19-0.20 / 1.32 ms.
_QUANTIZED_WARPS = 8
_QUANTIZED_STAGES = 3
SLA_BLOCKS = (128, 64)  # (BLKQ, BLKK) of attention_type "sla"
SAGESLA_SM90_BLOCKS = (64, 128)  # SageSLA on Hopper selects with these


@dataclass(frozen=True)
class SparseConfig:
    """Launch parameters of the sparse kernel: a program owns ``block_m`` query rows (a divisor of BLKQ).

    ``tma``: K/V blocks arrive through bulk tensor copies (Hopper and later) instead of pointer loads.
    """

    block_m: int
    num_warps: int
    num_stages: int
    tma: bool = True


@dataclass(frozen=True)
class LinearState:
    """What one pass over k and v yields per (batch, head): the linear branch's sums, the selection's means."""

    kv: torch.Tensor  # [B*H, D, D] in the compute dtype: φ(k)ᵀ v
    ksum: torch.Tensor  # [B*H, D] fp32: Σ_L φ(k), of φ in the compute dtype (bf16 φ, as upstream sums)
    k_mean: torch.Tensor  # [B, H, 1, D] fp32: mean of k over L (the selection's smoothing)
    smooth_k_blocks: torch.Tensor  # [B, H, nK, D] fp32: mean of each BLKK rows of k, minus k_mean


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the test path: keep the products exact instead of TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"SLA needs q, k, v of one shape [B, L, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"SLA needs q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"SLA kernels need a power-of-two head dim of at least 16; got {d}")


def _check_blocks(blkq: int, blkk: int) -> None:
    for name, size in (("BLKQ", blkq), ("BLKK", blkk)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"SLA {name} must be a power of two of at least 16; got {size}")


def _state_launch(blkk: int, head_dim: int, gpu: GpuLimits | None, itemsize: int = 2) -> tuple[int, int]:
    """(num_warps, num_stages) of the linear-state kernel for [blkk, head_dim] K/V tiles of ``itemsize``
    bytes a value (fp32 inputs, the test path, take twice the shared memory of bf16 ones).

    H100 sweep (bf16, D = 128, BLKK 64): 4 warps with three tiles in flight took 0.18 ms at H=12
    L=32760 and 1.1 ms at H=40 L=75600, against 0.30 ms and 2.3 ms with 8 warps and two, although
    ptxas then keeps 24 bytes on the stack. 128-key tiles (SageSLA's selection on Hopper), and any tile
    without warpgroup MMA (sm_8x), need 8 warps: 4 spill hundreds of bytes; three stages beat two there
    too (H200, BLKK 128: 0.214 against 0.222 ms at the 1.3B shape, 1.31 against 1.40 ms at the 14B one).
    Stages drop where shared memory is short.
    """
    tile = blkk * head_dim * itemsize  # one K or V tile
    hopper = gpu is None or gpu.hopper
    num_warps = 4 if hopper and tile <= 64 * 128 * 2 else 8
    stages = 3
    while gpu is not None and stages > 1 and 2 * stages * tile > gpu.shared_bytes:
        stages -= 1
    return num_warps, stages


def default_sparse_config(
    blkq: int, blkk: int, head_dim: int = 128, gpu: GpuLimits | None = None, itemsize: int = 2
) -> SparseConfig:
    """64 query rows per program with three K/V tiles in flight, fewer where shared memory is short.

    H100 sweep (scripts/bench_kernels.py, topk 0.10, sparse + linear kernel, BLKK 64): 1.56 ms at H=12
    L=32760 and 26.0 ms at H=40 L=75600, against 1.84 ms and 26.7 ms for 128 rows with 8 warps and
    2.25 ms and 29.7 ms for the pointer-gather kernel before TMA; two stages lose 20 %. Hopper's warpgroup MMA holds the tile
    in 4 warps; mma.sync on older GPUs needs 8 not to spill. Older GPUs have no TMA, and Triton's
    stand-in for a descriptor load there neither pipelines nor fits in registers (ptxas: 0.4-1.7 KB of
    spills per thread with Triton 3.4, the image's), so they load K/V through pointers, which
    pipeline with async copies and do not spill.
    """
    block_m = min(blkq, 64)
    hopper = gpu is None or gpu.hopper
    num_warps = 4 if hopper else 8
    # Q stays resident; each stage holds a K and a V tile (of itemsize bytes a value: 2 for bf16).
    stages = 3
    while (
        gpu is not None
        and stages > 1
        and (block_m + 2 * stages * blkk) * head_dim * itemsize > gpu.shared_bytes
    ):
        stages -= 1
    return SparseConfig(block_m, num_warps, stages, tma=hopper)


@triton.jit
def _softmax_rows(x):
    """φ(x): softmax over the last axis of an fp32 tile."""
    e = tl.exp2((x - tl.max(x, axis=1)[:, None]) * 1.4426950408889634)  # log2(e)
    return e * reciprocal(tl.sum(e, axis=1))[:, None]


@triton.jit
def _operand(x, dtype: tl.constexpr):
    """An fp32 tile as an MMA operand of ``dtype``; bf16 two values an instruction (``to_bf16_pairs``),
    where Triton's cast converts one at a time: the linear-state pass took 0.142-0.144 against
    0.149-0.151 ms at the 1.3B shape with Triton's cast (H100), the same bits."""
    if dtype == tl.bfloat16:
        return to_bf16_pairs(x)
    else:
        return x.to(dtype)


@triton.jit
def _block_mean(x, blk, L, BLK: tl.constexpr):
    """Mean over the rows of a zero-padded [BLK, D] fp32 tile, by its true row count."""
    return tl.sum(x, axis=0) / _rows_in_block(blk, L, BLK)


@triton.jit
def _rows_in_block(blk, L, BLK: tl.constexpr):
    return tl.minimum(L - blk * BLK, BLK).to(tl.float32)


@triton.jit
def _column_sums(x, ones, PRECISION: tl.constexpr):
    """fp32 [D]: the sums over the rows of a [rows, D] tile, by an MMA against ``ones`` [rows, 16] (same
    dtype), whose 16 equal columns the max picks one of. A sum across the rows of a register tile
    needs shared memory and a barrier between the warps; the MMA needs neither."""
    return tl.max(tl.dot(tl.trans(x), ones, input_precision=PRECISION), axis=1)


@triton.jit
def _head_rows(ptr, b, h, rows, d, stride_b, stride_l, stride_h, stride_d):
    """Pointers to ``rows`` x ``d`` of head ``h`` of sample ``b`` in a strided [B, L, H, D] tensor."""
    base = ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    return base + rows.to(tl.int64)[:, None] * stride_l + d[None, :] * stride_d


@triton.jit
def _kv_state_kernel(
    k_ptr,
    v_ptr,
    kv_part_ptr,
    sums_part_ptr,
    kblock_ptr,
    L,
    H,
    n_kblocks,
    blocks_per_split,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_vd,
    BLKK: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    n_splits = tl.num_programs(0)
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    kv = tl.zeros([D, D], dtype=tl.float32)
    # The sums over keys go through the MMA too (_column_sums): with sums across the tile's rows
    # instead, the pass took 0.168 against 0.133 ms at the 1.3B shape (H200, BLKK 128).
    ones = tl.full([BLKK, 16], 1.0, k_ptr.dtype.element_ty)
    phi_sum = tl.zeros([D], dtype=tl.float32)
    k_sum = tl.zeros([D], dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, n_kblocks)
    for blk in tl.range(first, last):
        rows = blk * BLKK + tl.arange(0, BLKK)
        valid = rows < L
        k_ptrs = _head_rows(k_ptr, b, h, rows, d, stride_kb, stride_kl, stride_kh, stride_kd)
        v_ptrs = _head_rows(v_ptr, b, h, rows, d, stride_vb, stride_vl, stride_vh, stride_vd)
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        block_sum = _column_sums(k, ones, PRECISION)
        k_sum += block_sum
        block_mean = block_sum / _rows_in_block(blk, L, BLKK)
        tl.store(kblock_ptr + (bh.to(tl.int64) * n_kblocks + blk) * D + d, block_mean)
        phi = _operand(tl.where(valid[:, None], _softmax_rows(k.to(tl.float32)), 0.0), v.dtype)
        phi_sum += _column_sums(phi, ones, PRECISION)
        kv = tl.dot(tl.trans(phi), v, kv, input_precision=PRECISION)
    part = bh.to(tl.int64) * n_splits + split
    tl.store(kv_part_ptr + part * D * D + d[:, None] * D + d[None, :], kv)
    tl.store(sums_part_ptr + part * 2 * D + d, phi_sum)
    tl.store(sums_part_ptr + part * 2 * D + D + d, k_sum)


@triton.jit
def _state_finish_kernel(
    kv_part_ptr,
    sums_part_ptr,
    kblock_ptr,
    kv_ptr,
    ksum_ptr,
    k_mean_ptr,
    L,
    n_splits,
    n_kblocks,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCKS: tl.constexpr,
    KV_BF16: tl.constexpr,
):
    """Sums one (batch, head)'s partials, ROWS rows of KV per program, and smooths its key-block means.

    Every program of a (batch, head) reduces the small sums itself, so none waits for another's k mean.
    """
    bh = tl.program_id(0)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    d = tl.arange(0, D)
    rows = part * ROWS + tl.arange(0, ROWS)
    kv = tl.zeros([ROWS, D], dtype=tl.float32)
    phi_sum = tl.zeros([D], dtype=tl.float32)
    k_sum = tl.zeros([D], dtype=tl.float32)
    for split in range(n_splits):
        first = bh.to(tl.int64) * n_splits + split
        kv += tl.load(kv_part_ptr + (first * D + rows[:, None]) * D + d[None, :])
        phi_sum += tl.load(sums_part_ptr + first * 2 * D + d)
        k_sum += tl.load(sums_part_ptr + first * 2 * D + D + d)
    kv_out = to_bf16(kv) if KV_BF16 else kv.to(kv_ptr.dtype.element_ty)
    tl.store(kv_ptr + (bh.to(tl.int64) * D + rows[:, None]) * D + d[None, :], kv_out)
    k_mean = div_rn(k_sum, L * 1.0)
    if part == 0:
        tl.store(ksum_ptr + bh * D + d, phi_sum)
        tl.store(k_mean_ptr + bh * D + d, k_mean)
    for first_block in range(part * BLOCKS, n_kblocks, n_parts * BLOCKS):
        blocks = first_block + tl.arange(0, BLOCKS)
        ptrs = kblock_ptr + (bh.to(tl.int64) * n_kblocks + blocks[:, None]) * D + d[None, :]
        ok = (blocks < n_kblocks)[:, None]
        tl.store(ptrs, tl.load(ptrs, mask=ok) - k_mean[None, :], mask=ok)


def linear_state(k: torch.Tensor, v: torch.Tensor, blkk: int) -> LinearState:
    """One pass over k and v: the linear branch's KV and ksum, and the key statistics the selection needs.

    Two launches: the pass writes per-program partials, a second kernel sums them (instead of a
    handful of small torch ops, which cost the host more than the GPU).
    """
    _check_inputs(k, k, v)
    batch, length, heads, dim = k.shape
    n_kblocks = triton.cdiv(length, blkk)
    bh = batch * heads
    blocks_per_split = min(n_kblocks, max(1, STATE_ROWS_PER_PROGRAM // blkk))
    n_splits = triton.cdiv(n_kblocks, blocks_per_split)
    num_warps, num_stages = _state_launch(blkk, dim, gpu_limits(k.device), k.element_size())
    kv_part = torch.empty((bh, n_splits, dim, dim), dtype=torch.float32, device=k.device)
    sums_part = torch.empty((bh, n_splits, 2, dim), dtype=torch.float32, device=k.device)
    k_blocks = torch.empty((batch, heads, n_kblocks, dim), dtype=torch.float32, device=k.device)
    _kv_state_kernel[(n_splits, bh)](
        k,
        v,
        kv_part,
        sums_part,
        k_blocks,
        length,
        heads,
        n_kblocks,
        blocks_per_split,
        *k.stride(),
        *v.stride(),
        BLKK=blkk,
        D=dim,
        PRECISION=_dot_precision(k.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    kv = torch.empty((bh, dim, dim), dtype=k.dtype, device=k.device)
    ksum = torch.empty((bh, dim), dtype=torch.float32, device=k.device)
    k_mean = torch.empty((batch, heads, 1, dim), dtype=torch.float32, device=k.device)
    rows = min(dim, _FINISH_ROWS)
    _state_finish_kernel[(bh, dim // rows)](
        kv_part, sums_part, k_blocks, kv, ksum, k_mean, length, n_splits, n_kblocks,
        D=dim, ROWS=rows, BLOCKS=16, KV_BF16=k.dtype == torch.bfloat16, num_warps=4,
    )  # fmt: skip
    return LinearState(kv=kv, ksum=ksum, k_mean=k_mean, smooth_k_blocks=k_blocks)


@triton.jit
def _block_mean_kernel(
    x_ptr,
    out_ptr,
    L,
    H,
    n_blocks,
    stride_b,
    stride_l,
    stride_h,
    stride_d,
    BLK: tl.constexpr,
    D: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLK + tl.arange(0, BLK)
    d = tl.arange(0, D)
    x_ptrs = _head_rows(x_ptr, b, h, rows, d, stride_b, stride_l, stride_h, stride_d)
    x = tl.load(x_ptrs, mask=(rows < L)[:, None], other=0.0)
    tl.store(out_ptr + (bh.to(tl.int64) * n_blocks + blk) * D + d, _block_mean(x.to(tl.float32), blk, L, BLK))


def block_means(x: torch.Tensor, blk: int) -> torch.Tensor:
    """fp32 means of each ``blk`` rows of x [B, L, H, D] -> [B, H, ceil(L/blk), D] (true count for the last)."""
    batch, length, heads, dim = x.shape
    n_blocks = triton.cdiv(length, blk)
    out = torch.empty((batch, heads, n_blocks, dim), dtype=torch.float32, device=x.device)
    _block_mean_kernel[(n_blocks, batch * heads)](
        x, out, length, heads, n_blocks, *x.stride(), BLK=blk, D=dim, num_warps=4
    )
    return out


def blocks_to_keep(topk: float, n_kblocks: int) -> int:
    """kk = min(nK, int(topk·nK)) as upstream, but at least one block: upstream's kk = 0 yields NaN."""
    return max(1, min(n_kblocks, int(topk * n_kblocks)))


@triton.jit
def _top_blocks_kernel(score_ptr, out_ptr, count_ptr, n_kblocks, kk, NK: tl.constexpr, STEPS: tl.constexpr):
    """Per score row: the kk largest, ties to the lower block, written as ascending block indices; with
    STEPS as SpargeAttn's LUT row instead (``top_block_steps``), and the row's count."""
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, NK)
    valid = idx < n_kblocks
    score = tl.load(score_ptr + row * n_kblocks + idx, mask=valid, other=0.0)
    # Unsigned keys in score order: non-negative floats get the sign bit set, negative ones all bits
    # flipped (so -0.0 sits just below +0.0). Padding gets 0, below every real score (-inf included).
    bits = score.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    key = tl.where(valid, bits ^ flip, 0)
    # The kk-th largest key, built from its top bit down: keep a bit if at least kk keys reach the
    # prefix with it set. 32 counting passes over the row cost far less than sorting it.
    threshold = tl.full([], 0, tl.uint32)
    bit = tl.full([], 0x80000000, tl.uint32)
    for _ in range(32):
        candidate = threshold | bit
        enough = tl.sum((key >= candidate).to(tl.int32)) >= kk
        threshold = tl.where(enough, candidate, threshold)
        bit = bit >> 1
    above = key > threshold
    tied = key == threshold
    # Of the blocks tied at the threshold, the lowest ones fill the remaining places.
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= kk - tl.sum(above.to(tl.int32))))
    # Compacting by a running count keeps the chosen blocks in ascending order without a sort.
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    if not STEPS:
        tl.store(out_ptr + row * kk + slot, idx, mask=chosen)
        return
    # Each chosen block's step from the one before it (block 0 before the first): the row first holds the
    # indices, which the program reads back (the barrier makes every lane's store visible to the others).
    lut = out_ptr + row * n_kblocks
    tl.store(lut + slot, idx, mask=chosen)
    tl.debug_barrier()
    before = tl.load(lut + slot - 1, mask=chosen & (slot > 0), other=0)
    tl.debug_barrier()
    tl.store(lut + slot, idx - before, mask=chosen)
    tl.store(lut + idx, 0, mask=valid & (idx >= kk))
    tl.store(count_ptr + row, kk)


def block_scores(
    q: torch.Tensor, state: LinearState, blkq: int, q_means: torch.Tensor | None = None
) -> torch.Tensor:
    """The pooled scores [B, H, nQ, nK] (fp32) by which query blocks select key blocks.

    Pooled score = mean(q block) · (mean(k block) − mean(k)), no 1/sqrt(d) scale; smoothing k by its mean
    over L changes no softmax but sharpens the ranking (spec §4.1 steps 1–4). The key block size is the
    one ``state`` was computed with; ``q_means`` are q's ``block_means`` where a caller already has them.
    """
    if q_means is None:
        q_means = block_means(q, blkq)
    return q_means @ state.smooth_k_blocks.transpose(-1, -2)


def select_blocks(
    q: torch.Tensor, state: LinearState, topk: float, blkq: int, q_means: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices [B, H, nQ, kk] (int32, ascending) of the key blocks each query block attends to exactly:
    the ``topk`` share of ``block_scores``, equal scores to the lower block."""
    score = block_scores(q, state, blkq, q_means)
    return top_blocks(score, blocks_to_keep(topk, score.shape[-1]))


def top_blocks(score: torch.Tensor, kk: int) -> torch.Tensor:
    """The kk highest-scoring blocks of each row of a contiguous fp32 score [..., nK], as ascending int32
    indices [..., kk]; of equal scores the lower block wins (a deterministic torch.topk)."""
    chosen = torch.empty((*score.shape[:-1], kk), dtype=torch.int32, device=score.device)
    _launch_top_blocks(score, kk, chosen, chosen, steps=False)
    return chosen


def top_block_steps(score: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_blocks`` as SpargeAttn's sparse layout: the LUT [..., nK] int32 holds each chosen block as
    the step from the one before it (the first from block 0), then zeros; the count [...] is kk."""
    lut = torch.empty(score.shape, dtype=torch.int32, device=score.device)
    count = torch.empty(score.shape[:-1], dtype=torch.int32, device=score.device)
    _launch_top_blocks(score, kk, lut, count, steps=True)
    return lut, count


def _launch_top_blocks(
    score: torch.Tensor, kk: int, out: torch.Tensor, count: torch.Tensor, steps: bool
) -> None:
    n_kblocks = score.shape[-1]
    if not 1 <= kk <= n_kblocks:
        raise ValueError(f"kk must be in 1..{n_kblocks}; got {kk}")
    # Ascending order walks K/V forwards in memory and fixes the sparse kernel's summation order.
    # One warp per row: its counting passes reduce with shuffles alone, no shared memory or barriers
    # (H100, the 23,640 rows of 1182 blocks at 14B 720p: 0.46 ms, against 0.51 ms with 2 warps, 0.70 ms
    # for a signed bisection of int64 keys and 1.30 ms for torch.topk + sort); the LUT variant adds two
    # barriers to read its row back.
    _top_blocks_kernel[(score[..., 0].numel(),)](
        score.contiguous(), out, count, n_kblocks, kk, NK=triton.next_power_of_2(n_kblocks), STEPS=steps,
        num_warps=1,
    )  # fmt: skip


@triton.jit
def _linear_branch(phi, kvw_ptr, ksum_ptr, bias_ptr, D: tl.constexpr, PRECISION: tl.constexpr):
    """proj_l(φ(q)·KV / (1e-5 + φ(q)·ksum)) for one [rows, D] tile's φ(q) (fp32), as φ(q)·(KV·Wᵀ) / (...) + b.

    The normaliser is one number per row, so proj_l's weight folds into KV once per (b, h) (``_linear_params``)
    and the epilogue needs one product instead of two. kvw/ksum point at this (b, h).
    """
    d = tl.arange(0, D)
    kvw = tl.load(kvw_ptr + d[:, None] * D + d[None, :])
    return _linear_branch_of(phi, kvw, tl.load(ksum_ptr + d), tl.load(bias_ptr + d).to(tl.float32), PRECISION)


@triton.jit
def _linear_branch_of(phi, kvw, ksum, bias, PRECISION: tl.constexpr):
    """``_linear_branch`` with this (b, h)'s KV·Wᵀ [D, D], ksum [D] and bias [D] (fp32) already loaded."""
    denominator = tl.sum(phi * ksum[None, :], axis=1) + 1e-5
    o_l = tl.dot(phi.to(kvw.dtype), kvw, input_precision=PRECISION) * reciprocal(denominator)[:, None]
    return o_l + bias[None, :]


@triton.jit
def _sparse_attention_kernel(
    q_ptr,
    k_src,  # a bulk-copy (TMA) descriptor of K [B, L, H, D] if TMA, else a pointer to it
    v_src,
    o_ptr,
    index_ptr,
    kvw_ptr,
    ksum_ptr,
    bias_ptr,
    L,
    H,
    n_qblocks,
    kk,
    qk_scale,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    BLKQ: tl.constexpr,
    BLKK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    TMA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < L
    key_row = tl.arange(0, BLKK)
    d = tl.arange(0, D)
    q_ptrs = _head_rows(q_ptr, b, h, rows, d, stride_qb, stride_ql, stride_qh, stride_qd)
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    qblock = (tile * BLOCK_M) // BLKQ
    index_row = index_ptr + (bh.to(tl.int64) * n_qblocks + qblock) * kk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for j in tl.range(0, kk):
        # A selected key block is BLKK consecutive rows of one head: one bulk tensor copy each for K and V
        # (zero-filled past L), or a masked gather.
        first_key = tl.load(index_row + j) * BLKK
        if TMA:
            k = k_src.load([b, first_key, h, 0]).reshape(BLKK, D)
            v = v_src.load([b, first_key, h, 0]).reshape(BLKK, D)
        else:
            keys = first_key + key_row
            key_ok = (keys < L)[:, None]
            k_ptrs = _head_rows(k_src, b, h, keys, d, stride_kb, stride_kl, stride_kh, stride_kd)
            v_ptrs = _head_rows(v_src, b, h, keys, d, stride_vb, stride_vl, stride_vh, stride_vd)
            k = tl.load(k_ptrs, mask=key_ok, other=0.0)
            v = tl.load(v_ptrs, mask=key_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where((first_key + key_row < L)[None, :], s, float("-inf"))
        # Base-2 online softmax; qk_scale = log2(e)/sqrt(D) > 0 commutes with the max, so each logit
        # costs one FMA.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]
    if HAS_LINEAR:
        # Round o_s to the compute dtype as upstream does; holding it narrow also frees registers meanwhile.
        o_s = o.to(q.dtype)
        o_l = _linear_branch(
            _softmax_rows(q.to(tl.float32)), kvw_ptr + bh * D * D, ksum_ptr + bh * D, bias_ptr, D, PRECISION
        )
        o = o_s.to(tl.float32) + o_l
    o_ptrs = _head_rows(o_ptr, b, h, rows, d, stride_ob, stride_ol, stride_oh, stride_od)
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_valid[:, None])


def _key_block_descriptor(x: torch.Tensor, blkk: int) -> TensorDescriptor:
    """A bulk-copy (TMA) descriptor reading one head's ``blkk`` rows of x [B, L, H, D] at a time.

    TMA needs a unit head-dim stride and 16-byte aligned base and strides; the views the DiT passes
    (contiguous tensors, slices of a packed qkv) have them, anything else is copied once.
    """
    aligned = x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:-1])
    if x.stride(-1) != 1 or not aligned:
        x = x.contiguous()
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, blkk, 1, x.shape[-1]])


def _linear_params(
    state: LinearState, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KV·Wᵀ [B*H, D, D], ksum, bias) for ``_linear_branch``.

    proj_l runs in the compute dtype (upstream: autocast bf16 over an fp32 Linear): KV·Wᵀ is a product of
    compute-dtype operands with fp32 accumulation, rounded once to the compute dtype.
    """
    kvw = torch.matmul(state.kv, weight.to(state.kv.dtype).T)
    return kvw, state.ksum, bias.contiguous()  # the kernel adds the bias in fp32


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    blkq: int,
    blkk: int,
    linear: tuple[LinearState, torch.Tensor, torch.Tensor] | None = None,
    config: SparseConfig | None = None,
) -> torch.Tensor:
    """Softmax attention of each query block over its selected key blocks, [B, L, H, D] in q's dtype.

    With ``linear = (state, proj_weight, proj_bias)`` the SLA linear branch is added in the epilogue.
    Without a ``config``, Hopper runs bf16 heads of 128 in SLA's blocks through the warp-specialized
    kernel (kernels/sla_ws.py); a ``config`` always launches this module's Triton kernel.
    """
    _check_inputs(q, k, v)
    _check_blocks(blkq, blkk)
    batch, length, heads, dim = q.shape
    n_qblocks = triton.cdiv(length, blkq)
    if block_index.shape[:3] != (batch, heads, n_qblocks) or block_index.dtype != torch.int32:
        raise ValueError(
            f"block_index must be int32 [{batch}, {heads}, {n_qblocks}, kk]; got {block_index.shape}"
        )
    block_index = block_index.contiguous()
    qk_scale = dim**-0.5 * LOG2E
    if config is None and takes(q, k, v, blkq, blkk):  # Hopper, bf16: the warp-specialized kernel
        linear_params = None if linear is None else _linear_params(*linear)
        return sparse_attention_ws(q, k, v, block_index, qk_scale, linear_params)
    config = config or default_sparse_config(blkq, blkk, dim, gpu_limits(q.device), q.element_size())
    if blkq % config.block_m:
        raise ValueError(f"BLOCK_M {config.block_m} must divide BLKQ {blkq}")
    out = torch.empty((batch, length, heads, dim), dtype=q.dtype, device=q.device)
    # Never read when HAS_LINEAR is False.
    kvw, ksum, bias = (out, out, out) if linear is None else _linear_params(*linear)
    grid = (triton.cdiv(length, config.block_m), batch * heads)
    _sparse_attention_kernel[grid](
        q,
        _key_block_descriptor(k, blkk) if config.tma else k,
        _key_block_descriptor(v, blkk) if config.tma else v,
        out,
        block_index,
        kvw,
        ksum,
        bias,
        length,
        heads,
        n_qblocks,
        block_index.shape[3],
        qk_scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        BLKQ=blkq,
        BLKK=blkk,
        BLOCK_M=config.block_m,
        D=dim,
        HAS_LINEAR=linear is not None,
        TMA=config.tma,
        PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


@triton.jit
def _add_linear_kernel(
    q_ptr,
    o_s_ptr,
    o_ptr,
    kvw_ptr,
    ksum_ptr,
    bias_ptr,
    L,
    H,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_sb,
    stride_sl,
    stride_sh,
    stride_sd,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    """o_s + the linear branch for BLOCK_M rows of sample program_id(2), in o's dtype."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    sample = tl.program_id(2)
    d = tl.arange(0, D)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _output_rows(q_ptr, o_s_ptr, kvw_ptr, ksum_ptr, bias_ptr, sample, rows, L, H, h,
                     (stride_qb, stride_ql, stride_qh, stride_qd), (stride_sb, stride_sl, stride_sh, stride_sd),
                     D, PRECISION)  # fmt: skip
    o_ptrs = _head_rows(o_ptr, sample, h, rows, d, stride_ob, stride_ol, stride_oh, stride_od)
    tl.store(o_ptrs, to_bf16(o) if OUT_BF16 else o.to(o_ptr.dtype.element_ty), mask=(rows < L)[:, None])


@triton.jit
def _add_linear_quantized_kernel(
    q_ptr,
    o_s_ptr,
    o_ptr,
    scale_ptr,
    kvw_ptr,
    ksum_ptr,
    bias_ptr,
    L,
    H,
    n_tiles,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_sb,
    stride_sl,
    stride_sh,
    stride_sd,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr,
    STAGES: tl.constexpr,
):
    """o_s + the linear branch as the o projection reads it: int8 per 128x128 tile of the [B * L, H * D]
    view (each tile 128 rows of one sample: the host's condition), and the tiles' fp32 scales.

    Persistent: program_id(0) walks every num_programs(0)-th tile of head program_id(1) of sample
    program_id(2), with this head's KV·Wᵀ, ksum and bias loaded once, and the next tiles' q and o_s
    fetched while this one computes (tl.range's stages). A program a tile waited for each load in turn:
    0.19 against 0.15-0.17 ms at the 1.3B shape, 1.32 against 1.11 ms at 14B's (H200)."""
    h = tl.program_id(1)
    sample = tl.program_id(2)
    q_strides = (stride_qb, stride_ql, stride_qh, stride_qd)
    s_strides = (stride_sb, stride_sl, stride_sh, stride_sd)
    o_strides = (stride_ob, stride_ol, stride_oh, stride_od)
    d = tl.arange(0, D)
    bh = sample * H + h
    kvw = tl.load(kvw_ptr + bh * D * D + d[:, None] * D + d[None, :])
    ksum = tl.load(ksum_ptr + bh * D + d)
    bias = tl.load(bias_ptr + d).to(tl.float32)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
        # Two BLOCK_M-row halves one after the other: one 128-row pass would need all of an SM's registers.
        top_rows = tile * 2 * BLOCK_M + tl.arange(0, BLOCK_M)
        bottom_rows = top_rows + BLOCK_M
        top_ok = (top_rows < L)[:, None]
        bottom_ok = (bottom_rows < L)[:, None]
        top = _rows_with_linear(q_ptr, o_s_ptr, kvw, ksum, bias, sample, top_rows, L, h, q_strides, s_strides,
                                D, PRECISION)  # fmt: skip
        bottom = _rows_with_linear(q_ptr, o_s_ptr, kvw, ksum, bias, sample, bottom_rows, L, h, q_strides,
                                   s_strides, D, PRECISION)  # fmt: skip
        # Rounded to bf16 as the output would be, zeros past L as the quantizer pads.
        top = tl.where(top_ok, to_bf16(top).to(tl.float32), 0.0)
        bottom = tl.where(bottom_ok, to_bf16(bottom).to(tl.float32), 0.0)
        amax = tl.maximum(tl.maximum(tl.max(tl.abs(top)), tl.max(tl.abs(bottom))), 1e-8)
        tl.store(_head_rows(o_ptr, sample, h, top_rows, d, *o_strides), quantize_with(top, amax), mask=top_ok)
        tl.store(_head_rows(o_ptr, sample, h, bottom_rows, d, *o_strides), quantize_with(bottom, amax), mask=bottom_ok)  # fmt: skip
        tl.store(scale_ptr + (sample * n_tiles + tile) * H + h, amax * (1.0 / 128.0))


@triton.jit
def _output_rows(q_ptr, o_s_ptr, kvw_ptr, ksum_ptr, bias_ptr, sample, rows, L, H, h, q_strides, s_strides,
                 D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """o_s + the linear branch, fp32, for ``rows`` of one sample (zeros from L on)."""
    d = tl.arange(0, D)
    bh = sample * H + h
    kvw = tl.load(kvw_ptr + bh * D * D + d[:, None] * D + d[None, :])
    ksum = tl.load(ksum_ptr + bh * D + d)
    bias = tl.load(bias_ptr + d).to(tl.float32)
    return _rows_with_linear(
        q_ptr, o_s_ptr, kvw, ksum, bias, sample, rows, L, h, q_strides, s_strides, D, PRECISION
    )


@triton.jit
def _rows_with_linear(q_ptr, o_s_ptr, kvw, ksum, bias, sample, rows, L, h, q_strides, s_strides,
                      D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """``_output_rows`` with this (b, h)'s KV·Wᵀ, ksum and bias already loaded."""
    d = tl.arange(0, D)
    mask = (rows < L)[:, None]
    q = tl.load(_head_rows(q_ptr, sample, h, rows, d, *q_strides), mask=mask, other=0.0)
    o = tl.load(_head_rows(o_s_ptr, sample, h, rows, d, *s_strides), mask=mask, other=0.0).to(tl.float32)
    return o + _linear_branch_of(_softmax_rows(q.to(tl.float32)), kvw, ksum, bias, PRECISION)


def add_linear_branch(
    o_s: torch.Tensor,
    q: torch.Tensor,
    state: LinearState,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    quantized: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """o_s + proj_l(linear attention of q), [B, L, H, D] in q's dtype, for a sparse branch computed elsewhere.

    ``quantized`` (bf16 q, head dim 128): that output quantized per 128x128 tile of its [B * L, H * D]
    view, as the o projection reads it (``quant.quantize_blockwise``): int8 [B, L, H * D] and fp32
    scales [ceil(B * L / 128), H], in one pass instead of a bf16 write and a quantize pass reading it.
    """
    batch, length, heads, dim = q.shape
    if o_s.shape != q.shape:
        raise ValueError(f"o_s must have q's shape {tuple(q.shape)}; got {tuple(o_s.shape)}")
    if quantized and (q.dtype != torch.bfloat16 or dim != QUANT_BLOCK):
        raise ValueError(
            f"a quantized linear branch takes bf16 q with {QUANT_BLOCK}-wide heads; got {q.dtype} {dim}"
        )
    block_m = 64  # rows a step (a quantized tile is two)
    if quantized and batch > 1 and length % (2 * block_m):  # tiles would straddle samples
        return quantize_blockwise(add_linear_branch(o_s, q, state, proj_weight, proj_bias).flatten(2))
    kvw, ksum, bias = _linear_params(state, proj_weight, proj_bias)
    if quantized:
        values = torch.empty((batch, length, heads * dim), dtype=torch.int8, device=q.device)
        scales = torch.empty(scale_shape(batch * length, heads * dim), dtype=torch.float32, device=q.device)
        out = values.view(batch, length, heads, dim)
        n_tiles = triton.cdiv(length, 2 * block_m)
        # One program an SM across all heads and samples (8 warps, three stages: 100+ KB of shared memory).
        programs = max(1, min(n_tiles, sm_count(q.device) // (heads * batch)))
        _add_linear_quantized_kernel[(programs, heads, batch)](
            q,
            o_s,
            out,
            scales,
            kvw,
            ksum,
            bias,
            length,
            heads,
            n_tiles,
            *q.stride(),
            *o_s.stride(),
            *out.stride(),
            BLOCK_M=block_m,
            D=dim,
            PRECISION=_dot_precision(q.dtype),
            STAGES=_QUANTIZED_STAGES,
            num_warps=_QUANTIZED_WARPS,
        )
        return values, scales
    out = torch.empty((batch, length, heads, dim), dtype=q.dtype, device=q.device)
    _add_linear_kernel[(triton.cdiv(length, block_m), heads, batch)](
        q,
        o_s,
        out,
        kvw,
        ksum,
        bias,
        length,
        heads,
        *q.stride(),
        *o_s.stride(),
        *out.stride(),
        BLOCK_M=block_m,
        D=dim,
        PRECISION=_dot_precision(q.dtype),
        OUT_BF16=out.dtype == torch.bfloat16,  # rounded by to_bf16: the interpreter's cast truncates
        num_warps=4,
    )
    return out


def sla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    topk: float,
    blkq: int = SLA_BLOCKS[0],
    blkk: int = SLA_BLOCKS[1],
    config: SparseConfig | None = None,
) -> torch.Tensor:
    """The whole SLA layer (spec §4.1): q, k, v [B, L, H, D] -> o_s + proj_l(o_l), [B, L, H, D]."""
    _check_inputs(q, k, v)
    _check_blocks(blkq, blkk)
    state = linear_state(k, v, blkk)
    block_index = select_blocks(q, state, topk, blkq)
    return block_sparse_attention(q, k, v, block_index, blkq, blkk, (state, proj_weight, proj_bias), config)
