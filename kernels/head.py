"""The DiT head (upstream-spec §3.3 step 8) as one pass over the stream after its statistics.

For a row x [D] of the bf16 stream, with the sample's fp32 shift and scale:
    z = bf16(LN(x))                                   (fp32 statistics, no affine)
    h = fp32(z) * (1 + scale) + shift                 fp32, the product and the sum each rounded
    out = h @ weight^T + bias                         fp32 ([D] -> [N], N = 64 for every Wan model)
Upstream runs these as separate PyTorch ops under fp32 autocast: the stream converted to fp32, LN,
the bf16 rounding, the conversion back, the modulation and an fp32 GEMM, each a pass over a [L, D]
fp32 tensor (1.0 ms of a 1.3B 480p forward on an H200). Here a program normalizes and modulates a
tile of rows chunk by chunk in registers and multiplies each chunk into its [rows, N] fp32 output.
The product runs on the tensor cores as three bf16 products (the weight is bf16; h is split into three
bf16 parts that sum to it exactly), so each term is exact before its fp32 sum, as in an fp32 GEMM;
summed in another order than cuBLAS's, it agrees with the reference to fp32 rounding. (Triton's fp32
product on the FMA units took 0.35-1.05 ms at 1.3B's shape.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norms import check_stream, modulation, per_sample, row_statistics
from .rounding import add_rn, dot_bf16, to_bf16

# H200, 10 calls back to back: 0.083 / 0.62 ms at 1.3B 480p / 14B 720p (128 rows with 8 warps
# 0.084 / 0.70, 64 columns a step 0.15 / 1.09; the PyTorch head 0.96 / 7.5 ms; the statistics pass
# before it 0.034 / 0.25 ms).
BLOCK_M = 64
BLOCK_K = 32
WARPS = 4


@triton.jit
def _head_kernel(
    x_ptr,
    stats_ptr,
    shift_ptr,
    scale_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    M,
    D,
    N,
    rows_per_sample,
    stride_shift,
    stride_scale,
    SHARED_MOD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    sample = rows // rows_per_sample
    mean = tl.load(stats_ptr + rows * 2, mask=row_ok, other=0.0)[:, None]
    rstd = tl.load(stats_ptr + rows * 2 + 1, mask=row_ok, other=0.0)[:, None]
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, D, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        shift, scale = modulation(
            shift_ptr, scale_ptr, sample, cols, col_ok, mask, stride_shift, stride_scale, SHARED_MOD
        )
        z = to_bf16((x.to(tl.float32) - mean) * rstd).to(tl.float32)
        # add_rn: the product rounds on its own, as the reference's separate multiply does (no FMA).
        h = tl.where(mask, add_rn(z * (1.0 + scale), shift), 0.0)
        w = tl.load(
            weight_ptr + n[None, :] * D + cols[:, None], mask=col_ok[:, None] & n_ok[None, :], other=0.0
        )
        # h is exactly hi + mid + lo in bf16 (8 significant bits each), and bf16 products are exact in
        # fp32: three bf16 tensor-core products give the fp32 product's terms exactly.
        hi = h.to(tl.bfloat16)
        rest = h - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        acc = dot_bf16(hi, w, dot_bf16(mid, w, dot_bf16(lo, w, acc)))
    bias = tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(out_ptrs, acc + bias[None, :], mask=row_ok[:, None] & n_ok[None, :])


def head_projection(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """fp32 [B, L, N]: ``linear_fp32(fp32(bf16(LN(x))) * (1 + scale) + shift)`` for the bf16 stream x
    [B, L, D], fp32 shift and scale [B, 1, D] (or [B, D], [1, D]) and the head's bf16 [N, D] weight and
    [N] bias (bf16 or fp32)."""
    check_stream(x)
    batch, length, dim = x.shape
    n = weight.shape[0]
    if weight.shape != (n, dim) or bias.shape != (n,) or weight.dtype != torch.bfloat16:
        raise ValueError(
            f"the head needs a bf16 weight [N, {dim}] and a bias [N]; got {weight.dtype} {tuple(weight.shape)} "
            f"and {tuple(bias.shape)}"
        )
    shift, stride_shift = per_sample(shift, batch, dim, "shift")
    scale, stride_scale = per_sample(scale, batch, dim, "scale")
    stats = row_statistics(x, eps)
    out = torch.empty((batch, length, n), dtype=torch.float32, device=x.device)
    rows = batch * length
    _head_kernel[(triton.cdiv(rows, BLOCK_M),)](
        x, stats, shift, scale, weight.contiguous(), bias.contiguous(), out,
        rows, dim, n, length, stride_shift, stride_scale,
        SHARED_MOD=stride_shift == 0 and stride_scale == 0,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=max(16, triton.next_power_of_2(n)), num_warps=WARPS,
    )  # fmt: skip
    return out
