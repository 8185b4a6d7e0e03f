"""W8A8 int8 GEMM with blockwise scales (upstream-spec §5.4), bias fused, bf16 out.

Operands: activation ``a`` [M, K] (int8 with tile scales [ceil(M/128), ceil(K/128)], or bf16 that the
kernel quantizes per 128x128 tile on load), weight ``w`` [N, K] int8 row-major exactly as the
checkpoint stores it (``int8_weight``) with ``scale`` [ceil(N/128), ceil(K/128)] fp32.

Per output tile and 128-wide K block kb, in K order:
    P = sum_k a_q[m, k] * w_q[n, k]            exact int32 (tensor cores)
    acc += float(P) * (s_a[m // 128, kb] * s_w[n // 128, kb])
with one fp32 rounding per step (a fused multiply-add, as upstream's kernel and the reference
turbovideo.models.int8.int8_gemm_reference do), then y = bf16(acc) and y = bf16(y + bias) with a
bf16 bias (the model is bf16 throughout). Bit-identical to the reference: the int32 partials are
exact and each accumulation step rounds once in both. Both operands are K-major, the layout int8
tensor cores read fastest (``tl.dot(a, w.T)``), and stream in through bulk tensor copies (TMA) on
Hopper, through pointer loads pipelined as async copies before it.

A tile of BLOCK_M = 64 or 128 rows lies in one activation scale row, so the activation scale is a
scalar per K block and the scale work per accumulator element is one conversion (Hopper's I2FP) and
one fused multiply-add. (An accumulator started at the bits of 1.5 * 2^23, whose float minus
1.5 * 2^23 is the partial, needs a move per element to restart it: 5-11 % slower at 1.3B's shapes on
an H200.) That work waits for each K block's MMA; small tiles let several programs share an SM, so
one's scale work overlaps another's MMA (``gemm_launch``). On Hopper, the products over a video's
tokens run kernels/int8_gemm_ws.py instead, which overlaps them within a program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import gluon_hopper, int8_gemm_ws
from .gpu import GpuLimits, gpu_limits
from .int8_gemm_ws import COLUMN_AMAX, ROW_MOMENTS, SQUARE_SUMS
from .norms import gated_update, per_sample
from .quant import QUANT_BLOCK, gelu_tanh_quantize, quantize_blockwise, quantize_tile, scale_shape
from .rounding import to_bf16


@triton.jit
def _int8_gemm_kernel(
    a_src,  # a bulk-copy (TMA) descriptor of a [M, K] if TMA, else a pointer to it
    a_scale_ptr,
    w_src,  # the same for w [N, K]
    w_scale_ptr,
    bias_ptr,
    c_ptr,
    stream_ptr,
    gate_ptr,
    stats_ptr,  # the output's square sums, row moments or column amax, if asked for
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_cm,
    rows_per_sample,
    stride_gate,
    HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    SHARED_GATE: tl.constexpr,
    STATS: tl.constexpr,  # int8_gemm_ws.stats_kind
    QUANTIZE_A: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    TMA: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 128
    K_BLOCKS = tl.cdiv(K, BLOCK_K)
    # Grouped launch order: consecutive programs share weight columns in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * grid_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # Tiles of at most 128 rows and columns lie in one scale block each: one scale per K block.
    tl.static_assert(BLOCK_M <= BLOCK_K and BLOCK_N <= BLOCK_K)
    a_scale_row = a_scale_ptr + ((pid_m * BLOCK_M) // BLOCK_K) * K_BLOCKS
    w_scale_row = w_scale_ptr + ((pid_n * BLOCK_N) // BLOCK_K) * K_BLOCKS

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K_BLOCKS):
        # Zeros past M, N and K add nothing to the products; bulk tensor copies (TMA) fill them in.
        if TMA:
            a = a_src.load([pid_m * BLOCK_M, kb * BLOCK_K])
            w = w_src.load([pid_n * BLOCK_N, kb * BLOCK_K])
        else:
            ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = (ks < K)[None, :]
            a_ptrs = a_src + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
            w_ptrs = w_src + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]
            a = tl.load(a_ptrs, mask=(rows < M)[:, None] & k_ok, other=0)
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok, other=0)
        if QUANTIZE_A:
            a, a_scale = quantize_tile(a.to(tl.float32))
        else:
            a_scale = tl.load(a_scale_row + kb)
        w_scale = tl.load(w_scale_row + kb)
        partial = tl.dot(a, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), tl.int32), out_dtype=tl.int32)
        # float(partial) is exact (|partial| <= 128 * 128 * 128 = 2^21). One rounding per K block, like
        # upstream's fused multiply-add (and the reference).
        acc = tl.fma(partial.to(tl.float32), a_scale * w_scale, acc)

    out = to_bf16(acc)
    if HAS_BIAS:  # added after rounding, in bf16, as a separate bias add would
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        out = to_bf16(out.to(tl.float32) + bias.to(tl.float32))
    offsets = rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    mask = (rows < M)[:, None] & col_ok[None, :]
    # The statistics of an RMSNorm after the linear: one sum a row of the 128-column tile.
    if STATS == SQUARE_SUMS:
        y = out.to(tl.float32)
        tl.store(stats_ptr + rows * grid_n + pid_n, tl.sum(y * y, axis=1), mask=rows < M)
    # An fp8 V's ranges: each sample's largest |value| of each column, over the samples the tile holds
    # rows of. Non-negative floats order as their bits do, so the float atomic max is exact in any order.
    if STATS == COLUMN_AMAX:
        magnitude = tl.abs(out.to(tl.float32))
        last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1
        for sample in range((pid_m * BLOCK_M) // rows_per_sample, last_row // rows_per_sample + 1):
            end = tl.minimum((sample + 1) * rows_per_sample, M)
            mine = ((rows >= sample * rows_per_sample) & (rows < end))[:, None]
            peak = tl.max(tl.where(mine, magnitude, 0.0), axis=0)
            tl.atomic_max(stats_ptr + sample * N + cols, peak, mask=col_ok, sem="relaxed")
    if RESIDUAL:  # the residual stream plus the gated output, as norms.gated_residual rounds it
        stream = tl.load(stream_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        gate = None
        if HAS_GATE:
            if SHARED_GATE:  # one row for every sample
                gate = tl.load(gate_ptr + cols, mask=col_ok, other=0.0)[None, :]
            else:
                samples = (rows // rows_per_sample)[:, None]
                gate = tl.load(gate_ptr + samples * stride_gate + cols[None, :], mask=mask, other=0.0)
        out = gated_update(stream, out.to(tl.float32), gate, HAS_GATE).to(tl.bfloat16)
    # Those of a LayerNorm after it: a row's mean and sum of squared deviations in the tile.
    if STATS == ROW_MOMENTS:
        y = out.to(tl.float32)
        mean = tl.sum(y, axis=1) * (1.0 / BLOCK_N)
        deviation = y - mean[:, None]
        at = stats_ptr + (rows * grid_n + pid_n) * 2
        tl.store(at, mean, mask=rows < M)
        tl.store(at + 1, tl.sum(deviation * deviation, axis=1), mask=rows < M)
    tl.store(c_ptr + offsets, out, mask=mask)


# A GEMM's residual: (the bf16 stream its output is added to, the fp32 gate of the output or None).
Residual = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class GemmLaunch:
    """Tile shape and pipelining of one int8 GEMM launch. ``block_m`` is 64 or 128 (within one scale
    row; 128 when the kernel quantizes the activation, whose scale tile it must see whole).
    ``group_m`` row tiles run next to each other and share weight columns in L2. ``tma``: operands
    arrive through bulk tensor copies (Hopper and later) instead of pointer loads.
    ``warp_specialized``: kernels/int8_gemm_ws.py runs it (its own tiles, 128x128 or 128x256 as
    ``int8_gemm_ws.tile_halves`` picks, and stages).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    tma: bool = True
    warp_specialized: bool = False

    def __str__(self) -> str:
        if self.warp_specialized:
            return f"warp-specialized {self.block_m}x{self.block_n} s{self.num_stages} g{self.group_m}"
        tile = f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages} g{self.group_m}"
        return tile if self.tma else f"{tile} pointers"


# From this many rows on, Hopper runs the warp-specialized kernel. H200, against the 64x128 Triton
# launch: 3-16 % faster at the 1.3B's shapes (32,760 rows), 9-13 % at the 14B's (75,600); 1.5x slower at
# the 512 rows of a prompt's cross-attention keys and values, too few tiles to keep the SMs busy.
WARP_SPECIALIZED_MIN_M = 4096


WARP_SPECIALIZED = GemmLaunch(
    2 * int8_gemm_ws.SUB_M, int8_gemm_ws.BLOCK_N, 4, int8_gemm_ws.STAGES, group_m=16, warp_specialized=True
)


def gemm_launch(
    quantize_a: bool, gpu: GpuLimits | None, m: int = 0, n: int = 0, has_bias: bool = True, k: int = 0
) -> GemmLaunch:
    """A fixed choice, no autotuning: a new worker's first request neither times configs nor varies.

    Hopper, int8 activations of ``m`` >= WARP_SPECIALIZED_MIN_M rows, output rows that bulk tensor copies
    can store (``n`` a multiple of 8), a ``k`` of an even number of 128-wide blocks (every Wan linear's)
    and a bias (every Wan linear has one; Triton 3.6 fails to compile the kernel without), where Triton
    3.6's Gluon is there: the warp-specialized kernel (kernels/int8_gemm_ws.py). Otherwise the Triton
    kernel here:

    Hopper, int8 activations (the DiT's): 64x128 tiles, one warpgroup, three stages. Three programs fit
    an SM, so one's int32->fp32 scale work runs while another's MMA does. H100 sweep at the six Wan
    shapes (bit-exact in every variant): 11-23 % faster than the 128x256 tiles (8 warps) before them,
    which had the MMA idle during each K block's scale work; 64x64 tiles and 8 warps lost 15-40 %,
    grouping 16-32 row tiles beat 8 by 2-6 %. Quantizing bf16 tiles on load needs a whole 128-row scale
    tile: 128x128 with 8 warps. Before Hopper there is no warpgroup MMA (4 warps spill kilobytes) and no
    TMA: Triton's stand-in for a descriptor load there does not pipeline and spills with Triton 3.4
    (the image's), so operands come through pointer loads, pipelined as async copies, with as many
    stages as shared memory holds (99 KB on Ada). Off CUDA (the interpreter) the TMA path runs.
    """
    if gpu is not None and gpu.hopper and not quantize_a:
        fits = m >= WARP_SPECIALIZED_MIN_M and n % 8 == 0 and int8_gemm_ws.takes_k(k)
        if fits and has_bias and gluon_hopper.available():
            return WARP_SPECIALIZED
        return GemmLaunch(64, 128, num_warps=4, num_stages=3, group_m=32)
    stage_bytes = QUANT_BLOCK * QUANT_BLOCK * (2 if quantize_a else 1) + QUANT_BLOCK * QUANT_BLOCK
    stages = 3
    while gpu is not None and stages > 1 and stages * stage_bytes > gpu.shared_bytes:
        stages -= 1
    return GemmLaunch(QUANT_BLOCK, QUANT_BLOCK, num_warps=8, num_stages=stages, tma=gpu is None or gpu.hopper)


def _tma_rows(x: torch.Tensor) -> torch.Tensor:
    """x [R, K] with 16-byte aligned rows, as bulk tensor copies need: a copy into wider rows if not."""
    if x.stride(-1) == 1 and x.stride(0) * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0:
        return x
    width = triton.cdiv(x.shape[1] * x.element_size(), 16) * 16 // x.element_size()
    padded = x.new_zeros((x.shape[0], width))
    padded[:, : x.shape[1]] = x
    return padded[:, : x.shape[1]]


def _descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [block_rows, QUANT_BLOCK])


def int8_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
    launch: GemmLaunch | None = None,
    residual: Residual | None = None,
    square_sums: torch.Tensor | None = None,
    gelu_int8: bool = False,
    row_moments: torch.Tensor | None = None,
    column_amax: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``bf16(dequant(a) @ dequant(weight).T) + bias`` for ``a`` [..., K] -> bf16 [..., N].

    ``a`` is either int8 with ``a_scale`` (from ``quantize_blockwise`` or a kernel that emits int8)
    or bf16 without it, in which case each 128x128 tile is quantized inside the GEMM. ``launch``
    defaults to ``gemm_launch`` for a's GPU. With a ``residual`` (stream, gate) the result is
    ``norms.gated_residual(stream, product, gate)``, added as each output tile is written: the product
    never goes to memory and back. ``square_sums`` (fp32 [M, ceil(N/128)], no residual) receives each
    output row's sum of squares per 128-column tile (``models.int8.chunk_square_sums``, summed in
    another order): an RMSNorm's statistics without a pass over the output. ``row_moments`` (fp32
    [M, N/128, 2], N a multiple of 128) receives each row's mean and sum of squared deviations per
    128-column tile of the result, residual included (``models.int8.chunk_moments``, summed in another
    order): a LayerNorm's (``norms``' ``moments=``). ``column_amax`` (fp32 [B, N], the M rows being B
    samples' rows one after another; nothing else) receives each sample's largest |value| of each
    output column (``models.int8.sample_column_amax``): an fp8 V's ranges without a pass over it.
    ``gelu_int8`` (nothing else) returns ``quant.gelu_tanh_quantize`` of the result instead, (int8
    [..., N], tile scales): the warp-specialized kernel quantizes each output tile as it finishes, so
    the bf16 product never goes to memory.
    """
    n, k = weight.shape
    if weight.dtype != torch.int8 or weight.stride(-1) != 1:
        raise ValueError("weight must be a row-major int8 [N, K] tensor")
    if a.shape[-1] != k:
        raise ValueError(f"activation has {a.shape[-1]} features, weight expects {k}")
    flat = a.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    m = flat.shape[0]
    if weight_scale.shape != scale_shape(n, k):
        raise ValueError(f"weight scale shape {tuple(weight_scale.shape)} != {scale_shape(n, k)}")
    if a.dtype == torch.int8:
        if a_scale is None or a_scale.shape != scale_shape(m, k):
            raise ValueError(f"int8 activation needs a_scale of shape {scale_shape(m, k)}")
        a_scale_arg = a_scale.contiguous()
    elif a.dtype == torch.bfloat16 and a_scale is None:
        a_scale_arg = weight_scale  # unread placeholder
    else:
        raise ValueError(f"activation must be int8 with a_scale, or bf16 without, got {a.dtype}")
    if bias is not None and bias.dtype != torch.bfloat16:
        raise ValueError(f"bias must be bf16, got {bias.dtype}")

    quantize_on_load = a.dtype != torch.int8
    launch = launch or gemm_launch(quantize_on_load, gpu_limits(a.device), m, n, bias is not None, k)
    if quantize_on_load and (launch.block_m != QUANT_BLOCK or launch.warp_specialized):
        raise ValueError(
            f"quantizing on load needs the Triton kernel's {QUANT_BLOCK}-row tiles, not {launch}"
        )
    if square_sums is not None:
        _check_statistics("square_sums", square_sums, (m, triton.cdiv(n, QUANT_BLOCK)), launch)
        if residual is not None or row_moments is not None:
            raise ValueError("square_sums are of the GEMM's own output: not with a residual or row moments")
    if row_moments is not None:
        if n % QUANT_BLOCK:
            raise ValueError(f"row_moments need whole {QUANT_BLOCK}-column tiles; N={n} is not a multiple")
        _check_statistics("row_moments", row_moments, (m, n // QUANT_BLOCK, 2), launch)
    if gelu_int8 and (residual is not None or square_sums is not None or row_moments is not None):
        raise ValueError("gelu_int8 returns the GELU's int8 tiles: not with a residual or row statistics")
    if column_amax is not None:
        others = (residual, square_sums, row_moments)
        if gelu_int8 or any(option is not None for option in others):
            raise ValueError("column_amax is of the GEMM's own bf16 output: not with other options")
        shape_ok = column_amax.dim() == 2 and column_amax.shape[1] == n and column_amax.shape[0] > 0
        if not (shape_ok and m % column_amax.shape[0] == 0 and column_amax.dtype == torch.float32):
            raise ValueError(
                f"column_amax must be fp32 [B, {n}] for B samples of the {m} rows, got "
                f"{column_amax.dtype} {tuple(column_amax.shape)}"
            )
        if not column_amax.is_contiguous():
            raise ValueError("column_amax must be contiguous")
        column_amax.zero_()  # the kernels raise it tile by tile
    if launch.tma:
        flat, weight = _tma_rows(flat), _tma_rows(weight)
    if launch.warp_specialized and bias is None:
        raise ValueError("the warp-specialized int8 GEMM needs a bias")
    # The GEMM quantizes its GELU where its K loop hides that work, with int8 rows bulk copies can store.
    if launch.warp_specialized and gelu_int8 and k >= int8_gemm_ws.GELU_MIN_K and n % 16 == 0:
        values = torch.empty((m, n), dtype=torch.int8, device=a.device)
        scales = torch.empty(scale_shape(m, n), dtype=torch.float32, device=a.device)
        int8_gemm_ws.int8_gemm_ws(
            flat, a_scale_arg, weight, weight_scale.contiguous(), bias, values, launch.group_m, gelu_scales=scales
        )  # fmt: skip
        return values.view(*a.shape[:-1], n), scales
    out = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    stream, gate, rows_per_sample, stride_gate = _residual_args(m, n, residual)
    stats = next((s for s in (square_sums, row_moments, column_amax) if s is not None), None)
    if column_amax is not None:
        rows_per_sample = m // column_amax.shape[0]
    if launch.warp_specialized:
        int8_gemm_ws.int8_gemm_ws(
            flat, a_scale_arg, weight, weight_scale.contiguous(), bias, out, launch.group_m,
            None if residual is None else (stream, gate, rows_per_sample, stride_gate), square_sums,
            row_moments, column_amax=column_amax,
        )  # fmt: skip
        return _output(out.view(*a.shape[:-1], n), gelu_int8)
    grid = (triton.cdiv(m, launch.block_m) * triton.cdiv(n, launch.block_n),)
    _int8_gemm_kernel[grid](
        _descriptor(flat, launch.block_m) if launch.tma else flat,
        a_scale_arg,
        _descriptor(weight, launch.block_n) if launch.tma else weight,
        weight_scale.contiguous(),
        bias if bias is not None else weight_scale,  # unread placeholder when there is no bias
        out,
        out if stream is None else stream,  # placeholders when unread
        weight_scale if gate is None else gate,
        weight_scale if stats is None else stats,
        m,
        n,
        k,
        flat.stride(0),
        weight.stride(0),
        out.stride(0),
        rows_per_sample,
        stride_gate,
        HAS_BIAS=bias is not None,
        RESIDUAL=residual is not None,
        HAS_GATE=gate is not None,
        SHARED_GATE=stride_gate == 0,
        STATS=int8_gemm_ws.stats_kind(square_sums, row_moments, column_amax),
        QUANTIZE_A=quantize_on_load,
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        GROUP_M=launch.group_m,
        TMA=launch.tma,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        enable_fp_fusion=False,  # the gated residual rounds its product before the add
    )
    return _output(out.view(*a.shape[:-1], n), gelu_int8)


def _output(out: torch.Tensor, gelu_int8: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return gelu_tanh_quantize(out) if gelu_int8 else out


def _check_statistics(name: str, stats: torch.Tensor, shape: tuple[int, ...], launch: GemmLaunch) -> None:
    if stats.shape != shape or stats.dtype != torch.float32 or not stats.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous fp32 {shape} tensor, got {stats.dtype} {tuple(stats.shape)}"
        )
    if launch.block_n != QUANT_BLOCK:
        raise ValueError(f"{name} need {QUANT_BLOCK}-column tiles, not {launch}")


def _residual_args(
    m: int, n: int, residual: Residual | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
    """(stream [M, N], gate rows, rows per sample, gate row stride, 0 for one row for all) of a residual
    whose stream is [B, L, N] or [M, N] and whose gate is fp32 [B, 1, N], [B, N], [1, N] or None."""
    if residual is None:
        return None, None, 1, 0
    stream, gate = residual
    if stream.numel() != m * n or stream.shape[-1] != n or stream.dtype != torch.bfloat16:
        raise ValueError(
            f"the residual stream must be bf16 [..., {n}] with {m} rows, got {stream.dtype} {tuple(stream.shape)}"
        )
    if not stream.is_contiguous():
        raise ValueError("the residual stream must be contiguous")
    batch = stream.shape[0] if stream.dim() == 3 else 1
    gate, stride_gate = per_sample(gate, batch, n, "gate")
    return stream.view(m, n), gate, m // batch, stride_gate


def int8_linear(
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    residual: Residual | None = None,
    square_sums: torch.Tensor | None = None,
    gelu_int8: bool = False,
    row_moments: torch.Tensor | None = None,
    column_amax: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """W8A8 linear for a bf16 activation, or for an already quantized ``(int8 values, tile scales)`` one.

    A bf16 activation gets its own memory-bound quantization pass: quantizing in the GEMM prologue
    repeats that work for every column tile (N / 128 times), on the cores the dequantization needs.
    scripts/bench_kernels_linear.py times both. ``residual``, ``square_sums``, ``gelu_int8``,
    ``row_moments``, ``column_amax``: as ``int8_gemm``.
    """
    values, scales = x if isinstance(x, tuple) else quantize_blockwise(x)
    return int8_gemm(
        values, weight, weight_scale, bias, a_scale=scales, residual=residual, square_sums=square_sums,
        gelu_int8=gelu_int8, row_moments=row_moments, column_amax=column_amax,
    )  # fmt: skip
