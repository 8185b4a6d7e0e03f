"""Hopper's warp-specialized block-sparse attention (SLA's sparse branch and its linear-branch epilogue),
in Gluon: the same math as ``sla._sparse_attention_kernel`` for SLA's blocks (BLKQ 128, BLKK 64) and
bf16 heads of 128, scheduled by hand.

A program per SM, each taking 128-row query blocks of every head in turn (persistent): both 64-row
halves of a block select the same key blocks, so one warp copies each pair of selected key blocks (K
and V, 128 keys) once into a ring of shared-memory slots by bulk tensor copies (TMA), and two consumer
warpgroups, one a half, attend to it. Triton's own kernel gives each 64-row half a program of its own
that fetches every block itself; here the L2 reads halve, each online-softmax step covers 128 keys (an
odd count of selected blocks repeats the last one, masked), and one consumer's softmax runs while the
other's MMAs do. The copy warp brings the next block's queries into a second buffer and its first key
blocks while the consumers finish the linear branch and store of this one.

H100, sparse + linear at topk 0.10: 22.2-22.4 ms at the 14B 720p shape (23.8-24.5 ms with a program a
query block, as first built; the Triton kernel 26.2-27.0 ms in the same runs), 1.46-1.57 ms at the 1.3B
one (1.71-1.75; Triton 1.56-1.71); bit-identical to the program-a-block version, rel. L2 1e-3 to the
Triton kernel (the running max is taken every 128 keys instead of 64). Not kept: FlashAttention-3's
overlap within a warpgroup (the next pair's q·Kᵀ issued before this pair's softmax, its P·V waited for
after the next softmax): 29.0 and 1.99 ms; releasing a slot's keys as soon as q·Kᵀ is done, apart from
its values: 22.7 ms at 14B.

Needs Gluon as Triton 3.6 has it (``gluon_hopper.available``).
"""

from __future__ import annotations

import torch
import triton

from .gluon_hopper import (
    TensorDescriptor,
    available,
    gl,
    gluon,
    mbarrier,
    tma_load,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from .gpu import gpu_limits, sm_count

BLKQ = 128
BLKK = 64
SUB_M = 64  # query rows per consumer warpgroup
HEAD_DIM = 128
# Slots of a key-block pair (K and V, 64 KB): two, beside two blocks' queries (64 KB) and KV·Wᵀ (32 KB).
STAGES = 2
# Registers a thread over the kernel's 9 warps; warp_specialize's counts then give the consumers 232.
MAX_REGISTERS = 168

__all__ = ["BLKK", "BLKQ", "sparse_attention_ws", "takes"]


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blkq: int, blkk: int) -> bool:
    """Whether this kernel runs these inputs: bf16 [B, L, H, 128] on Hopper, SLA's blocks, and rows that
    a [B * L, H * D] view reaches with 16-byte aligned strides (contiguous tensors, packed qkv slices)."""
    gpu = gpu_limits(q.device)  # None off CUDA
    if not (available() and gpu is not None and gpu.capability // 10 == 9):
        return False
    if (blkq, blkk) != (BLKQ, BLKK) or q.dtype != torch.bfloat16 or q.shape[-1] != HEAD_DIM:
        return False
    return all(_rows_view(x) is not None for x in (q, k, v))


def _rows_view(x: torch.Tensor) -> torch.Tensor | None:
    """x [B, L, H, D] as [B * L, H * D] without a copy, if its strides allow and TMA can read it."""
    batch, length, heads, dim = x.shape
    sb, sl, sh, sd = x.stride()
    if sd != 1 or sh != dim or (batch > 1 and sb != length * sl):
        return None
    if x.data_ptr() % 16 or (sl * x.element_size()) % 16:
        return None
    return x.as_strided((batch * length, heads * dim), (sl, 1))


if gluon is not None:

    @gluon.jit
    def _tile(t, n_qblocks, H, L, kk, index_ptr, D: gl.constexpr):
        """Tile t's place: its sample-and-head index, its sample, the first row of that sample and the
        column of its head in the [B * L, H * D] views, its query block, and its row of block_index."""
        bh = t // n_qblocks
        qblock = t % n_qblocks
        sample = bh // H
        index_row = index_ptr + (bh.to(gl.int64) * n_qblocks + qblock) * kk
        return bh, sample, sample * L, (bh % H) * D, qblock, index_row

    @gluon.jit
    def _load_partition(STAGES: gl.constexpr, HAS_LINEAR: gl.constexpr, loads):
        (q_desc, k_desc, v_desc, kvw_desc, q_smem, kvw_smem, k_bufs, v_bufs, q_ready, q_empty, kvw_ready,
         kvw_empty, k_ready, v_ready, empty, index_ptr, n_qblocks, num_tiles, H, L, kk) = loads  # fmt: skip
        SUB_M: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BLKK: gl.constexpr = k_desc.block_type.shape[0]
        it = 0  # key-block pairs loaded so far, over all tiles: the ring's position
        local = 0  # tiles this program has loaded
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            bh, sample, first_row, column, qblock, index_row = _tile(t, n_qblocks, H, L, kk, index_ptr, D)
            # Q is double-buffered so the next tile's rows land while this one's epilogue runs. A buffer
            # or slot starts free: the first wait on an "empty" barrier is on the phase before init.
            buf = local % 2
            mbarrier.wait(q_empty.index(buf), ((local // 2) & 1) ^ 1)
            mbarrier.expect(q_ready.index(buf), 2 * q_desc.block_type.nbytes)
            for half in gl.static_range(2):
                query_row = first_row + qblock * 2 * SUB_M + half * SUB_M
                tma_load(q_desc, [query_row, column], q_ready.index(buf), q_smem.index(2 * buf + half))
            for pair in range(0, gl.cdiv(kk, 2)):
                slot = it % STAGES
                first = gl.load(index_row + 2 * pair) * BLKK + first_row
                second = gl.load(index_row + gl.minimum(2 * pair + 1, kk - 1)) * BLKK + first_row
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(k_ready.index(slot), 2 * k_desc.block_type.nbytes)
                tma_load(k_desc, [first, column], k_ready.index(slot), k_bufs.index(slot).slice(0, BLKK))
                tma_load(k_desc, [second, column], k_ready.index(slot), k_bufs.index(slot).slice(BLKK, BLKK))
                mbarrier.expect(v_ready.index(slot), 2 * v_desc.block_type.nbytes)
                tma_load(v_desc, [first, column], v_ready.index(slot), v_bufs.index(slot).slice(0, BLKK))
                tma_load(v_desc, [second, column], v_ready.index(slot), v_bufs.index(slot).slice(BLKK, BLKK))
                it += 1
            if HAS_LINEAR:
                # KV·Wᵀ is read in the epilogue only: one buffer, refilled once the last tile's is done.
                mbarrier.wait(kvw_empty, (local & 1) ^ 1)
                mbarrier.expect(kvw_ready, kvw_desc.block_type.nbytes)
                tma_load(kvw_desc, [bh * D, 0], kvw_ready, kvw_smem)
            local += 1

    @gluon.jit
    def _softmax_rows(x):
        """φ(x): softmax over the last axis of an fp32 tile (as sla._softmax_rows)."""
        e = gl.exp2((x - gl.max(x, axis=1)[:, None]) * 1.4426950408889634)
        return e / gl.sum(e, axis=1)[:, None]

    @gluon.jit
    def _valid_keys(index_row, pair, kk, L, keys, BLKK: gl.constexpr):
        """Which of a pair's 128 keys count: not past L, and not the repeat that pads an odd count."""
        in_first = keys < BLKK
        first = gl.load(index_row + 2 * pair) * BLKK
        second = gl.load(index_row + gl.minimum(2 * pair + 1, kk - 1)) * BLKK
        key = gl.where(in_first, first + keys, second + keys - BLKK)
        return (key < L) & (in_first | (2 * pair + 1 < kk))

    @gluon.jit
    def _online_softmax(s, valid, m_i, l_i, qk_scale):
        """Base-2 online softmax as sla._sparse_attention_kernel (one FMA a logit): P (fp32), the new
        running max and sum, and alpha, the factor that rescales what was accumulated before."""
        s = gl.where(valid[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha

    @gluon.jit
    def _consumer(SUB: gl.constexpr, STAGES: gl.constexpr, HAS_LINEAR: gl.constexpr, operands):
        """The warpgroup that computes query rows SUB * 64 .. SUB * 64 + 63 of each of the program's blocks."""
        (q_smem, kvw_smem, k_bufs, v_bufs, q_ready, q_empty, kvw_ready, kvw_empty, k_ready, v_ready, empty,
         index_ptr, n_qblocks, num_tiles, H, L, kk, qk_scale, o_ptr, stride_ol, ksum_ptr,
         bias_ptr) = operands  # fmt: skip
        SUB_M: gl.constexpr = q_smem.shape[1]
        D: gl.constexpr = q_smem.shape[2]
        PAIR: gl.constexpr = k_bufs.shape[1]
        BLKK: gl.constexpr = PAIR // 2
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, PAIR, 16]
        )
        operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=layout, k_width=2)
        rows_of: gl.constexpr = gl.SliceLayout(1, layout)
        cols_of: gl.constexpr = gl.SliceLayout(0, layout)
        keys = gl.arange(0, PAIR, layout=cols_of)
        d = gl.arange(0, D, layout=cols_of)
        zeros = gl.zeros([SUB_M, PAIR], gl.float32, layout)
        it = 0
        local = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            bh, sample, first_row, column, qblock, index_row = _tile(t, n_qblocks, H, L, kk, index_ptr, D)
            buf = local % 2
            q = q_smem.index(2 * buf + SUB)
            m_i = gl.full([SUB_M], float("-inf"), gl.float32, rows_of)
            l_i = gl.zeros([SUB_M], gl.float32, rows_of)
            acc = gl.zeros([SUB_M, D], gl.float32, layout)
            mbarrier.wait(q_ready.index(buf), (local // 2) & 1)
            for pair in range(0, gl.cdiv(kk, 2)):
                slot = it % STAGES
                phase = (it // STAGES) & 1
                mbarrier.wait(k_ready.index(slot), phase)
                s = warpgroup_mma(q, k_bufs.index(slot).permute((1, 0)), zeros, use_acc=False, is_async=True)
                valid = _valid_keys(index_row, pair, kk, L, keys, BLKK)  # loads while the MMA runs
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                p, m_i, l_i, alpha = _online_softmax(s, valid, m_i, l_i, qk_scale)
                acc = acc * alpha[:, None]
                mbarrier.wait(v_ready.index(slot), phase)
                p = gl.convert_layout(p.to(gl.bfloat16), operand)
                acc = warpgroup_mma(p, v_bufs.index(slot), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(empty.index(slot), count=1)
                it += 1
            o = acc / l_i[:, None]
            if HAS_LINEAR:
                # Round o_s to bf16 as upstream; then proj_l(φ(q)·KV / (1e-5 + φ(q)·ksum)) as sla._linear_branch.
                o = o.to(gl.bfloat16).to(gl.float32)
                phi = _softmax_rows(q.load(layout).to(gl.float32))
                mbarrier.arrive(q_empty.index(buf), count=1)
                denominator = gl.sum(phi * gl.load(ksum_ptr + bh * D + d)[None, :], axis=1) + 1e-5
                mbarrier.wait(kvw_ready, local & 1)
                o_l = warpgroup_mma(
                    gl.convert_layout(phi.to(gl.bfloat16), operand), kvw_smem, gl.zeros_like(acc)
                )
                mbarrier.arrive(kvw_empty, count=1)
                o = o + o_l / denominator[:, None] + gl.load(bias_ptr + d).to(gl.float32)[None, :]
            else:
                mbarrier.arrive(q_empty.index(buf), count=1)
            rows = qblock * 2 * SUB_M + SUB * SUB_M + gl.arange(0, SUB_M, layout=rows_of)
            at = (
                o_ptr
                + sample.to(gl.int64) * L * stride_ol
                + rows.to(gl.int64)[:, None] * stride_ol
                + (column + d)[None, :]
            )
            gl.store(at, o.to(gl.bfloat16), mask=(rows < L)[:, None])
            local += 1

    @gluon.jit
    def _sparse_ws_kernel(
        q_desc,
        k_desc,
        v_desc,
        kvw_desc,
        o_ptr,
        index_ptr,
        ksum_ptr,
        bias_ptr,
        L,
        H,
        n_qblocks,
        num_tiles,
        kk,
        qk_scale,
        stride_ol,
        STAGES: gl.constexpr,
        HAS_LINEAR: gl.constexpr,
    ):
        """o [B, L, H, D] (bf16, contiguous rows of H * D) = softmax attention of each query block over its
        kk selected key blocks (block_index [B, H, n_qblocks, kk]), plus the linear branch if HAS_LINEAR.
        Persistent: program i takes tiles (query blocks of every head) i, i + programs, ..."""
        SUB_M: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BLKK: gl.constexpr = k_desc.block_type.shape[0]
        tile_layout: gl.constexpr = q_desc.layout
        # Two buffers of a block's two query halves, 64 KB; KV·Wᵀ's tile, 32 KB (unused without
        # HAS_LINEAR); the ring of key-block pairs, 64 KB a slot: 224 KB.
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [4, SUB_M, D], tile_layout)
        kvw_smem = gl.allocate_shared_memory(gl.bfloat16, [D, D], kvw_desc.layout)
        k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 2 * BLKK, D], tile_layout)
        v_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 2 * BLKK, D], tile_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        kvw_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kvw_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for buf in gl.static_range(2):
            mbarrier.init(q_ready.index(buf), count=1)
            mbarrier.init(q_empty.index(buf), count=2)
        mbarrier.init(kvw_ready, count=1)
        mbarrier.init(kvw_empty, count=2)
        for slot in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(slot), count=1)
            mbarrier.init(v_ready.index(slot), count=1)
            mbarrier.init(empty.index(slot), count=2)  # both consumers release a pair

        operands = (q_smem, kvw_smem, k_bufs, v_bufs, q_ready, q_empty, kvw_ready, kvw_empty, k_ready, v_ready,
                    empty, index_ptr, n_qblocks, num_tiles, H, L, kk, qk_scale, o_ptr, stride_ol, ksum_ptr,
                    bias_ptr)  # fmt: skip
        loads = (q_desc, k_desc, v_desc, kvw_desc, q_smem, kvw_smem, k_bufs, v_bufs, q_ready, q_empty, kvw_ready,
                 kvw_empty, k_ready, v_ready, empty, index_ptr, n_qblocks, num_tiles, H, L, kk)  # fmt: skip
        gl.warp_specialize(
            [
                (_consumer, (0, STAGES, HAS_LINEAR, operands)),
                (_consumer, (1, STAGES, HAS_LINEAR, operands)),
                (_load_partition, (STAGES, HAS_LINEAR, loads)),
            ],
            [4, 1],
            [232, 24],
        )


def _layout(block: list[int]) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


def sparse_attention_ws(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    qk_scale: float,
    linear: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """``sla.block_sparse_attention`` for inputs ``takes`` accepts. ``qk_scale``: log2(e) / sqrt(D), the
    base-2 softmax's; ``linear``: ``sla._linear_params``'s (KV·Wᵀ [B*H, D, D] bf16, ksum [B*H, D] fp32,
    bias [D]) or None."""
    batch, length, heads, dim = q.shape
    n_qblocks = triton.cdiv(length, BLKQ)
    out = torch.empty((batch, length, heads, dim), dtype=q.dtype, device=q.device)
    tile = [SUB_M, dim]
    q_desc, k_desc, v_desc = (
        TensorDescriptor.from_tensor(_rows_view(x), block, _layout(block))
        for x, block in ((q, tile), (k, [BLKK, dim]), (v, [BLKK, dim]))
    )
    if linear is None:
        kvw_desc, ksum, bias = q_desc, out, out  # never read
    else:
        kvw, ksum, bias = linear
        kvw_desc = TensorDescriptor.from_tensor(kvw.reshape(-1, dim), [dim, dim], _layout([dim, dim]))
    num_tiles = n_qblocks * batch * heads
    _sparse_ws_kernel[(min(num_tiles, sm_count(q.device)),)](
        q_desc,
        k_desc,
        v_desc,
        kvw_desc,
        out,
        block_index,
        ksum,
        bias,
        length,
        heads,
        n_qblocks,
        num_tiles,
        block_index.shape[3],
        qk_scale,
        out.stride(1),
        STAGES=STAGES,
        HAS_LINEAR=linear is not None,
        num_warps=4,
        maxnreg=MAX_REGISTERS,
    )
    return out
