"""Hopper's warp-specialized W8A8 int8 GEMM, in Gluon: the same product, bits and operands as
kernels/int8_gemm.py (whose docstring has the formula), scheduled by hand.

One persistent program per SM walks 128x128 output tiles (128x256 for most products, below), in the
grouped order of kernels/int8_gemm.py, with three partitions: one warp issues the bulk tensor copies
(TMA) of each 128-wide K block (two 64-row activation tiles and a 128-row weight tile, or two) into a
ring of STAGES shared-memory slots, two K blocks (a pair of slots) at a time; two consumer warpgroups
each own 64 of a tile's rows. A consumer issues the int8 MMAs of a pair into two int32 partials, then
converts and scales the first while the second multiplies, and frees the pair when both are done. The
consumers run independently, so one's scale work overlaps the other's MMAs as well, and the copy warp
fetches the next tile while they round and store this one. K must therefore span an even number of
blocks (every Wan linear's does). With a residual, the copy warp also fetches each 128x128 tile's
residual stream as the tile starts, into one of two slots (a wide tile's: below), and the consumers add
their gated output to it before the store.

With ``gelu_scales`` (the FFN's first linear, at K of GELU_MIN_K and more), the output is ffn.2's
int8 input. A 128x128 output tile is exactly one of its scale tiles, so a fourth partition, a warpgroup
of its own, applies the GELU to each tile and quantizes it (``quant.gelu_tanh_quantize``'s helpers and
bits) while the consumers multiply the next one; they hand each rounded tile over through one of two
shared-memory slots. The bf16 product never goes to memory and back. With ``row_moments`` (the o
projections and ffn.2, which write the residual stream a LayerNorm reads next) in 128x128 tiles (N an
odd number of 128-column tiles; Wan's run wide, below), the fourth partition instead reads each tile
from the consumers' store buffers and writes each row's mean and sum of squared deviations in it, so
the LayerNorm needs no statistics pass over the stream; with
``column_amax`` (the v projection, whose output SageSLA turns into fp8) it raises each sample's
per-column amax from them, so the fp8 preparation needs no pass of its own to find its ranges.

For a plain product (no residual, statistics or GELU) a tile is 128x256: each K block's operands then
cost 48 KB of L2 reads for twice the work of a 128x128 tile's 32 KB (ncu: the 128x128 kernel ran its L2
at 55-69 % of peak, its SMs at 53-59 %). Registers allow no 64x256 int32 partial beside its fp32 tile,
so a consumer keeps two fp32 halves and multiplies and scales them one after the other through one
partial, the other consumer's MMAs filling the tensor cores meanwhile. Four stages of these operands
take 192 KB and the consumers 240 registers a thread: no residual slots and no epilogue partition fit
beside them. A product with a residual and row moments (the o projections, ffn.2) takes wide tiles all
the same: the tile's stream follows its K blocks through the operand ring as one more pair (in its
weight slots), and the consumers take the moments from their registers while the tile is stored.
GELU and the column amax (partitions) and the row square sums (4 % slower wide) keep 128x128 tiles.

Triton's own pipeliner cannot do this for an int32 accumulator: it waits for each K block's MMA before
the scale work (kernels/int8_gemm.py keeps several small programs per SM instead). No MMA stays in flight
across the loop's back edge: ptxas serializes every MMA of a kernel that carries one there (the
version that did ran 8-23 % slower on an H200).

Needs Gluon as Triton 3.6 has it (``gluon_hopper.available``); int8_gemm picks it by ``gemm_launch``.
"""

from __future__ import annotations

import torch
import triton

from .gluon_hopper import (
    TensorDescriptor,
    fence_async_shared,
    gl,
    gluon,
    mbarrier,
    smem_reinterpret,
    tma,
    tma_load,
    tma_store,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from .gpu import sm_count
from .quant import QUANT_BLOCK, gelu_tanh, quantize_with
from .rounding import to_bf16_pairs

SUB_M = 64  # rows per consumer warpgroup (one warpgroup MMA is 64 rows)
BLOCK_N = 128
BLOCK_K = 128
# 32 KB of operands a stage, an even number of stages (K blocks go in pairs). H200, GPU held: four ran
# 1-7 % faster than six (the most that fit an H100's 227 KB beside the 32 KB output tile) at five of
# the six Wan shapes (1.3B ffn.2: 2 % slower), bit-identical.
STAGES = 4


# The GELU partition's arithmetic shares the SMs' issue slots with the consumers' scale work, so it
# hides only behind a K loop long enough. H200, ffn.0 with its GELU -> int8: at 14B (K 5120) 10.3-10.5 ms
# against 11.3-11.7 ms for the GEMM and then the GELU pass (the GEMM alone: 10.2-10.6); at 1.3B
# (K 1536) 1.10-1.17 against 1.10-1.11 ms, a draw. The H100, whose memory is slower, gains at both: 1.3B
# 1.15-1.28 against 1.21-1.25 ms, and its 4-step DiT took 0.611-0.615 against 0.617-0.622 s.
GELU_MIN_K = 1536


# What the kernels also write of their output (their STATS): nothing; each row's sum of squares per
# 128-column tile (an RMSNorm's statistics), or its mean and sum of squared deviations (a LayerNorm's);
# or each sample's largest |value| of each column (an fp8 V's per-channel ranges). The kinds from
# ROW_MOMENTS on are taken by the warp-specialized kernel's epilogue partition from the stored tiles.
NO_STATS = triton.language.constexpr(0)
SQUARE_SUMS = triton.language.constexpr(1)
ROW_MOMENTS = triton.language.constexpr(2)
COLUMN_AMAX = triton.language.constexpr(3)


def stats_kind(
    square_sums: torch.Tensor | None,
    row_moments: torch.Tensor | None,
    column_amax: torch.Tensor | None = None,
) -> int:
    """The STATS of a launch given these (at most one)."""
    if square_sums is not None:
        return SQUARE_SUMS.value
    if column_amax is not None:
        return COLUMN_AMAX.value
    return NO_STATS.value if row_moments is None else ROW_MOMENTS.value


def takes_k(k: int) -> bool:
    """Whether K spans an even number of 128-wide blocks, the pairs the kernel takes them in."""
    return triton.cdiv(k, BLOCK_K) % 2 == 0


if gluon is not None:

    @gluon.jit
    def _tile_offsets(
        tile, grid_m, grid_n, GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr
    ):
        # Grouped order: consecutive tiles share weight columns in L2.
        per_group = GROUP_M * grid_n
        first_m = (tile // per_group) * GROUP_M
        group_rows = gl.minimum(grid_m - first_m, GROUP_M)
        off_m = (first_m + (tile % per_group) % group_rows) * BLOCK_M
        off_n = ((tile % per_group) // group_rows) * BLOCK_N
        return off_m, off_n

    @gluon.jit
    def _load_partition(
        GROUP_M: gl.constexpr, STAGES: gl.constexpr, RESIDUAL: gl.constexpr, HALVES: gl.constexpr, loads
    ):
        a_desc, w_desc, a_bufs, w_bufs, ready, empty, residual, grid_m, grid_n, k_blocks = loads
        SUB_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        PAIRS: gl.constexpr = STAGES // 2
        s_desc, s_bufs, s_ready, s_empty = residual
        pair = 0
        index = 0  # of the program's tiles
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, grid_m, grid_n, GROUP_M, 2 * SUB_M, HALVES * BLOCK_N)
            if RESIDUAL and HALVES == 1:
                # The tile's residual stream first, into the slot of the tile before last (read by now):
                # it has the whole K loop to land.
                slot = index % 2
                mbarrier.wait(s_empty.index(slot), ((index // 2) & 1) ^ 1)
                mbarrier.expect(s_ready.index(slot), 2 * s_desc.block_type.nbytes)
                for half in gl.static_range(2):
                    tma_load(
                        s_desc,
                        [off_m + half * SUB_M, off_n],
                        s_ready.index(slot),
                        s_bufs.index(2 * slot + half),
                    )
            index += 1
            for kb in range(0, k_blocks, 2):
                ring = pair % PAIRS
                # A pair of slots starts free: the first wait on its "empty" barrier is on the phase
                # before init.
                mbarrier.wait(empty.index(ring), ((pair // PAIRS) & 1) ^ 1)
                bar = ready.index(ring)
                mbarrier.expect(bar, 2 * (2 * a_desc.block_type.nbytes + HALVES * w_desc.block_type.nbytes))
                for half in gl.static_range(2):
                    slot = 2 * ring + half
                    k = (kb + half) * BLOCK_K
                    tma_load(a_desc, [off_m, k], bar, a_bufs.index(2 * slot))
                    tma_load(a_desc, [off_m + SUB_M, k], bar, a_bufs.index(2 * slot + 1))
                    for col in gl.static_range(HALVES):  # a wide tile's weight rows as two boxes
                        tma_load(w_desc, [off_n + col * BLOCK_N, k], bar, w_bufs.index(HALVES * slot + col))
                pair += 1
            if RESIDUAL and HALVES == 2:
                # A wide tile's stream (64 KB, no room for slots of its own) follows its K blocks through
                # the ring, in the weight tiles of a pair: piece (rows SUB, columns col) in 2 * SUB + col.
                ring = pair % PAIRS
                mbarrier.wait(empty.index(ring), ((pair // PAIRS) & 1) ^ 1)
                bar = ready.index(ring)
                mbarrier.expect(bar, 4 * s_desc.block_type.nbytes)
                for piece in gl.static_range(4):
                    tma_load(
                        s_desc,
                        [off_m + (piece // 2) * SUB_M, off_n + (piece % 2) * BLOCK_N],
                        bar,
                        s_bufs.index(4 * ring + piece),
                    )
                pair += 1

    @gluon.jit
    def _issue(a_bufs, w_bufs, slot, w_slot, acc_layout_zeros, SUB: gl.constexpr):
        """Starts the MMA of the K block in ``slot`` (landed) with the weight tile in ``w_slot``."""
        w_tile = w_bufs.index(w_slot).permute((1, 0))
        return warpgroup_mma(
            a_bufs.index(2 * slot + SUB), w_tile, acc_layout_zeros, use_acc=False, is_async=True
        )

    @gluon.jit
    def _product(a_bufs, w_bufs, slot, w_slot, zeros, SUB: gl.constexpr):
        """The int32 partial of the K block in ``slot`` with the weight tile in ``w_slot``, waited for."""
        partial = _issue(a_bufs, w_bufs, slot, w_slot, zeros, SUB)
        return warpgroup_mma_wait(num_outstanding=0, deps=(partial,))

    @gluon.jit
    def _scale(a_scales, w_scales, rows_ok, kb):
        return gl.load(a_scales + kb, mask=rows_ok, other=0.0) * gl.load(w_scales + kb)

    @gluon.jit
    def _gated(stream, out, gate, HAS_GATE: gl.constexpr):
        """norms.gated_update: bf16(stream + bf16(out * bf16(gate))), or bf16(stream + out) without a gate."""
        update = out.to(gl.float32)
        if HAS_GATE:
            update = (update * gate.to(gl.bfloat16).to(gl.float32)).to(gl.bfloat16).to(gl.float32)
        return (stream.to(gl.float32) + update).to(gl.bfloat16)

    @gluon.jit
    def _store_moments(out, rows, chunk, n_chunks, stats_ptr, M):
        """Each row's mean and sum of squared deviations in a 128-column chunk of the output, from the
        consumer's registers (as ``_moments_tiles`` takes them from the stored tile)."""
        y = out.to(gl.float32)
        mean = gl.sum(y, axis=1) * (1.0 / y.shape[1])
        deviation = y - mean[:, None]
        at = stats_ptr + (rows * n_chunks + chunk) * 2
        gl.store(at, mean, mask=rows < M)
        gl.store(at + 1, gl.sum(deviation * deviation, axis=1), mask=rows < M)

    @gluon.jit
    def _consumer(
        SUB: gl.constexpr,
        STAGES: gl.constexpr,
        GROUP_M: gl.constexpr,
        RESIDUAL: gl.constexpr,
        HAS_GATE: gl.constexpr,
        SHARED_GATE: gl.constexpr,
        STATS: gl.constexpr,
        GELU: gl.constexpr,
        HALVES: gl.constexpr,
        operands,
    ):
        """The warpgroup that computes rows SUB * 64 .. SUB * 64 + 63 of each of the program's tiles."""
        (
            a_bufs,
            w_bufs,
            ready,
            empty,
            c_desc,
            c_bufs,
            handoff,
            a_scale_ptr,
            w_scale_ptr,
            bias_ptr,
            residual,
            gate_ptr,
            rows_per_sample,
            stride_gate,
            stats_ptr,
            grid_m,
            grid_n,
            M,
            N,
            k_blocks,
        ) = operands
        _, s_bufs, s_ready, s_empty = residual
        h_full, h_empty = handoff
        SUB_M: gl.constexpr = c_bufs.shape[1]
        BLOCK_N: gl.constexpr = c_bufs.shape[2]
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
        )
        zeros = gl.zeros([SUB_M, BLOCK_N], gl.int32, layout)
        READ_BACK: gl.constexpr = STATS >= ROW_MOMENTS and HALVES == 1  # by the epilogue partition
        tile_smem = c_bufs.index(SUB)  # unused with GELU
        n_chunks = gl.cdiv(N, BLOCK_N)  # 128-column chunks a row of square sums has
        PAIRS: gl.constexpr = STAGES // 2
        pair = 0
        index = 0  # of the program's tiles
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, grid_m, grid_n, GROUP_M, 2 * SUB_M, HALVES * BLOCK_N)
            # Both 64-row halves lie in one 128-row activation scale row; rows past M read no scale.
            a_scales = a_scale_ptr + (off_m // 128) * k_blocks
            w_scales = w_scale_ptr + (off_n // 128) * k_blocks
            rows_ok = off_m + SUB * SUB_M < M
            if HALVES == 1:
                acc = gl.zeros([SUB_M, BLOCK_N], gl.float32, layout)
                for kb in range(0, k_blocks, 2):
                    ring = pair % PAIRS
                    mbarrier.wait(ready.index(ring), (pair // PAIRS) & 1)
                    first = _issue(a_bufs, w_bufs, 2 * ring, 2 * ring, zeros, SUB)
                    second = _issue(a_bufs, w_bufs, 2 * ring + 1, 2 * ring + 1, zeros, SUB)
                    # The scales load while the MMAs run.
                    first_scale = _scale(a_scales, w_scales, rows_ok, kb)
                    second_scale = _scale(a_scales, w_scales, rows_ok, kb + 1)
                    # float(partial) is exact (|partial| <= 2^21); one rounding per K block, as
                    # kernels/int8_gemm.py.
                    first = warpgroup_mma_wait(num_outstanding=1, deps=(first,))
                    acc = gl.fma(first.to(gl.float32), first_scale, acc)
                    second = warpgroup_mma_wait(num_outstanding=0, deps=(second,))
                    acc = gl.fma(second.to(gl.float32), second_scale, acc)
                    mbarrier.arrive(empty.index(ring), count=1)
                    pair += 1
                accs = (acc,)
            else:
                # A wide tile: 64 x 256 a warpgroup, as two fp32 accumulators whose K blocks multiply
                # and scale one after the other through one int32 partial (the other warpgroup's MMAs
                # keep the tensor cores busy meanwhile).
                lo = gl.zeros([SUB_M, BLOCK_N], gl.float32, layout)
                hi = gl.zeros([SUB_M, BLOCK_N], gl.float32, layout)
                for kb in range(0, k_blocks, 2):
                    ring = pair % PAIRS
                    mbarrier.wait(ready.index(ring), (pair // PAIRS) & 1)
                    for block in gl.static_range(2):  # the pair's two K blocks
                        slot = 2 * ring + block
                        a_scale = gl.load(a_scales + kb + block, mask=rows_ok, other=0.0)
                        partial = _product(a_bufs, w_bufs, slot, 2 * slot, zeros, SUB)
                        lo = gl.fma(partial.to(gl.float32), a_scale * gl.load(w_scales + kb + block), lo)
                        # A wait with nothing to wait for, holding lo: otherwise the compiler moves the
                        # scale work past the next MMA's issue and keeps two partials (spills).
                        lo = warpgroup_mma_wait(num_outstanding=0, deps=(lo,))
                        partial = _product(a_bufs, w_bufs, slot, 2 * slot + 1, zeros, SUB)
                        # The second half's weight rows: the next row of weight scales.
                        hi_scale = a_scale * gl.load(w_scales + k_blocks + kb + block)
                        hi = gl.fma(partial.to(gl.float32), hi_scale, hi)
                        hi = warpgroup_mma_wait(num_outstanding=0, deps=(hi,))
                    mbarrier.arrive(empty.index(ring), count=1)
                    pair += 1
                accs = (lo, hi)
                if RESIDUAL:  # the tile's stream, the ring's next pair
                    stream_ring = pair % PAIRS
                    mbarrier.wait(ready.index(stream_ring), (pair // PAIRS) & 1)
            # Each 128-column half (a wide tile has two).
            for col in gl.static_range(HALVES):
                # Rounded to bf16 (nearest even), then the bias added in bf16, as a separate bias add would.
                first_col = off_n + col * BLOCK_N
                cols = first_col + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
                bias = gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
                # The gate's loads go out with the bias's, so their latencies overlap.
                gate = bias[None, :]  # unread without a gate
                if HAS_GATE:
                    if SHARED_GATE:
                        gate = gl.load(gate_ptr + cols, mask=cols < N, other=0.0)[None, :]
                    else:
                        rows = off_m + SUB * SUB_M + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, layout))
                        samples = (rows // rows_per_sample)[:, None]
                        ok = (rows < M)[:, None] & (cols < N)[None, :]
                        gate = gl.load(gate_ptr + samples * stride_gate + cols[None, :], mask=ok, other=0.0)
                out = (accs[col].to(gl.bfloat16).to(gl.float32) + bias[None, :]).to(gl.bfloat16)
                # The statistics of an RMSNorm after the linear: one sum a row of the tile.
                if STATS == SQUARE_SUMS:
                    y = out.to(gl.float32)
                    rows = off_m + SUB * SUB_M + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, layout))
                    sums = gl.sum(y * y, axis=1)
                    gl.store(stats_ptr + rows * n_chunks + first_col // BLOCK_N, sums, mask=rows < M)
                if RESIDUAL:
                    if HALVES == 1:
                        slot = index % 2
                        mbarrier.wait(s_ready.index(slot), (index // 2) & 1)
                        stream = s_bufs.index(2 * slot + SUB).load(layout)
                        mbarrier.arrive(s_empty.index(slot), count=1)
                    else:
                        stream = s_bufs.index(4 * stream_ring + 2 * SUB + col).load(layout)
                        if col == HALVES - 1:  # both pieces read: the pair goes back to the copy warp
                            mbarrier.arrive(empty.index(stream_ring), count=1)
                            pair += 1
                    out = _gated(stream, out, gate, HAS_GATE)
                if GELU:  # to the GELU partition, through the slot of the tile before last (done by now)
                    slot = index % 2
                    mbarrier.wait(h_empty.index(slot), ((index // 2) & 1) ^ 1)
                    c_bufs.index(2 * slot + SUB).store(out)
                    mbarrier.arrive(h_full.index(slot), count=1)
                else:
                    tma.store_wait(pendings=0)  # the previous store from this buffer has left it
                    if READ_BACK:  # and the epilogue partition has read it
                        mbarrier.wait(h_empty.index(0), (index & 1) ^ 1)
                    tile_smem.store(out)
                    fence_async_shared()
                    if READ_BACK:
                        mbarrier.arrive(h_full.index(0), count=1)
                    tma_store(c_desc, [off_m + SUB * SUB_M, first_col], tile_smem)  # clipped at M and N
                    if STATS == ROW_MOMENTS and HALVES == 2:  # while the tile goes out
                        rows = off_m + SUB * SUB_M + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, layout))
                        _store_moments(out, rows, first_col // BLOCK_N, n_chunks, stats_ptr, M)
            index += 1
        tma.store_wait(pendings=0)

    # The epilogue partition reads a tile 16 rows at a time (within its few registers); a warp reads 2
    # rows of 128 bf16, 16 bytes a thread.
    _PIECE = gl.constexpr(16)
    _PIECE_LAYOUT = gl.constexpr(gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0]))

    @gluon.jit
    def _epilogue_partition(GROUP_M: gl.constexpr, GELU: gl.constexpr, STATS: gl.constexpr, epilogue):
        """The warpgroup that finishes each output tile after the consumers, while they multiply the next
        one: its GELU as int8 (``_gelu_tiles``), its row moments (``_moments_tiles``) or its columns'
        amax (``_column_amax_tiles``)."""
        if GELU:
            _gelu_tiles(GROUP_M, epilogue)
        elif STATS == ROW_MOMENTS:
            _moments_tiles(GROUP_M, epilogue)
        else:
            _column_amax_tiles(GROUP_M, epilogue)

    @gluon.jit
    def _moments_tiles(GROUP_M: gl.constexpr, epilogue):
        """Each row's mean and sum of squared deviations in each 128x128 output tile, read from the
        consumers' store buffers (the statistics of a LayerNorm after the GEMM). In the consumers'
        epilogue, with the tensor cores idle meanwhile, this cost 11 % at 1.3B's o projection (H200)."""
        c_bufs, h_full, h_empty, stats_ptr, grid_m, grid_n, M, _, _ = epilogue
        SUB_M: gl.constexpr = c_bufs.shape[1]
        BLOCK_N: gl.constexpr = c_bufs.shape[2]
        PIECE: gl.constexpr = _PIECE
        layout: gl.constexpr = _PIECE_LAYOUT
        piece_rows = gl.arange(0, PIECE, layout=gl.SliceLayout(1, layout))
        index = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, grid_m, grid_n, GROUP_M, 2 * SUB_M, BLOCK_N)
            mbarrier.wait(h_full.index(0), index & 1)
            for half in gl.static_range(2):
                for row in gl.static_range(0, SUB_M, PIECE):
                    y = c_bufs.index(half).slice(row, PIECE).load(layout).to(gl.float32)
                    mean = gl.sum(y, axis=1) * (1.0 / BLOCK_N)
                    deviation = y - mean[:, None]
                    rows = off_m + half * SUB_M + row + piece_rows
                    at = stats_ptr + (rows * grid_n + off_n // BLOCK_N) * 2
                    gl.store(at, mean, mask=rows < M)
                    gl.store(at + 1, gl.sum(deviation * deviation, axis=1), mask=rows < M)
            mbarrier.arrive(h_empty.index(0), count=1)
            index += 1

    # The column-amax partition takes 8-row pieces, one row of 8 columns a thread, and tests rows against
    # a sample's bounds: with a division a row, 16-row pieces spilled 248 bytes at its 72 registers, 8-row
    # ones 24.
    _AMAX_PIECE = gl.constexpr(8)

    @gluon.jit
    def _column_amax_tiles(GROUP_M: gl.constexpr, epilogue):
        """Each sample's largest |value| of each column, taken from the consumers' store buffers tile by
        tile and raised by float atomic max (exact in any order: non-negative floats order as their
        bits do). A tile holds rows of one sample, or of several where it straddles their boundary."""
        c_bufs, h_full, h_empty, stats_ptr, grid_m, grid_n, M, N, rows_per_sample = epilogue
        SUB_M: gl.constexpr = c_bufs.shape[1]
        BLOCK_N: gl.constexpr = c_bufs.shape[2]
        PIECE: gl.constexpr = _AMAX_PIECE
        layout: gl.constexpr = _PIECE_LAYOUT
        piece_rows = gl.arange(0, PIECE, layout=gl.SliceLayout(1, layout))
        tile_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        index = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, grid_m, grid_n, GROUP_M, 2 * SUB_M, BLOCK_N)
            mbarrier.wait(h_full.index(0), index & 1)
            last_row = gl.minimum(off_m + 2 * SUB_M, M) - 1
            for sample in range(off_m // rows_per_sample, last_row // rows_per_sample + 1):
                end = gl.minimum((sample + 1) * rows_per_sample, M)
                peak = gl.zeros([PIECE, BLOCK_N], gl.float32, layout)
                for half in gl.static_range(2):
                    for row in gl.static_range(0, SUB_M, PIECE):
                        rows = off_m + half * SUB_M + row + piece_rows
                        mine = ((rows >= sample * rows_per_sample) & (rows < end))[:, None]
                        y = gl.abs(c_bufs.index(half).slice(row, PIECE).load(layout).to(gl.float32))
                        peak = gl.maximum(peak, gl.where(mine, y, 0.0))
                cols = off_n + tile_cols
                gl.atomic_max(
                    stats_ptr + sample * N + cols, gl.max(peak, axis=0), mask=cols < N, sem="relaxed"
                )
            mbarrier.arrive(h_empty.index(0), count=1)
            index += 1

    @gluon.jit
    def _gelu_tiles(GROUP_M: gl.constexpr, epilogue):
        """Turns each 128x128 output tile into ffn.2's int8 input: the GELU rounded to bf16 (in place in
        the hand-off slot) and the tile's amax, then the int8 values and the scale."""
        q_desc, q_smem, h_bufs, h_full, h_empty, q_scale_ptr, grid_m, grid_n, M = epilogue
        SUB_M: gl.constexpr = h_bufs.shape[1]
        BLOCK_N: gl.constexpr = h_bufs.shape[2]
        PIECE: gl.constexpr = _PIECE
        layout: gl.constexpr = _PIECE_LAYOUT
        piece_rows = gl.arange(0, PIECE, layout=gl.SliceLayout(1, layout))
        index = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, grid_m, grid_n, GROUP_M, 2 * SUB_M, BLOCK_N)
            slot = index % 2
            mbarrier.wait(h_full.index(slot), (index // 2) & 1)
            peak = gl.zeros([PIECE, BLOCK_N], gl.float32, layout)
            for half in gl.static_range(2):
                for row in gl.static_range(0, SUB_M, PIECE):
                    piece = h_bufs.index(2 * slot + half).slice(row, PIECE)
                    # Rows past M are the matrix's zero padding (the consumers wrote the bias there).
                    inside = (off_m + half * SUB_M + row + piece_rows < M)[:, None]
                    y = to_bf16_pairs(gelu_tanh(gl.where(inside, piece.load(layout).to(gl.float32), 0.0)))
                    piece.store(y)
                    peak = gl.maximum(peak, gl.abs(y.to(gl.float32)))
            amax = gl.maximum(gl.max(gl.max(peak, axis=1), axis=0), 1e-8)
            tma.store_wait(pendings=0)  # the previous tile's int8 values have left q_smem
            for half in gl.static_range(2):
                for row in gl.static_range(0, SUB_M, PIECE):
                    y = h_bufs.index(2 * slot + half).slice(row, PIECE).load(layout).to(gl.float32)
                    q_smem.slice(half * SUB_M + row, PIECE).store(quantize_with(y, amax))
            mbarrier.arrive(h_empty.index(slot), count=1)
            fence_async_shared()
            tma_store(q_desc, [off_m, off_n], q_smem)  # clipped at M and N
            gl.store(q_scale_ptr + (off_m // (2 * SUB_M)) * grid_n + off_n // BLOCK_N, amax * (1.0 / 128.0))
            index += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _int8_gemm_ws_kernel(
        a_desc,
        w_desc,
        c_desc,
        a_scale_ptr,
        w_scale_ptr,
        bias_ptr,
        s_desc,
        gate_ptr,
        stats_ptr,
        q_scale_ptr,
        M,
        N,
        K,
        rows_per_sample,
        stride_gate,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        RESIDUAL: gl.constexpr,
        HAS_GATE: gl.constexpr,
        SHARED_GATE: gl.constexpr,
        STATS: gl.constexpr,
        GELU: gl.constexpr,
        HALVES: gl.constexpr,
    ):
        """c_desc: the output's tiles, bf16 [64, 128]; with GELU int8 [128, 128], their scales at
        q_scale_ptr. HALVES: 2 for 128x256 tiles (``tile_halves``), else 1."""
        SUB_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        k_blocks = gl.cdiv(K, BLOCK_K)
        grid_m = gl.cdiv(M, 2 * SUB_M)
        # A wide tile's two store halves fill the shared memory its operands leave: its stream comes
        # through the operand ring, its row moments from the consumers' registers, no epilogue buffers.
        gl.static_assert(HALVES == 1 or not (GELU or STATS == SQUARE_SUMS or STATS == COLUMN_AMAX))
        PARTITION: gl.constexpr = GELU or (STATS >= ROW_MOMENTS and HALVES == 1)  # an epilogue's own
        grid_n = gl.cdiv(N, HALVES * BLOCK_N)

        a_bufs = gl.allocate_shared_memory(gl.int8, [2 * STAGES, SUB_M, BLOCK_K], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(gl.int8, [HALVES * STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([SUB_M, BLOCK_N], gl.bfloat16)
        if GELU:  # the consumers' tiles in two slots for the GELU partition, and its int8 tile
            c_bufs = gl.allocate_shared_memory(gl.bfloat16, [4, SUB_M, BLOCK_N], tile_layout)
            q_smem = gl.allocate_shared_memory(gl.int8, [2 * SUB_M, BLOCK_N], c_desc.layout)
        else:
            c_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, SUB_M, BLOCK_N], c_desc.layout)
        h_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        h_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for slot in gl.static_range(2):  # the row moments use slot 0, their tiles' store buffers
            mbarrier.init(h_full.index(slot), count=2)  # both consumers have written their half
            mbarrier.init(h_empty.index(slot), count=1)
        # One ready and one empty barrier a pair of slots (two K blocks): Triton's shared-memory hazard
        # analysis puts a warpgroup barrier before each wait and arrive that follows another (ncu: 45 %
        # of the stalls with a barrier pair per slot, four a K-block pair; now two).
        ready = gl.allocate_shared_memory(gl.int64, [STAGES // 2, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES // 2, 1], mbarrier.MBarrierLayout())
        for ring in gl.static_range(STAGES // 2):
            mbarrier.init(ready.index(ring), count=1)
            mbarrier.init(empty.index(ring), count=2)  # both consumers release a pair
        # The residual stream's two 64-row halves of two tiles (a placeholder without a residual): 224 KB
        # of shared memory in all, within an H100's 227.
        if RESIDUAL and HALVES == 1:
            s_bufs = gl.allocate_shared_memory(gl.bfloat16, [4, SUB_M, BLOCK_N], s_desc.layout)
        elif RESIDUAL:  # a wide tile's stream: 64-row halves of 128 columns in the weight slots' 16 KB
            s_bufs = smem_reinterpret(w_bufs, gl.bfloat16, [HALVES * STAGES, SUB_M, BLOCK_N], s_desc.layout)
        else:
            s_bufs = gl.allocate_shared_memory(gl.bfloat16, [1, 8, BLOCK_N], tile_layout)
        s_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        s_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for slot in gl.static_range(2):
            mbarrier.init(s_ready.index(slot), count=1)
            mbarrier.init(s_empty.index(slot), count=2)  # both consumers have read their half
        residual = (s_desc, s_bufs, s_ready, s_empty)
        operands = (
            a_bufs,
            w_bufs,
            ready,
            empty,
            c_desc,
            c_bufs,
            (h_full, h_empty),
            a_scale_ptr,
            w_scale_ptr,
            bias_ptr,
            residual,
            gate_ptr,
            rows_per_sample,
            stride_gate,
            stats_ptr,
            grid_m,
            grid_n,
            M,
            N,
            k_blocks,
        )
        loads = (a_desc, w_desc, a_bufs, w_bufs, ready, empty, residual, grid_m, grid_n, k_blocks)
        if PARTITION:
            if GELU:
                epilogue = (c_desc, q_smem, c_bufs, h_full, h_empty, q_scale_ptr, grid_m, grid_n, M)
            else:
                epilogue = (c_bufs, h_full, h_empty, stats_ptr, grid_m, grid_n, M, N, rows_per_sample)
            gl.warp_specialize(
                [
                    (
                        _consumer,
                        (0, STAGES, GROUP_M, RESIDUAL, HAS_GATE, SHARED_GATE, STATS, GELU, HALVES, operands),
                    ),
                    (
                        _consumer,
                        (1, STAGES, GROUP_M, RESIDUAL, HAS_GATE, SHARED_GATE, STATS, GELU, HALVES, operands),
                    ),
                    (_epilogue_partition, (GROUP_M, GELU, STATS, epilogue)),
                    (_load_partition, (GROUP_M, STAGES, RESIDUAL, HALVES, loads)),
                ],
                [4, 4, 1],
                # Four warpgroups share the register file (512 a thread): the consumers' 192 fit in 208.
                [208, 72, 24],
            )
        else:
            gl.warp_specialize(
                [
                    (
                        _consumer,
                        (0, STAGES, GROUP_M, RESIDUAL, HAS_GATE, SHARED_GATE, STATS, GELU, HALVES, operands),
                    ),
                    (
                        _consumer,
                        (1, STAGES, GROUP_M, RESIDUAL, HAS_GATE, SHARED_GATE, STATS, GELU, HALVES, operands),
                    ),
                    (_load_partition, (GROUP_M, STAGES, RESIDUAL, HALVES, loads)),
                ],
                [4, 1],
                # Two int32 partials and the fp32 tile (a wide tile: two fp32 halves and one partial):
                # 192 registers a thread, which ptxas fits at 232 (a wide tile's at 240).
                [224 + 8 * HALVES, 24],
            )


def tile_halves(
    n: int,
    square_sums: torch.Tensor | None,
    gelu_scales: torch.Tensor | None,
    column_amax: torch.Tensor | None,
) -> int:
    """2 where a launch walks 128x256 tiles, else 1 (128x128): products whose N is whole 256-column tiles,
    plain or with a residual and row moments, not those whose epilogue needs a partition or (the square
    sums) ran slower wide."""
    narrow = gelu_scales is not None or square_sums is not None or column_amax is not None
    return 1 if narrow or n % (2 * BLOCK_N) else 2


def _layout(block: list[int], dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for(block, dtype)


def int8_gemm_ws(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    group_m: int,
    residual: tuple[torch.Tensor, torch.Tensor | None, int, int] | None = None,
    square_sums: torch.Tensor | None = None,
    row_moments: torch.Tensor | None = None,
    gelu_scales: torch.Tensor | None = None,
    column_amax: torch.Tensor | None = None,
) -> None:
    """out[M, N] = the W8A8 product of int8 ``a`` [M, K] and ``weight`` [N, K] (rows 16-byte aligned)
    plus ``bias``, for K of an even number of 128-wide blocks. Triton 3.6 fails to compile the kernel
    without a bias; every Wan linear has one. ``residual`` (stream [M, N], gate rows or None, rows per
    sample, gate row stride or 0 for one row): out = norms.gated_residual(stream, product, gate).
    ``square_sums`` (fp32 [M, N / 128], no residual): each row's sum of squares of a tile's output.
    ``row_moments`` (fp32 [M, N / 128, 2]): each row's mean and sum of squared deviations in a tile of
    out (after the residual).
    ``column_amax`` (fp32 [B, N], zeros, no residual): raised to each sample's largest |value| of each
    column of out, the M rows being B samples' rows one after another.
    ``gelu_scales`` (fp32 [M / 128, N / 128], nothing else): out is int8 and, with these, holds
    ``quant.gelu_tanh_quantize`` of the output."""
    m, k = a.shape
    n = weight.shape[0]
    if not takes_k(k):
        raise ValueError(f"the warp-specialized int8 GEMM takes K blocks in pairs; K={k} has an odd count")
    halves = tile_halves(n, square_sums, gelu_scales, column_amax)
    # An epilogue partition of its own (the kernel's PARTITION): 128x128 tiles' GELU, moments or amax.
    partition = halves == 1 and any(s is not None for s in (gelu_scales, row_moments, column_amax))
    tiles = triton.cdiv(m, 2 * SUB_M) * triton.cdiv(n, halves * BLOCK_N)
    grid = (min(tiles, sm_count(a.device)),)
    a_desc = TensorDescriptor.from_tensor(a, [SUB_M, BLOCK_K], _layout([SUB_M, BLOCK_K], gl.int8))
    out_tile = _layout([SUB_M, BLOCK_N], gl.bfloat16)
    if gelu_scales is None:
        c_desc = TensorDescriptor.from_tensor(out, [SUB_M, BLOCK_N], out_tile)
    else:
        c_desc = TensorDescriptor.from_tensor(
            out, [QUANT_BLOCK, BLOCK_N], _layout([QUANT_BLOCK, BLOCK_N], gl.int8)
        )
    stream, gate, rows_per_sample, stride_gate = residual or (None, None, 1, 0)
    if column_amax is not None:
        rows_per_sample = m // column_amax.shape[0]
    stats = next((s for s in (square_sums, row_moments, column_amax) if s is not None), None)
    _int8_gemm_ws_kernel[grid](
        a_desc,
        TensorDescriptor.from_tensor(weight, [BLOCK_N, BLOCK_K], _layout([BLOCK_N, BLOCK_K], gl.int8)),
        c_desc,
        a_scale,
        weight_scale,
        bias,
        c_desc if stream is None else TensorDescriptor.from_tensor(stream, [SUB_M, BLOCK_N], out_tile),
        bias if gate is None else gate,  # unread without a gate
        bias if stats is None else stats,  # unread without either
        bias if gelu_scales is None else gelu_scales,
        m,
        n,
        k,
        rows_per_sample,
        stride_gate,
        GROUP_M=group_m,
        STAGES=STAGES,
        RESIDUAL=residual is not None,
        HAS_GATE=gate is not None,
        SHARED_GATE=stride_gate == 0,
        STATS=stats_kind(square_sums, row_moments, column_amax),
        GELU=gelu_scales is not None,
        HALVES=halves,
        num_warps=4,
        # 168 registers a thread over the kernel's 12 warps (16 with the epilogue partition: 128) fill
        # the register file; the partitions then trade them (warp_specialize's counts).
        maxnreg=128 if partition else 168,
        # The gated residual rounds the gated output before adding it; with contraction the compiler
        # made the two one bf16 fma (the K loop's fma is explicit either way).
        enable_fp_fusion=False,
    )
