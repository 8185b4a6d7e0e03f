"""Fused DiT block elementwise work: LayerNorm + modulation / affine, gated residual adds (spec §3.3).

Every kernel reads the bf16 residual stream once per pass and rounds exactly where upstream's chain of
PyTorch ops rounds:
    modulated LN:   h = bf16(LN(x)); out = bf16(fp32(h) * (1 + scale) + shift)
    affine LN:      out = bf16(LN(x) * weight + bias)                       (fp32 weight and bias)
    gated residual: x = bf16(x + bf16(update * bf16(gate)))                  (gate None: bf16(x + update))
LN statistics are fp32 over the full row (population variance, eps inside the square root). A norm can
first apply a residual add and write the new stream (one read of x instead of two), and can emit its
output as int8 with 128x128 tile scales, ready for kernels/int8_gemm.py: the values are quantized from
the bf16 output, so they equal quantize_blockwise(bf16 output). An int8-output norm can also take its
statistics from the per-128-column row moments the int8 GEMM that wrote x took (``moments=``), merged
by a small kernel instead of a pass over x (summed in another order, so a rare value lands one int8
step apart). Kernels run without fp contraction so products and sums round separately, as the
unfused reference does.

Modulation (shift, scale) and gate are fp32 per sample: [B, 1, D] or [B, D] (views into the [B, 6, D]
block modulation are fine); row r of x [B, L, D] belongs to sample r // L.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import QUANT_BLOCK, quantize_tile, scale_shape
from .rounding import div_rn, inverse_rms, to_bf16

# Warps of a row-pass program and of a 128x128 quantized-tile program. H200, 10 calls back to back,
# whole int8 LayerNorm (statistics + tile pass) at 14B's width: with one modulation row loaded for all
# samples, 8 warps 0.667 ms (16: 0.86; the per-element gather before: 0.838); affine (norm3) 0.618
# (16: 0.68). At 1.3B's width the choice moves it by 0.01 ms. Modulation gathered per sample (a batch
# of samples with their own rows) keeps 16 warps: 0.85 ms (8: 0.87).
_ROW_WARPS = 4
_TILE_WARPS = 8
_TILE_WARPS_GATHERED = 16


def _row_pass_shape(dim: int) -> tuple[int, int]:
    """(rows per program, columns per step) of ``_layer_norm_kernel``.

    The step width sets the order in which a row's chunk statistics merge, so the bf16-output pass and
    the statistics pass of the int8 output use the same one: the int8 values then equal the quantized
    bf16 output exactly. H200 sweep (4 warps, 10 calls back to back): at 1.3B's width 8 rows x 256
    columns took 0.078 / 0.040 ms (bf16 output / statistics only; 128 columns: 0.087 / 0.043); at 14B's,
    one row in 2048-column steps took 0.50 / 0.25 ms (8 x 256: 0.61 / 0.21).
    """
    return (1, 2048) if dim > 2048 else (8, 256)


Normed = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@triton.jit
def gated_update(x, update, gate, HAS_GATE: tl.constexpr):
    """bf16(x + bf16(update * bf16(gate))) (without a gate bf16(x + update)) as fp32, from fp32 x, update
    and gate: the gated residual, also in the int8 GEMMs' epilogue."""
    if HAS_GATE:
        update = to_bf16(update * to_bf16(gate).to(tl.float32)).to(tl.float32)
    return to_bf16(x + update).to(tl.float32)


@triton.jit
def _normalized(
    x,
    mean,
    rstd,
    cols,
    col_ok,
    mask,
    sample,
    weight_ptr,
    bias_ptr,
    shift_ptr,
    scale_ptr,
    stride_shift,
    stride_scale,
    AFFINE: tl.constexpr,
    MODULATE: tl.constexpr,
    SHARED_MOD: tl.constexpr,
):
    """The bf16 output for an fp32 [rows, cols] chunk of the stream, given its rows' statistics."""
    y = (x - mean[:, None]) * rstd[:, None]
    if AFFINE:
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0)
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        y = y * weight[None, :] + bias[None, :]
    if MODULATE:
        shift, scale = modulation(
            shift_ptr, scale_ptr, sample, cols, col_ok, mask, stride_shift, stride_scale, SHARED_MOD
        )
        y = to_bf16(y).to(tl.float32) * (1.0 + scale) + shift
    return to_bf16(y)


@triton.jit
def modulation(
    shift_ptr, scale_ptr, sample, cols, col_ok, mask, stride_shift, stride_scale, SHARED_MOD: tl.constexpr
):
    """(shift, scale) for a [rows, cols] chunk whose rows belong to samples ``sample``."""
    if SHARED_MOD:  # one row for every sample: a [cols] load, not a [rows, cols] gather
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)[None, :]
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        shift = tl.load(shift_ptr + sample[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0)
        scale = tl.load(scale_ptr + sample[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0)
    return shift, scale


@triton.jit
def _layer_norm_kernel(
    x_ptr,
    update_ptr,
    gate_ptr,
    x_out_ptr,
    out_ptr,
    stats_ptr,
    weight_ptr,
    bias_ptr,
    shift_ptr,
    scale_ptr,
    M,
    D,
    rows_per_sample,
    stride_gate,
    stride_shift,
    stride_scale,
    eps,
    RESIDUAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    AFFINE: tl.constexpr,
    MODULATE: tl.constexpr,
    SHARED_MOD: tl.constexpr,
    STATS_ONLY: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < M
    sample = rows // rows_per_sample
    row_offsets = rows.to(tl.int64)[:, None] * D

    # Pass 1: per-row mean and sum of squared deviations, merged chunk by chunk (Chan et al.).
    mean = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for start in range(0, D, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            update = tl.load(update_ptr + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + sample[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0)
            x = gated_update(x, update, gate, HAS_GATE)
            tl.store(x_out_ptr + row_offsets + cols[None, :], x.to(tl.bfloat16), mask=mask)
        n = tl.minimum(D - start, CHUNK).to(tl.float32)
        chunk_mean = div_rn(tl.sum(x, axis=1), n)
        deviation = tl.where(mask, x - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(deviation * deviation, axis=1)
        count = start * 1.0  # values merged so far: every earlier chunk is full
        total = count + n
        delta = chunk_mean - mean
        mean += delta * div_rn(n, total)
        m2 += chunk_m2 + delta * delta * div_rn(count * n, total)
    rstd = inverse_rms(m2, D, eps)
    if STATS_ONLY:  # _quantize_normed_kernel writes the output
        tl.store(stats_ptr + rows * 2, mean, mask=row_ok)
        tl.store(stats_ptr + rows * 2 + 1, rstd, mask=row_ok)
        return
    if RESIDUAL:
        tl.debug_barrier()  # make this program's stores of the new stream visible to all its threads
    in_ptr = x_out_ptr if RESIDUAL else x_ptr  # the output pass reads the updated stream

    # Pass 2: normalize, modulate or scale, round, chunk by chunk.
    for start in range(0, D, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(in_ptr + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = _normalized(
            x,
            mean,
            rstd,
            cols,
            col_ok,
            mask,
            sample,
            weight_ptr,
            bias_ptr,
            shift_ptr,
            scale_ptr,
            stride_shift,
            stride_scale,
            AFFINE,
            MODULATE,
            SHARED_MOD,
        )
        tl.store(out_ptr + row_offsets + cols[None, :], out, mask=mask)


@triton.jit
def _moments_statistics_kernel(
    moments_ptr,
    stats_ptr,
    M,
    n_chunks,
    eps,
    BLOCK_ROWS: tl.constexpr,
    CHUNKS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Each row's (mean, 1 / std) from its chunks' means and sums of squared deviations (chunks of CHUNK
    columns): the mean of the means, and the chunks' sums plus CHUNK times the means' squared
    deviations from it (Chan et al.'s merge, for equal counts)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < M
    chunks = tl.arange(0, CHUNKS)
    ok = row_ok[:, None] & (chunks < n_chunks)[None, :]
    at = moments_ptr + (rows.to(tl.int64)[:, None] * n_chunks + chunks[None, :]) * 2
    means = tl.load(at, mask=ok, other=0.0)
    mean = div_rn(tl.sum(means, axis=1), n_chunks * 1.0)
    spread = tl.where(ok, means - mean[:, None], 0.0)
    m2 = tl.sum(tl.load(at + 1, mask=ok, other=0.0), axis=1) + CHUNK * tl.sum(spread * spread, axis=1)
    tl.store(stats_ptr + rows * 2, mean, mask=row_ok)
    tl.store(stats_ptr + rows * 2 + 1, inverse_rms(m2, n_chunks * CHUNK, eps), mask=row_ok)


@triton.jit
def _quantize_normed_kernel(
    x_ptr,
    stats_ptr,
    out_ptr,
    out_scale_ptr,
    weight_ptr,
    bias_ptr,
    shift_ptr,
    scale_ptr,
    M,
    D,
    rows_per_sample,
    stride_shift,
    stride_scale,
    AFFINE: tl.constexpr,
    MODULATE: tl.constexpr,
    SHARED_MOD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One 128x128 int8 tile of the norm's output, from the stream and its rows' statistics."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr + rows * 2, mask=row_ok, other=0.0)
    rstd = tl.load(stats_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
    out = _normalized(
        x,
        mean,
        rstd,
        cols,
        col_ok,
        mask,
        rows // rows_per_sample,
        weight_ptr,
        bias_ptr,
        shift_ptr,
        scale_ptr,
        stride_shift,
        stride_scale,
        AFFINE,
        MODULATE,
        SHARED_MOD,
    )
    # Rows past M and columns past D are zeros of the quantization tile, not normalized values.
    q, q_scale = quantize_tile(tl.where(mask, out.to(tl.float32), 0.0))
    tl.store(out_ptr + offsets, q, mask=mask)
    tl.store(out_scale_ptr + pid_m * tl.num_programs(1) + pid_k, q_scale)


@triton.jit
def _gated_residual_kernel(
    x_ptr,
    update_ptr,
    gate_ptr,
    out_ptr,
    M,
    D,
    rows_per_sample,
    stride_gate,
    HAS_GATE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    update = tl.load(update_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(
        gate_ptr + (rows // rows_per_sample)[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0
    )
    tl.store(out_ptr + offsets, gated_update(x, update, gate, HAS_GATE).to(tl.bfloat16), mask=mask)


def per_sample(t: torch.Tensor | None, batch: int, dim: int, name: str) -> tuple[torch.Tensor | None, int]:
    """A [B, 1, D] / [B, D] / [1, D] fp32 tensor as ([b, D] with unit column stride, row stride; 0 = shared)."""
    if t is None:
        return None, 0
    rows = t.reshape(-1, dim)
    if t.dtype != torch.float32 or rows.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must be fp32 of shape [{batch}, 1, {dim}] or [1, 1, {dim}], got {t.dtype} {tuple(t.shape)}"
        )
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, (rows.stride(0) if rows.shape[0] == batch and batch > 1 else 0)


def check_stream(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 3 or x.dtype != torch.bfloat16 or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous bf16 [B, L, D] tensor, got {x.dtype} {tuple(x.shape)}")


def _layer_norm(
    x: torch.Tensor,
    *,
    eps: float,
    quantize: bool,
    update: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    moments: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, Normed]:
    check_stream(x)
    batch, length, dim = x.shape
    rows = batch * length
    if update is not None:
        check_stream(update, "update")
        if update.shape != x.shape:
            raise ValueError(f"update shape {tuple(update.shape)} != x shape {tuple(x.shape)}")
    gate, stride_gate = per_sample(gate, batch, dim, "gate")
    shift, stride_shift = per_sample(shift, batch, dim, "shift")
    scale, stride_scale = per_sample(scale, batch, dim, "scale")
    shared_mod = stride_shift == 0 and stride_scale == 0
    if weight is not None and (weight.dtype != torch.float32 or bias is None or bias.dtype != torch.float32):
        raise ValueError("affine LayerNorm takes fp32 weight and bias")

    x_out = torch.empty_like(x) if update is not None else None
    # Quantized output: the statistics pass writes each row's (mean, rstd), then one program per
    # 128x128 tile normalizes and quantizes it. A program holding 128 whole rows instead (the tile's
    # rows need their statistics first) re-read its rows from DRAM and was 1.7x slower than bf16 output.
    out = None if quantize else torch.empty_like(x)
    stats = torch.empty((rows, 2), dtype=torch.float32, device=x.device) if quantize else None
    if moments is not None:  # the statistics from what the GEMM that wrote x took of them
        if not quantize or update is not None:
            raise ValueError(
                "moments stand in for the statistics pass of an int8 LayerNorm without a residual"
            )
        _statistics_from_moments(moments, stats, dim, eps)
    else:
        _row_pass(
            x, eps, update, (gate, stride_gate), x_out, out, stats, weight, bias, (shift, stride_shift),
            (scale, stride_scale),
        )  # fmt: skip
    if not quantize:
        return x_out, out
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    q_scale = torch.empty(scale_shape(rows, dim), dtype=torch.float32, device=x.device)
    _quantize_normed_kernel[q_scale.shape](
        x_out if x_out is not None else x,
        stats,
        q,
        q_scale,
        *_pointers(x, weight, bias, shift, scale),
        rows,
        dim,
        length,
        stride_shift,
        stride_scale,
        AFFINE=weight is not None,
        MODULATE=shift is not None,
        SHARED_MOD=shared_mod,
        BLOCK=QUANT_BLOCK,
        num_warps=_TILE_WARPS if shared_mod else _TILE_WARPS_GATHERED,
        enable_fp_fusion=False,
    )
    return x_out, (q, q_scale)


def row_statistics(x: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 [B * L, 2]: each row of x's LayerNorm mean and 1 / std, as the int8 norms take them."""
    check_stream(x)
    stats = torch.empty((x.shape[0] * x.shape[1], 2), dtype=torch.float32, device=x.device)
    _row_pass(x, eps, stats=stats)
    return stats


Strided = tuple[torch.Tensor | None, int]  # a per_sample tensor and its row stride


def _row_pass(
    x: torch.Tensor,
    eps: float,
    update: torch.Tensor | None = None,
    gate: Strided = (None, 0),
    x_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: Strided = (None, 0),
    scale: Strided = (None, 0),
) -> None:
    """``_layer_norm_kernel`` over x's rows: writes ``stats`` (statistics only) or ``out``, and with
    an ``update`` the new stream ``x_out``."""
    batch, length, dim = x.shape
    rows = batch * length
    (gate, stride_gate), (shift, stride_shift), (scale, stride_scale) = gate, shift, scale
    block_rows, chunk = _row_pass_shape(dim)
    _layer_norm_kernel[(triton.cdiv(rows, block_rows),)](
        x,
        *_pointers(x, update, gate, x_out, out, stats, weight, bias, shift, scale),
        rows,
        dim,
        length,
        stride_gate,
        stride_shift,
        stride_scale,
        eps,
        RESIDUAL=update is not None,
        HAS_GATE=gate is not None,
        AFFINE=weight is not None,
        MODULATE=shift is not None,
        SHARED_MOD=stride_shift == 0 and stride_scale == 0,
        STATS_ONLY=stats is not None,
        BLOCK_ROWS=block_rows,
        CHUNK=chunk,
        num_warps=_ROW_WARPS,
        enable_fp_fusion=False,
    )


def _pointers(placeholder: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The tensors, with ``placeholder`` for the pointer arguments a configuration never reads (None)."""
    return tuple(placeholder if t is None else t for t in tensors)


def _statistics_from_moments(moments: torch.Tensor, stats: torch.Tensor, dim: int, eps: float) -> None:
    rows, chunks = stats.shape[0], dim // QUANT_BLOCK
    if dim % QUANT_BLOCK or moments.shape != (rows, chunks, 2) or moments.dtype != torch.float32:
        raise ValueError(
            f"moments must be fp32 [{rows}, D / {QUANT_BLOCK}, 2] for {rows} rows of D = {dim} (a multiple of "
            f"{QUANT_BLOCK}), got {moments.dtype} {tuple(moments.shape)}"
        )
    block_rows = 64
    _moments_statistics_kernel[(triton.cdiv(rows, block_rows),)](
        moments.contiguous(), stats, rows, chunks, eps,
        BLOCK_ROWS=block_rows, CHUNKS=triton.next_power_of_2(chunks), CHUNK=QUANT_BLOCK, num_warps=4,
    )  # fmt: skip


def layer_norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    quantize: bool = False,
    moments: torch.Tensor | None = None,
) -> Normed:
    """``bf16(fp32(bf16(LN(x))) * (1 + scale) + shift)``; int8 + tile scales if ``quantize``.

    ``moments`` (int8 output only): x's rows' per-128-column means and sums of squared deviations, as
    the int8 GEMM that wrote x took them (``int8_gemm(row_moments=)``), merged into the statistics
    instead of a pass over x.
    """
    return _layer_norm(x, eps=eps, quantize=quantize, shift=shift, scale=scale, moments=moments)[1]


def layer_norm_affine(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    quantize: bool = False,
    moments: torch.Tensor | None = None,
) -> Normed:
    """``bf16(LN(x) * weight + bias)`` with fp32 weight and bias; int8 + tile scales if ``quantize``;
    ``moments`` as ``layer_norm_modulate``'s."""
    return _layer_norm(x, eps=eps, quantize=quantize, weight=weight, bias=bias, moments=moments)[1]


def residual_layer_norm_modulate(
    x: torch.Tensor,
    update: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    quantize: bool = False,
) -> tuple[torch.Tensor, Normed]:
    """``x = gated_residual(x, update, gate)`` followed by ``layer_norm_modulate(x, ...)``, in one pass
    (two for int8 output)."""
    x_new, out = _layer_norm(
        x, eps=eps, quantize=quantize, update=update, gate=gate, shift=shift, scale=scale
    )
    return x_new, out


def residual_layer_norm_affine(
    x: torch.Tensor,
    update: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    quantize: bool = False,
) -> tuple[torch.Tensor, Normed]:
    """``x = gated_residual(x, update, gate)`` followed by ``layer_norm_affine(x, ...)``, in one pass
    (two for int8 output)."""
    x_new, out = _layer_norm(
        x, eps=eps, quantize=quantize, update=update, gate=gate, weight=weight, bias=bias
    )
    return x_new, out


def gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``bf16(x + bf16(update * bf16(gate)))`` (``bf16(x + update)`` without a gate), a new tensor."""
    check_stream(x)
    check_stream(update, "update")
    batch, length, dim = x.shape
    gate, stride_gate = per_sample(gate, batch, dim, "gate")
    out = torch.empty_like(x)
    rows = batch * length
    # H100 sweep: 16x512 tiles with 8 warps ran 5-8 % faster than 16x128 with 4 (1.3B and 14B widths).
    block_rows, block_cols = 16, 512
    _gated_residual_kernel[(triton.cdiv(rows, block_rows), triton.cdiv(dim, block_cols))](
        x,
        update,
        gate if gate is not None else x,
        out,
        rows,
        dim,
        length,
        stride_gate,
        HAS_GATE=gate is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=8,
        enable_fp_fusion=False,
    )
    return out
