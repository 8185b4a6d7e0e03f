"""SageSLA (upstream-spec §4.3): SLA whose sparse branch runs in SpargeAttn's int8 QK / fp8-or-fp16 PV kernels.

Block selection and the linear branch are ours (kernels/sla.py), and so are the per-block int8
quantization of q and k (``quantize_blocks``) and V's fp8 preparation (``prepare_v_fp8``): they read
the DiT's [B, L, H, D] layout where SpargeAttn's versions need [B, H, L, D] copies, and produce the
same bits. Only the sparse kernels come from ``spas_sage_attn``, which is optional: nothing here
imports it until a call needs it.
"""

import functools
import importlib
from types import SimpleNamespace

import numpy as np
import torch
import triton
import triton.language as tl

from turbovideo.models.attention import SAGESLA_NOT_INSTALLED

from .cuda_graph import outside_graph
from .rounding import reciprocal, to_bf16
from .sla import (
    SAGESLA_SM90_BLOCKS,
    SLA_BLOCKS,
    _block_mean,
    _head_rows,
    add_linear_branch,
    block_scores,
    blocks_to_keep,
    linear_state,
    top_block_steps,
)

# The archs SpargeAttn's build compiles kernels for (its setup.py filters TORCH_CUDA_ARCH_LIST to these).
SUPPORTED_ARCHS = ("sm80", "sm86", "sm87", "sm89", "sm90")
HEAD_DIMS = (64, 128)  # what SpargeAttn's kernels are built for
_FP16_PV_ARCHS = ("sm80", "sm86", "sm87")  # Ampere's kernel takes V in fp16 (later ones in fp8)
# SpargeAttn's per-head PV-skipping threshold; this value disables skipping, as upstream runs it.
_NO_PV_SKIP = 1e6
# SpargeAttn launches its kernels without a stream, i.e. on the legacy default stream: on any other
# stream they race the kernels that produce their inputs (seen on an H200: illegal memory accesses),
# and a CUDA graph capture cannot record them (cuda_graph.SegmentedGraph replays them between graphs).
DEFAULT_STREAM_ONLY = (
    "attention=sagesla runs SpargeAttn's kernels, which launch on the default CUDA stream only; "
    "call it (or replay its SegmentedGraph) outside torch.cuda.stream(), or use attention=sla"
)


@functools.cache
def sparge_modules() -> SimpleNamespace | None:
    """SpargeAttn's compiled kernels and quantization helpers, or None when it is not (properly) installed."""
    try:
        return SimpleNamespace(
            qattn=importlib.import_module("spas_sage_attn._qattn"),
            fused=importlib.import_module("spas_sage_attn._fused"),
            utils=importlib.import_module("spas_sage_attn.utils"),
        )
    except ImportError:
        return None


def cuda_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def is_available(device: torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and sparge_modules() is not None and cuda_arch(device) in wheel_archs()


@functools.cache
def wheel_archs() -> tuple[str, ...]:
    """The SUPPORTED_ARCHS the installed SpargeAttn has kernels for: those builder/build_spargeattn.sh
    recorded it was built for (a TORCH_CUDA_ARCH_LIST=9.0 image has no sm89 kernels), else all."""
    try:
        built = importlib.import_module("spas_sage_attn._turbovideo_build").TORCH_CUDA_ARCH_LIST
    except (ImportError, AttributeError):  # built some other way: nothing recorded
        return SUPPORTED_ARCHS
    return built_archs(built)


def built_archs(arch_list: str) -> tuple[str, ...]:
    """The SUPPORTED_ARCHS a TORCH_CUDA_ARCH_LIST value ("8.0;8.9;9.0+PTX", or space-separated) names.

    Exact matches only: SpargeAttn's sm89 and sm90 kernels use instructions older PTX cannot JIT into.
    """
    listed = {"sm" + item.split("+")[0].replace(".", "") for item in arch_list.replace(" ", ";").split(";")}
    return tuple(arch for arch in SUPPORTED_ARCHS if arch in listed)


def fp8_v(arch: str) -> bool:
    """Whether SageSLA's kernel on ``arch`` takes V in fp8 (from sm89 on), whose per-channel ranges a
    caller may give it (``sagesla_attention``'s ``v_amax``) instead of a pass over V to find them."""
    return arch not in _FP16_PV_ARCHS


def selection_blocks(arch: str) -> tuple[int, int]:
    """(BLKQ, BLKK) SageSLA selects with on ``arch`` (spec §4.2): Hopper's kernel tiles 64 x 128."""
    return SAGESLA_SM90_BLOCKS if arch == "sm90" else SLA_BLOCKS


@triton.jit
def _quantize_blocks_kernel(
    x_ptr,
    mean_ptr,
    q_ptr,
    scale_ptr,
    block_mean_ptr,
    L,
    H,
    n_blocks,
    stride_xb,
    stride_xl,
    stride_xh,
    BLK: tl.constexpr,
    D: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    BLOCK_MEANS: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    rows = blk * BLK + tl.arange(0, BLK)
    d = tl.arange(0, D)
    row_ok = (rows < L)[:, None]
    x = tl.load(
        _head_rows(x_ptr, bh // H, bh % H, rows, d, stride_xb, stride_xl, stride_xh, 1),
        mask=row_ok,
        other=0.0,
    )
    # SpargeAttn's quantizer, operation for operation (its kernel reads [B, H, L, D] copies): the mean
    # subtracted and rounded to bf16, scale = amax / 127 + 1e-7, round half away from zero, truncate.
    x = x.to(tl.float32)
    if BLOCK_MEANS:  # the selection's query-block means, from the same read of x
        tl.store(block_mean_ptr + (bh.to(tl.int64) * n_blocks + blk) * D + d, _block_mean(x, blk, L, BLK))
    if HAS_MEAN:  # the fp32 mean rounded to bf16 first, as SpargeAttn subtracts a bf16 mean
        mean = to_bf16(tl.load(mean_ptr + bh * D + d)).to(tl.float32)
        x = tl.where(row_ok, to_bf16(x - mean[None, :]).to(tl.float32), 0.0)
    scale = tl.max(tl.abs(x)) / 127.0
    scale += 1e-7
    q = x * reciprocal(scale)  # Triton's x / scale, one reciprocal a block
    q += 0.5 * tl.where(q >= 0, 1, -1)
    out_ptrs = q_ptr + bh.to(tl.int64) * L * D + rows.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(out_ptrs, q.to(tl.int8), mask=row_ok)
    tl.store(scale_ptr + bh * n_blocks + blk, scale)


def quantize_blocks(
    x: torch.Tensor, blk: int, mean: torch.Tensor | None = None, block_means: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block int8 of x [B, L, H, D] (bf16, any strides with a unit head-dim stride), minus fp32
    ``mean`` [B, H, 1, D] rounded to bf16, if given: (int8 [B, H, L, D] contiguous, fp32 scales
    [B, H, ceil(L / blk)]), the layout and values SpargeAttn's kernels take. ``block_means`` (fp32
    [B, H, ceil(L / blk), D]), if given, receives ``sla.block_means(x, blk)`` from the same pass (for
    ``mean`` None)."""
    batch, length, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_blocks = triton.cdiv(length, blk)
    q = torch.empty((batch, heads, length, dim), dtype=torch.int8, device=x.device)
    scales = torch.empty((batch, heads, n_blocks), dtype=torch.float32, device=x.device)
    mean_arg = mean.float().contiguous() if mean is not None else x
    _quantize_blocks_kernel[(n_blocks, batch * heads)](
        x, mean_arg, q, scales, scales if block_means is None else block_means,
        length, heads, n_blocks, x.stride(0), x.stride(1), x.stride(2),
        BLK=blk, D=dim, HAS_MEAN=mean is not None, BLOCK_MEANS=block_means is not None, num_warps=4,
    )  # fmt: skip
    return q, scales


# V's fp8 values span +-_V_FP8_RANGE (SpargeAttn's choice: scale = amax / 2.25), far inside e4m3's 448.
_V_FP8_RANGE = 2.25
# SpargeAttn divides by 2.25 in torch, which on CUDA multiplies by the fp32 reciprocal of a scalar
# divisor: the same product gives the same scales. (Exactly representable in fp32.)
_V_INV_RANGE = float(np.float32(1.0) / np.float32(_V_FP8_RANGE))
_SMALLEST_NORMAL = tl.constexpr(float(np.finfo(np.float32).tiny))
_V_TILE = 64  # tokens per program of the fp8 kernel (divides the 128-token padding; 128 spill registers)


@triton.jit
def _channel_amax_kernel(
    v_ptr, out_ptr, L, H, stride_b, stride_l, stride_h, CHUNK: tl.constexpr, D: tl.constexpr
):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, D)
    v_ptrs = _head_rows(v_ptr, bh // H, bh % H, rows, d, stride_b, stride_l, stride_h, 1)
    v = tl.load(v_ptrs, mask=(rows < L)[:, None], other=0.0)
    # Non-negative floats order as their bits do, so the float atomic max is exact.
    tl.atomic_max(out_ptr + bh * D + d, tl.max(tl.abs(v.to(tl.float32)), axis=0), sem="relaxed")


@triton.jit
def _v_fp8_kernel(
    v_ptr, amax_ptr, out_ptr, scale_ptr, L, H, padded, stride_b, stride_l, stride_h,
    RANGE: tl.constexpr, INV_RANGE: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    positions = tile * TILE + tl.arange(0, TILE)
    # The fp8 MMA reads each 16 tokens reordered: tokens 0..15 of a group sit at positions
    # 0 1 4 5 8 9 12 13 2 3 6 7 10 11 14 15, so position p holds token 8 ((p // 2) % 2) + 2 (p // 4) + p % 2
    # of its group. Gathering rows in that order keeps the stores contiguous.
    p = positions % 16
    tokens = positions - p + 8 * ((p // 2) % 2) + 2 * (p // 4) + p % 2
    d = tl.arange(0, D)
    v_ptrs = _head_rows(v_ptr, bh // H, bh % H, tokens, d, stride_b, stride_l, stride_h, 1)
    v = tl.load(v_ptrs, mask=(tokens < L)[:, None], other=0.0)
    # The smallest normal keeps an all-zero channel's scale from 0 / 0 (SpargeAttn's NaN).
    amax = tl.maximum(tl.load(amax_ptr + bh * D + d), _SMALLEST_NORMAL)
    values = v.to(tl.float32) * (RANGE / amax)[None, :]
    if tile == 0:
        tl.store(scale_ptr + bh * D + d, amax * INV_RANGE)
    out = out_ptr + bh.to(tl.int64) * D * padded + d[:, None] * padded + positions[None, :]
    tl.store(out, tl.trans(values.to(tl.float8e4nv)))


def prepare_v_fp8(v: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """V [B, L, H, D] (bf16, unit head-dim stride) as SpargeAttn's sm89/sm90 kernels read it: fp8 e4m3
    [B, H, D, L padded to 128] with each 16 tokens in the fp8 MMA's order and zeros past L, and the
    per-channel scales [B, H, D] (amax / 2.25). ``amax`` (fp32 [B, H * D]: each sample's largest |v| of
    each channel, as the v projection can write it, ``Int8Linear(column_amax=)``), else a pass over v
    finds it; then one pass for the values. SpargeAttn's own preparation needs a [B, H, L, D] copy, a
    transposed padded copy and a pass over that. (The amax taken in linear_state's pass over v instead
    cost that kernel more than the amax pass: H200, 1.3B int8 forward, +1.17 against -1.04 ms.)"""
    batch, length, heads, dim = v.shape
    if v.stride(-1) != 1:
        v = v.contiguous()
    strides = (v.stride(0), v.stride(1), v.stride(2))
    if amax is None:
        chunk = 256
        amax = torch.zeros((batch * heads, dim), dtype=torch.float32, device=v.device)
        _channel_amax_kernel[(triton.cdiv(length, chunk), batch * heads)](
            v, amax, length, heads, *strides, CHUNK=chunk, D=dim, num_warps=4
        )
    elif amax.shape != (batch, heads * dim) or amax.dtype != torch.float32 or not amax.is_contiguous():
        raise ValueError(
            f"amax must be a contiguous fp32 [{batch}, {heads * dim}] tensor, got {amax.dtype} {tuple(amax.shape)}"
        )
    padded = triton.cdiv(length, 128) * 128
    values = torch.empty((batch, heads, dim, padded), dtype=torch.float8_e4m3fn, device=v.device)
    scales = torch.empty((batch, heads, dim), dtype=torch.float32, device=v.device)
    _v_fp8_kernel[(padded // _V_TILE, batch * heads)](
        v, amax, values, scales, length, heads, padded, *strides,
        RANGE=_V_FP8_RANGE, INV_RANGE=_V_INV_RANGE, TILE=_V_TILE, D=dim, num_warps=4,
    )  # fmt: skip
    return values, scales


def sagesla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    topk: float,
    quantized: bool = False,
    v_amax: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SageSLA on q, k, v [B, L, H, D] (CUDA, head dim 64 or 128) -> [B, L, H, D] in q's dtype; or, if
    ``quantized`` (bf16, head dim 128), that output as the int8 o projection reads it
    (``sla.add_linear_branch``). ``v_amax`` (fp32 [B, H * D]), if given: each sample's
    largest |v| of each channel, read where V goes in fp8 (``fp8_v``): its preparation then needs no
    pass over V to find them."""
    sparge = sparge_modules()
    if sparge is None:
        raise RuntimeError(SAGESLA_NOT_INSTALLED)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"SageSLA needs head dim 64 or 128; got {q.shape[-1]}")
    arch = cuda_arch(q.device)
    blkq, blkk = selection_blocks(arch)
    state = linear_state(k, v, blkk)
    # The sparse branch is all from bf16: SpargeAttn's kernels read [B, H, L, D] ("HND", tensor_layout 1)
    # int8 q, k (quantize_blocks writes them so) and, from sm89 on, the fp8 V of prepare_v_fp8. The
    # selection and the linear branch read q, k, v as given; q's quantizer writes the selection's block
    # means only where they are the same numbers (bf16 q).
    batch, length, heads, dim = q.shape
    q_means = None
    if q.dtype == torch.bfloat16:
        q_means = torch.empty(
            (batch, heads, triton.cdiv(length, blkq), dim), dtype=torch.float32, device=q.device
        )
    q_int8, q_scale = quantize_blocks(q.to(torch.bfloat16), blkq, block_means=q_means)
    score = block_scores(q, state, blkq, q_means)
    lut, count = top_block_steps(score, blocks_to_keep(topk, score.shape[-1]))
    k_bf16, v_bf16 = (x.to(torch.bfloat16) for x in (k, v))
    o_s = _sparse_branch(sparge, arch, (q_int8, q_scale), k_bf16, v_bf16, state, lut, count, blkk, v_amax)
    return add_linear_branch(o_s.transpose(1, 2), q, state, proj_weight, proj_bias, quantized)


def _sparse_branch(sparge, arch, q_quantized, k, v, state, lut, count, blkk, v_amax=None) -> torch.Tensor:
    """SpargeAttn's block-sparse attention on bf16 k, v [B, L, H, D] (``v_amax``: v's channel amax, or
    None for a pass to find it); returns [B, H, L, D]."""
    q_int8, q_scale = q_quantized
    batch, heads, length, dim = q_int8.shape
    k_int8, k_scale = quantize_blocks(k, blkk, state.k_mean)
    scale = dim**-0.5
    layout, causal, per_block = 1, False, 1
    fp16_pv = not fp8_v(arch)  # Ampere's kernel takes V in fp16 and writes fp16
    out_dtype = torch.float16 if fp16_pv else torch.bfloat16
    o_s = torch.empty((batch, heads, length, dim), dtype=out_dtype, device=k.device)
    if fp16_pv:
        no_skip = torch.full((heads,), _NO_PV_SKIP, dtype=torch.float32, device=k.device)
        _launch(
            sparge.qattn.qk_int8_sv_f16_accum_f16_block_sparse_attn_inst_buf_with_pv_threshold,
            q_int8, k_int8, v.transpose(1, 2).to(torch.float16).contiguous(), o_s, lut, count, no_skip,
            q_scale, k_scale, layout, causal, per_block, scale, 0,
        )  # fmt: skip
        return o_s
    v_fp8, v_scale = prepare_v_fp8(v, v_amax)
    if arch == "sm90":
        _launch(
            sparge.qattn.qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_sm90,
            q_int8, k_int8, v_fp8, o_s, lut, count, q_scale, k_scale, v_scale,
            layout, causal, per_block, scale,
        )  # fmt: skip
        return o_s
    no_skip = torch.full((heads,), _NO_PV_SKIP, dtype=torch.float32, device=k.device)
    # Sage2++ (fp16 accumulation of PV) exists only when SpargeAttn was built with CUDA >= 12.8.
    kernel = getattr(
        sparge.qattn,
        "qk_int8_sv_f8_accum_f16_block_sparse_attn_inst_buf_fuse_v_scale_with_pv_threshold",
        sparge.qattn.qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_with_pv_threshold,
    )
    _launch(
        kernel, q_int8, k_int8, v_fp8, o_s, lut, count, no_skip, q_scale, k_scale, v_scale,
        layout, causal, per_block, scale, 0,
    )  # fmt: skip
    return o_s


def _launch(kernel, *args) -> None:
    """Call a SpargeAttn kernel, now or at each replay of the graph recording (cuda_graph.py)."""
    outside_graph(_on_default_stream, kernel, *args)


def _on_default_stream(kernel, q: torch.Tensor, *args) -> None:
    if torch.cuda.current_stream(q.device) != torch.cuda.default_stream(q.device):
        raise RuntimeError(DEFAULT_STREAM_ONLY)
    kernel(q, *args)
