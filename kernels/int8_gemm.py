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
tensor cores read fastest (``tl.dot(a, w.T)``).

A tile of BLOCK_M <= 128 rows lies inside one activation scale row, so the activation scale is a scalar
per K block and the scale work per accumulator element is one fused multiply-add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import QUANT_BLOCK, quantize_blockwise, quantize_tile, scale_shape
from .rounding import INTERPRETED, to_bf16


@triton.jit
def _int32_to_fp32(p):
    # I2F conversion issues at a fraction of the FMA rate; for |p| < 2^22 adding p to the bits of
    # 1.5 * 2^23 and subtracting that value is exact and runs on full-rate integer/float pipes.
    # |P| <= 128 * 128 * 128 = 2^21 for a 128-wide block of int8 products.
    return (p + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_cm,
    K_BLOCKS,
    HAS_BIAS: tl.constexpr,
    QUANTIZE_A: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 128
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
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    a_scale_row = a_scale_ptr + ((pid_m * BLOCK_M) // 128) * K_BLOCKS
    w_scale_rows = w_scale_ptr + (cols // 128) * K_BLOCKS

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K_BLOCKS):
        k_ok = ks < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0)
        if QUANTIZE_A:
            a, a_scale = quantize_tile(a.to(tl.float32))
        else:
            a_scale = tl.load(a_scale_row + kb)
        w_scale = tl.load(w_scale_rows + kb, mask=col_ok, other=0.0)
        partial = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        # One rounding per K block, like upstream's fused multiply-add (and the reference).
        acc = tl.fma(_int32_to_fp32(partial), (a_scale * w_scale)[None, :], acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    out = to_bf16(acc)
    if HAS_BIAS:  # added after rounding, in bf16, as a separate bias add would
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        out = to_bf16(out.to(tl.float32) + bias.to(tl.float32))
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, out, mask=row_ok[:, None] & col_ok[None, :])


def _configs(quantize_a: bool) -> list[triton.Config]:
    if INTERPRETED:  # the interpreter runs every config it is given; one large tile keeps CI fast
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=1)]
    # (BLOCK_M, BLOCK_N, warps, stages), checked with ptxas for sm_90a to need no register spills: the
    # int32 partial of each K block lives next to the fp32 accumulator, so 128x256 tiles spill.
    shapes = [(128, 128, 8, 3), (128, 128, 8, 4)]
    if not quantize_a:  # a tile quantized in the prologue must be a whole 128-row scale tile
        shapes += [(128, 128, 8, 5), (64, 256, 8, 4), (64, 128, 4, 4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in shapes
    ]


_AUTOTUNE_KEY = ["M", "N", "K", "HAS_BIAS"]
# BLOCK_M divides 128 in every config, so the activation scale is one scalar per tile and K block.
_gemm_prequantized = triton.autotune(_configs(quantize_a=False), key=_AUTOTUNE_KEY)(_int8_gemm_kernel)
_gemm_quantizing = triton.autotune(_configs(quantize_a=True), key=_AUTOTUNE_KEY)(_int8_gemm_kernel)


def int8_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bf16(dequant(a) @ dequant(weight).T) + bias`` for ``a`` [..., K] -> bf16 [..., N].

    ``a`` is either int8 with ``a_scale`` (from ``quantize_blockwise`` or a kernel that emits int8)
    or bf16 without it, in which case each 128x128 tile is quantized inside the GEMM.
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
        launch, a_scale_arg = _gemm_prequantized, a_scale.contiguous()
    elif a.dtype == torch.bfloat16 and a_scale is None:
        launch, a_scale_arg = _gemm_quantizing, weight_scale  # unread placeholder
    else:
        raise ValueError(f"activation must be int8 with a_scale, or bf16 without, got {a.dtype}")
    if bias is not None and bias.dtype != torch.bfloat16:
        raise ValueError(f"bias must be bf16, got {bias.dtype}")

    out = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    k_blocks = triton.cdiv(k, QUANT_BLOCK)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch[grid](
        flat,
        a_scale_arg,
        weight,
        weight_scale.contiguous(),
        bias if bias is not None else weight_scale,  # unread placeholder when there is no bias
        out,
        m,
        n,
        k,
        flat.stride(0),
        weight.stride(0),
        out.stride(0),
        k_blocks,
        HAS_BIAS=bias is not None,
        QUANTIZE_A=a.dtype != torch.int8,
    )
    return out.view(*a.shape[:-1], n)


def int8_linear(
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """W8A8 linear for a bf16 activation, or for an already quantized ``(int8 values, tile scales)`` one.

    A bf16 activation gets its own memory-bound quantization pass: quantizing in the GEMM prologue
    repeats that work for every column tile (N / 128 times), on the cores the dequantization needs.
    scripts/bench_kernels_linear.py times both.
    """
    values, scales = x if isinstance(x, tuple) else quantize_blockwise(x)
    return int8_gemm(values, weight, weight_scale, bias, a_scale=scales)
