"""Cross-attention from the video tokens to the text rows, written as the o projection's int8 input.

The int8 DiT's cross-attention output only feeds its o projection, which reads it quantized per 128x128
tile (kernels/quant.py). With 128-wide heads (every Wan model's) one head of 128 rows is exactly one
such tile, so one program attends those rows to the sample's text rows (a handful of key blocks:
the prompt's rows and the padding's stand-in keys) and quantizes the result: one pass over q instead of
cuDNN's attention writing bf16 and a quantize pass reading it back.

q arrives as the q projection wrote it, with each row's sums of squares per 128 columns, which the
int8 GEMM takes as it writes q (``int8_gemm(square_sums=)``), so no pass reads and writes q for its
RMSNorm. The norm is linear in q given the row's 1 / rms, so it moves out of the tile: a score
q_n . k = sum_d bf16(q_d r w_d) k_d is computed as r * sum_d q_d bf16(w_d k_d), the per-row factor r
scaling the scores as the softmax scale does and the weight multiplied into the keys when they are
normalized (``CrossAttention``). Normalizing each tile's q instead (a rounding per element) made the
kernel take 0.187 ms at the 1.3B shape against 0.141 ms so (H200): its elementwise work is what
bounds it.

The output is what ``quantize_blockwise(scaled_dot_product_attention(rms_norm(q), k, v,
attn_mask=bias))`` gives up to float rounding: the norm's, as above, and the attention's own (scores
and softmax in fp32, the probabilities rounded to bf16 for the product with v, as flash attention
does); the result is rounded to bf16 before it is quantized.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .gpu import GpuLimits, gpu_limits, sm_count
from .quant import QUANT_BLOCK, quantize_tile, scale_shape
from .rounding import dot_bf16, inverse_rms, reciprocal, to_bf16

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
WARPS, STAGES = 8, 2
RMS_ROWS = 64


def block_keys(gpu: GpuLimits | None) -> int:
    """Text rows a step (the prompt's, at most 512, and the padding's stand-in keys). Before Hopper the
    MMAs hold their operands in registers: 64 would spill there."""
    return 64 if gpu is None or gpu.hopper else 32


@triton.jit
def _inverse_rms_kernel(squares_ptr, rstd_ptr, M, HEADS, eps, D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        HEADS_POW2: tl.constexpr):  # fmt: skip
    """1 / rms of each q row from its per-head sums of squares, kernels/rope.py's formula."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    heads = tl.arange(0, HEADS_POW2)
    sums = tl.load(
        squares_ptr + rows[:, None] * HEADS + heads[None, :],
        mask=(rows < M)[:, None] & (heads < HEADS)[None, :],
        other=0.0,
    )
    rstd = inverse_rms(tl.sum(sums, axis=1), D, eps)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _load_q(
    q_ptr, rstd_ptr, tile, tiles, row_blocks, M, stride_qm, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """The q rows and head of ``tile`` and the rows' 1 / rms (zeros past the last tile)."""
    rows = (tile % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile // row_blocks) * HEAD_DIM + tl.arange(0, HEAD_DIM)
    rows_ok = rows < tl.where(tile < tiles, M, 0)
    q = tl.load(
        q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], mask=rows_ok[:, None], other=0.0
    )
    return q, tl.load(rstd_ptr + rows, mask=rows_ok, other=0.0)


@triton.jit
def _cross_attention_kernel(
    q_ptr,
    rstd_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    out_ptr,
    scale_ptr,
    M,
    L,
    KEYS,
    HEADS,
    stride_qm,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    stride_om,
    qk_scale,  # 1 / sqrt(head_dim) * log2(e): scores in powers of two
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
):
    # Persistent: a program walks tiles heads outermost, so its successive tiles mostly share a head's
    # keys and values, and loads the next tile's q while it computes this one's (one 8-warp program
    # fills an SM's registers, so nothing else would hide the load).
    row_blocks = tl.cdiv(M, BLOCK_M)
    tiles = row_blocks * HEADS
    step = tl.num_programs(0)
    q, rstd = _load_q(q_ptr, rstd_ptr, tl.program_id(0), tiles, row_blocks, M, stride_qm, BLOCK_M, HEAD_DIM)
    for tile in range(tl.program_id(0), tiles, step):
        q_next, rstd_next = _load_q(
            q_ptr, rstd_ptr, tile + step, tiles, row_blocks, M, stride_qm, BLOCK_M, HEAD_DIM
        )
        pid_m = tile % row_blocks
        head = tile // row_blocks
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
        # A tile's rows may belong to two (or, for short videos, more) samples, each with its own text.
        # One online softmax serves them all: a row takes scores only from its own sample's keys, and
        # with a finite starting maximum the other samples' steps leave it unchanged (p = 0,
        # correction 1).
        last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1
        sample = tl.minimum(rows, last_row) // L  # rows past M (zeroed below) go with the last
        row_max = tl.full([BLOCK_M], -1e30, tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        score_scale = (rstd * qk_scale)[:, None]  # q's RMSNorm and the softmax scale
        for b in range(pid_m * BLOCK_M // L, last_row // L + 1):
            mine = (sample == b)[:, None]
            for start in range(0, KEYS, BLOCK_KEYS):
                keys = start + tl.arange(0, BLOCK_KEYS)
                keys_ok = keys < KEYS
                k = tl.load(
                    k_ptr + b * stride_kb + keys[:, None] * stride_kn + cols[None, :],
                    mask=keys_ok[:, None],
                    other=0.0,
                )
                v = tl.load(
                    v_ptr + b * stride_vb + keys[:, None] * stride_vn + cols[None, :],
                    mask=keys_ok[:, None],
                    other=0.0,
                )
                scores = dot_bf16(q, tl.trans(k)) * score_scale
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + keys, mask=keys_ok, other=0.0).to(tl.float32)
                    scores += (bias * _LOG2E)[None, :]
                scores = tl.where(mine & keys_ok[None, :], scores, float("-inf"))
                new_max = tl.maximum(row_max, tl.max(scores, axis=1))
                p = tl.exp2(scores - new_max[:, None])
                correction = tl.exp2(row_max - new_max)
                row_sum = row_sum * correction + tl.sum(p, axis=1)
                acc = acc * correction[:, None] + dot_bf16(p.to(tl.bfloat16), v)
                row_max = new_max
        # The bf16 output attention would write; rows past M are zero, as the quantizer pads them.
        rows_ok = (rows < M)[:, None]
        out = tl.where(rows_ok, to_bf16(acc * reciprocal(row_sum)[:, None]).to(tl.float32), 0.0)
        values, scale = quantize_tile(out)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], values, mask=rows_ok)
        tl.store(scale_ptr + pid_m * HEADS + head, scale)
        q, rstd = q_next, rstd_next


def cross_attention_quantized(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    *,
    q_square_sums: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_blockwise`` of multi-head attention from ``rms_norm(q, weight, eps)`` [B, L, dim] to keys
    and values [B, keys, dim] (bf16, heads side by side in dim, 128 wide), with ``bias`` ([1, 1, 1,
    keys] or None) added to the scores. ``k`` is the keys times q's norm ``weight`` (fp32 products
    rounded once to bf16). ``q_square_sums``: fp32 [B * L, num_heads], each q row's sum of squares per
    head (``models.int8.chunk_square_sums``).

    Returns int8 [B, L, dim] and fp32 scales [ceil(B * L / 128), dim / 128], as the o projection reads.
    """
    batch, length, dim = q.shape
    if dim != num_heads * QUANT_BLOCK:
        raise ValueError(f"the fused cross-attention takes {QUANT_BLOCK}-wide heads, not {dim} / {num_heads}")
    if q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the fused cross-attention takes bf16 q, k, v, not {q.dtype}, {k.dtype}, {v.dtype}")
    sums_shape = (batch * length, num_heads)
    if q_square_sums.shape != sums_shape or q_square_sums.dtype != torch.float32:
        raise ValueError(
            f"q_square_sums must be fp32 {sums_shape}, got {q_square_sums.dtype} {tuple(q_square_sums.shape)}"
        )
    keys = k.shape[1]
    if k.shape != (batch, keys, dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [{batch}, keys, {dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if bias is not None and bias.numel() != keys:
        raise ValueError(f"bias must hold one value a key ({keys}), got {tuple(bias.shape)}")
    flat = q.reshape(-1, dim)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    rows = flat.shape[0]
    out = torch.empty((rows, dim), dtype=torch.int8, device=q.device)
    scales = torch.empty(scale_shape(rows, dim), dtype=torch.float32, device=q.device)
    # The rows' 1 / rms once, not in each of a row's num_heads tiles: a tile would wait for their loads
    # and sums before its first MMA (H200, 1.3B shape: 0.175 ms against 0.141 with this pass).
    rstd = torch.empty(rows, dtype=torch.float32, device=q.device)
    _inverse_rms_kernel[(triton.cdiv(rows, RMS_ROWS),)](
        q_square_sums.contiguous(), rstd, rows, num_heads, eps, D=dim, BLOCK_ROWS=RMS_ROWS,
        HEADS_POW2=triton.next_power_of_2(num_heads), num_warps=4,
    )  # fmt: skip
    _cross_attention_kernel[(min(scales.numel(), sm_count(q.device)),)](
        flat,
        rstd,
        k,
        v,
        bias.reshape(keys) if bias is not None else scales,  # unread without a bias
        out,
        scales,
        rows,
        length,
        keys,
        num_heads,
        flat.stride(0),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        LOG2E / math.sqrt(QUANT_BLOCK),
        HAS_BIAS=bias is not None,
        BLOCK_M=QUANT_BLOCK,
        HEAD_DIM=QUANT_BLOCK,
        BLOCK_KEYS=block_keys(gpu_limits(q.device)),
        num_warps=WARPS,
        num_stages=STAGES,
    )
    return out.view(batch, length, dim), scales
