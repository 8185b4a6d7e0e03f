"""W8A8 int8 linear and fused norm kernels on one GPU, against bf16 ``F.linear`` and eager PyTorch.

Usage (repository root, CUDA GPU): python scripts/bench_kernels_linear.py --out bench_linear.json

Linear rows, at the six Wan block-linear shapes (1.3B 480p: M = 32760; 14B 720p: M = 75600):
  * ``bf16 F.linear``                      the baseline (cuBLAS)
  * ``int8 quantize + GEMM``               what Int8Linear runs for a bf16 input: quantize_blockwise, then
                                           int8_gemm on the int8 activation (quantization included)
  * ``int8 GEMM, quantize in prologue``    int8_gemm on the bf16 activation, tiles quantized on load
  * ``int8 GEMM on int8 input``            the GEMM alone, as when the producing norm kernel emits int8
  * ``torch._int_mm (no scales)``          a ceiling: PyTorch's plain int8 matmul, no scales, no bias
  * ``check``                              the kernel's first 256 rows against the PyTorch reference
                                           (bit-exact expected), and its error relative to bf16 F.linear
Norm rows (B = 1, L and D of both models): fused kernels against the DiT block's eager PyTorch ops,
with ulp statistics against them (statistics summed in another order move an intermediate by an ulp
in rare elements; where modulation cancels, shift ~ -h * (1 + scale), that shows as a few ulps of
the small result, so look at exact_fraction first).
Times are per call of 10 calls run back to back (turbovideo.benchmark.back_to_back_ms: the GPU is
held while they are queued), as inside the DiT, where the CPU runs ahead and launch latency is hidden
(a call timed alone measured 0.05-0.35 ms more on an H200, for F.linear as for the Triton kernels);
CUDA-event medians after warm-up. Prints a table, writes JSON.
Targets (performance.md): int8 (quantization included) >= 1.0x bf16 at every shape, >= 1.3x at 14B.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from turbovideo.kernels import int8_gemm as gemm_module
from turbovideo.kernels import norms
from turbovideo.kernels.cross_attention import cross_attention_quantized
from turbovideo.kernels.gpu import gpu_limits
from turbovideo.kernels.int8_gemm import int8_gemm
from turbovideo.kernels.quant import gelu_tanh_quantize, quantize_blockwise
from turbovideo.kernels.rope import rms_norm, rms_norm_rope

from turbovideo.benchmark import back_to_back_ms, benchmark_device, rel_error
from turbovideo.models import int8 as reference
from turbovideo.models.layers import apply_rope

# (label, M, K, N) — M is B * L tokens at 81 frames.
LINEAR_SHAPES = [
    ("1.3B q/k/v/o 1536->1536", 32760, 1536, 1536),
    ("1.3B ffn.0 1536->8960", 32760, 1536, 8960),
    ("1.3B ffn.2 8960->1536", 32760, 8960, 1536),
    ("14B q/k/v/o 5120->5120", 75600, 5120, 5120),
    ("14B ffn.0 5120->13824", 75600, 5120, 13824),
    ("14B ffn.2 13824->5120", 75600, 13824, 5120),
]
# (label, L, D, FFN width)
NORM_SHAPES = [("1.3B 480p", 32760, 1536, 8960), ("14B 720p", 75600, 5120, 13824)]
HEAD_DIM = 128
TEXT_ROWS = 48  # a prompt's rows and its padding's stand-in key, as the DiT's cross-attention gets them
EPS = 1e-6
CHECK_ROWS = 256


def _ms(fn) -> float:
    return back_to_back_ms(fn, iters=20)


def _ulp_stats(out: torch.Tensor, expected: torch.Tensor) -> dict:
    distance = (out.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
    return {"max_ulp": int(distance.max()), "exact_fraction": round((distance == 0).float().mean().item(), 6)}


def linear_rows(device: torch.device, label: str, m: int, k: int, n: int) -> list[dict]:
    """Timings of one linear shape [m, k] x [n, k]^T against bf16 F.linear, and its correctness check."""
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(n, k, device=device) / k**0.5).to(torch.bfloat16)
    bias = (0.1 * torch.randn(n, device=device)).to(torch.bfloat16)
    qw, sw = reference.quantize_blockwise(weight)
    qx, sx = quantize_blockwise(x)
    rows = []

    def add(name: str, ms: float | None, **extra) -> None:
        row = {"shape": label, "name": name, "ms": None if ms is None else round(ms, 4)}
        if ms is not None:
            row["tflops"] = round(2 * m * k * n / ms / 1e9, 1)
            row["speedup_vs_bf16"] = round(bf16_ms / ms, 3)
        rows.append({**row, **extra})

    bf16_ms = _ms(lambda: F.linear(x, weight, bias))
    add("bf16 F.linear", bf16_ms)
    add("int8 quantize + GEMM", _ms(lambda: quantize_then_gemm(x, qw, sw, bias)))
    add(
        "int8 GEMM, quantize in prologue",
        _ms(lambda: int8_gemm(x, qw, sw, bias)),
        config=str(gemm_module.gemm_launch(True, gpu_limits(x.device))),
    )
    gpu = gpu_limits(x.device)
    device_launch = gemm_module.gemm_launch(False, gpu, m, n, k=k)
    add(
        "int8 GEMM on int8 input",
        _ms(lambda: int8_gemm(qx, qw, sw, bias, a_scale=sx)),
        config=str(device_launch),
    )
    if k == n:  # a q projection: cross-attention's also writes its RMSNorm's square sums
        sums = torch.empty(m, n // 128, device=device)
        add(
            "int8 GEMM on int8 input, writing square sums",
            _ms(lambda: int8_gemm(qx, qw, sw, bias, a_scale=sx, square_sums=sums)),
            config=str(device_launch),
        )
    if n > k:  # ffn.0: its output goes through the GELU to ffn.2 as int8
        add(
            "int8 GEMM on int8 input, then GELU -> int8",
            _ms(lambda: gelu_tanh_quantize(int8_gemm(qx, qw, sw, bias, a_scale=sx))),
            config=str(device_launch),
        )
        add(
            "int8 GEMM on int8 input writing GELU -> int8",
            _ms(lambda: int8_gemm(qx, qw, sw, bias, a_scale=sx, gelu_int8=True)),
            config=str(device_launch),
        )
        fused = int8_gemm(qx, qw, sw, bias, a_scale=sx, gelu_int8=True)
        unfused = gelu_tanh_quantize(int8_gemm(qx, qw, sw, bias, a_scale=sx))
        add(
            "check: GELU -> int8 in the GEMM vs after it, all rows",
            None,
            mismatches=int((fused[0] != unfused[0]).sum()),
            scale_mismatches=int((fused[1] != unfused[1]).sum()),
        )
    if device_launch.warp_specialized:  # the Triton kernel it replaces, side by side
        triton_launch = gemm_module.gemm_launch(False, gpu)
        add(
            "int8 GEMM on int8 input, Triton kernel",
            _ms(lambda: int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=triton_launch)),
            config=str(triton_launch),
        )
        # At full size: the check rows below take too few rows for the warp-specialized kernel.
        warp_specialized = int8_gemm(qx, qw, sw, bias, a_scale=sx)
        triton_out = int8_gemm(qx, qw, sw, bias, a_scale=sx, launch=triton_launch)
        add(
            "check: warp-specialized vs Triton kernel, all rows",
            None,
            mismatches=int((warp_specialized != triton_out).sum()),
        )
    add("quantize_blockwise alone", _ms(lambda: quantize_blockwise(x)))
    add("torch._int_mm (no scales)", _ms(lambda: torch._int_mm(qx, qw.t())))

    head = x[:CHECK_ROWS]
    expected = reference.int8_linear_reference(head, qw, sw, bias)
    add(
        "check: quantize + GEMM vs reference",
        None,
        **_ulp_stats(quantize_then_gemm(head, qw, sw, bias), expected),
    )
    add("check: prologue GEMM vs reference", None, **_ulp_stats(int8_gemm(head, qw, sw, bias), expected))
    add(
        "check: int8 vs bf16 F.linear",
        None,
        rel_l2=round(rel_error(expected, F.linear(head, weight, bias)), 6),
    )
    return rows


def quantize_then_gemm(
    x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """What Int8Linear runs on CUDA for a bf16 input."""
    qx, sx = quantize_blockwise(x)
    return int8_gemm(qx, qw, sw, bias, a_scale=sx)


def norm_rows(device: torch.device, label: str, length: int, dim: int, ffn_dim: int) -> list[dict]:
    """Fused elementwise kernels at one (L, D) against the DiT block's eager PyTorch ops, with ulp checks."""
    heads = dim // HEAD_DIM
    x = torch.randn(1, length, dim, device=device).to(torch.bfloat16)
    hidden = torch.randn(1, length, ffn_dim, device=device).to(torch.bfloat16)
    update = torch.randn(1, length, dim, device=device).to(torch.bfloat16)
    shift, scale, gate = (torch.randn(1, 6, dim, device=device) * 0.5).chunk(6, dim=1)[:3]
    weight = 1 + 0.1 * torch.randn(dim, device=device)
    bias = 0.1 * torch.randn(dim, device=device)
    angles = torch.rand(length, HEAD_DIM // 2, device=device) * 50
    text_k, text_v = torch.randn(2, 1, TEXT_ROWS, dim, device=device).to(torch.bfloat16)
    text_bias = torch.zeros(1, 1, 1, TEXT_ROWS, device=device, dtype=torch.bfloat16)
    text_bias[..., -1] = 6.1  # one stand-in key for 464 padding rows: log(464)
    cos, sin = torch.cos(angles), torch.sin(angles)
    q_sums = reference.chunk_square_sums(x.reshape(length, dim))
    weighted_k = (text_k.float() * weight).to(torch.bfloat16)  # q's norm weight, as the DiT folds it

    def eager_modulate(stream: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(stream.float(), (dim,), eps=EPS).to(torch.bfloat16)
        return (h.float() * (1 + scale) + shift).to(torch.bfloat16)

    def eager_affine(stream: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(stream.float(), (dim,), weight, bias, EPS).to(torch.bfloat16)

    def eager_residual(stream: torch.Tensor) -> torch.Tensor:
        return stream + update * gate.to(torch.bfloat16)

    def eager_cross_attention(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = rms_norm(q, weight, EPS)
        split = [t.unflatten(-1, (heads, HEAD_DIM)).transpose(1, 2) for t in (q, text_k, text_v)]
        out = F.scaled_dot_product_attention(*split, attn_mask=text_bias)
        return quantize_blockwise(out.transpose(1, 2).flatten(2))

    def eager_rms_rope(q: torch.Tensor) -> torch.Tensor:
        q32 = q.float()
        normed = (q32 * torch.rsqrt(q32.square().mean(-1, keepdim=True) + EPS) * weight).to(torch.bfloat16)
        return apply_rope(normed.unflatten(-1, (heads, HEAD_DIM)), cos, sin).flatten(-2)

    cases = [
        (
            "LN + modulation",
            lambda: eager_modulate(x),
            lambda: norms.layer_norm_modulate(x, shift, scale, EPS),
        ),
        (  # unfused: eager norm, then the standalone quantization kernel
            "LN + modulation -> int8",
            lambda: quantize_blockwise(eager_modulate(x)),
            lambda: norms.layer_norm_modulate(x, shift, scale, EPS, quantize=True),
        ),
        ("affine LN (norm3)", lambda: eager_affine(x), lambda: norms.layer_norm_affine(x, weight, bias, EPS)),
        ("gated residual", lambda: eager_residual(x), lambda: norms.gated_residual(x, update, gate)),
        (
            "gated residual + affine LN",
            lambda: eager_affine(eager_residual(x)),
            lambda: norms.residual_layer_norm_affine(x, update, gate, weight, bias, EPS)[1],
        ),
        (
            "RMSNorm + RoPE (one of q, k)",
            lambda: eager_rms_rope(x),
            lambda: rms_norm_rope(x, weight, cos, sin, EPS),
        ),
        (  # the FFN hidden [L, ffn_dim]: unfused is PyTorch's GELU, then the standalone quantization kernel
            f"GELU -> int8 (ffn.2 input, width {ffn_dim})",
            lambda: quantize_blockwise(F.gelu(hidden, approximate="tanh")),
            lambda: gelu_tanh_quantize(hidden),
        ),
        (  # q's RMSNorm kernel, cuDNN's attention, then the standalone quantization kernel, against the
            # kernel given q's square sums (the q projection writes them); int8 values may differ by a step
            f"RMSNorm + cross-attention -> int8 (o input, {TEXT_ROWS} text rows)",
            lambda: eager_cross_attention(x),
            lambda: cross_attention_quantized(
                x, weighted_k, text_v, text_bias, heads, q_square_sums=q_sums, eps=EPS
            ),
        ),
    ]
    rows = []
    for name, eager, fused in cases:
        eager_ms, fused_ms = _ms(eager), _ms(fused)
        row = {"shape": f"{label} L={length} D={dim}", "name": name, "ms": round(fused_ms, 4)}
        row.update(eager_ms=round(eager_ms, 4), speedup_vs_eager=round(eager_ms / fused_ms, 2))
        expected, out = eager(), fused()
        if isinstance(out, tuple):  # int8: a value differs only where the bf16 norm is an ulp off
            row["int8_mismatches"] = int((out[0] != expected[0]).sum())
            row["int8_max_step"] = int((out[0].int() - expected[0].int()).abs().max())
        else:
            row.update(_ulp_stats(out, expected))
        rows.append(row)
    return rows


def run(device: torch.device | str = "cuda") -> list[dict]:
    """Every linear and norm row (see the module docstring) on ``device``."""
    device = torch.device(device)
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for shape in LINEAR_SHAPES:
            rows += linear_rows(device, *shape)
            torch.cuda.empty_cache()
        for shape in NORM_SHAPES:
            rows += norm_rows(device, *shape)
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    keys = ["shape", "name", "ms"] + sorted({k for r in rows for k in r} - {"shape", "name", "ms"})
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str("" if r.get(k) is None else r[k]).ljust(widths[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="path of the JSON results")
    args = parser.parse_args()
    benchmark_device("bench_kernels_linear.py", out=args.out)
    import triton

    rows = run("cuda")
    print_table(rows)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
