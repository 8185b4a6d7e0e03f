"""The int8 SageSLA DiT's memory-bound passes against the GPU's own copy rate: where each one stands.

    python scripts/bench_passes.py --out passes.json
    TRITON_INTERPRET=1 python scripts/bench_passes.py --device cpu --shape tiny --out /tmp/p.json  # smoke run

Each pass runs as a 1.3B 480p (and 14B 720p) int8 DiT block calls it, B = 1, 128-wide heads, bf16 in,
timed per call over 10 calls back to back (turbovideo.benchmark.back_to_back_ms). ``moved_mb`` is what
the pass must read and write at least once (its activations; not the small tables and statistics it
also reads), ``tb_s`` the rate that makes, ``of_copy`` that rate over a device-to-device copy's. A pass
that reads and writes its data once can come near the copy; one far below it is bound by its latency or
its arithmetic, which is where a forward's time can still be won. On a CPU (smoke run) the times are
wall-clock medians of the interpreted kernels and mean nothing; passes that need CUDA are left out.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from turbovideo.kernels import norms, sagesla, sla
from turbovideo.kernels.cross_attention import cross_attention_quantized
from turbovideo.kernels.quant import gelu_tanh_quantize
from turbovideo.kernels.rope import rms_norm_rope

from turbovideo.benchmark import back_to_back_ms, benchmark_device, median_ms
from turbovideo.models.int8 import chunk_moments, chunk_square_sums

# (tokens, heads, FFN width): B * L at 81 frames.
SHAPES = {"1.3B-480p": (32760, 12, 8960), "14B-720p": (75600, 40, 13824), "tiny": (200, 2, 512)}
HEAD_DIM = 128
# A 48-token prompt's rows and its padding's stand-in keys, as the DiT's cross-attention gets them.
TEXT_KEYS = 64
EPS = 1e-6
COPY = "device copy (the ceiling)"


def passes(length: int, heads: int, ffn: int, device: torch.device) -> list[tuple[str, int, Callable, bool]]:
    """(name, bytes moved, the call, whether it needs CUDA) for each pass at one shape."""
    g = torch.Generator(device=device).manual_seed(0)
    dim = heads * HEAD_DIM

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=g).to(torch.bfloat16)

    x, hidden = randn(1, length, dim), randn(1, length, ffn)
    q, k, v = (randn(1, length, heads, HEAD_DIM) for _ in range(3))
    o_s = randn(1, heads, length, HEAD_DIM).transpose(1, 2)  # SpargeAttn's output, [B, H, L, D] in memory
    weight = 1 + 0.1 * torch.randn(dim, device=device, generator=g)
    angles = torch.rand(length, HEAD_DIM // 2, device=device, generator=g) * 50
    cos, sin = angles.cos(), angles.sin()
    shift, scale = (0.1 * torch.randn(1, 1, dim, device=device, generator=g) for _ in range(2))
    moments = chunk_moments(x.view(length, dim))  # what the GEMM that wrote the stream hands the norm
    proj_weight, proj_bias = randn(HEAD_DIM, HEAD_DIM) / 11, randn(HEAD_DIM)
    text_k, text_v = randn(1, TEXT_KEYS, dim), randn(1, TEXT_KEYS, dim)
    q_sums = chunk_square_sums(x.view(length, dim))
    blkq, blkk = sagesla.selection_blocks("sm90")  # Hopper's; the passes' cost hardly depends on them
    state = sla.linear_state(k, v, blkk)
    q_means = torch.empty(1, heads, -(-length // blkq), HEAD_DIM, device=device)
    stream = length * dim  # elements of one [L, D] activation: 2 bytes each in bf16, 1 in int8 or fp8
    return [
        (COPY, 4 * stream, x.clone, True),
        ("RMSNorm + RoPE (q or k)", 4 * stream, lambda: rms_norm_rope(x, weight, cos, sin, EPS), False),
        (
            "LayerNorm + modulation -> int8, statistics from the GEMM",
            3 * stream,
            lambda: norms.layer_norm_modulate(x, shift, scale, EPS, quantize=True, moments=moments),
            False,
        ),
        (
            f"GELU -> int8 (ffn.2 input, width {ffn})",
            3 * length * ffn,
            lambda: gelu_tanh_quantize(hidden),
            False,
        ),
        (
            "SageSLA q quantizer and block means",
            3 * stream,
            lambda: sagesla.quantize_blocks(q, blkq, block_means=q_means),
            False,
        ),
        (
            "SageSLA k quantizer, mean subtracted",
            3 * stream,
            lambda: sagesla.quantize_blocks(k, blkk, state.k_mean),
            False,
        ),
        ("SageSLA V fp8 (channel amax, values)", 3 * stream, lambda: sagesla.prepare_v_fp8(v), True),
        (
            "SLA linear state (KV, ksum, key statistics)",
            4 * stream,
            lambda: sla.linear_state(k, v, blkk),
            False,
        ),
        (
            "SLA linear branch + SpargeAttn output -> int8",
            5 * stream,
            lambda: sla.add_linear_branch(o_s, q, state, proj_weight, proj_bias, quantized=True),
            False,
        ),
        (
            f"cross-attention -> int8 ({TEXT_KEYS} text keys)",
            3 * stream,
            lambda: cross_attention_quantized(x, text_k, text_v, None, heads, q_square_sums=q_sums, eps=EPS),
            False,
        ),
    ]


def run(shape_names: list[str], device: torch.device) -> list[dict]:
    """One row a pass and shape, with the copy's rate the passes are measured against."""
    rows = []
    with torch.no_grad():
        for shape in shape_names:
            copy_rate = None
            for name, moved, call, cuda_only in passes(*SHAPES[shape], device):
                if cuda_only and device.type != "cuda":
                    continue
                ms = back_to_back_ms(call) if device.type == "cuda" else median_ms(call, device, 2, 1)
                rate = moved / ms / 1e9  # TB/s
                copy_rate = rate if name == COPY else copy_rate  # the first row, on a GPU
                row = {"shape": shape, "name": name, "ms": round(ms, 4), "moved_mb": round(moved / 1e6, 1)}
                row.update(tb_s=round(rate, 2), of_copy=round(rate / copy_rate, 2) if copy_rate else None)
                rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    keys = ["shape", "name", "ms", "moved_mb", "tb_s", "of_copy"]
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str("" if r[k] is None else r[k]).ljust(widths[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (TRITON_INTERPRET=1)")
    parser.add_argument(
        "--shape",
        action="append",
        choices=sorted(SHAPES),
        help="repeatable; default 1.3B-480p and 14B-720p on a GPU, tiny on a CPU",
    )
    args = parser.parse_args()
    device = benchmark_device("bench_passes.py", args.device, cpu_smoke=True, out=args.out)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            "bench_passes.py: --device cpu runs the Triton kernels interpreted: set TRITON_INTERPRET=1"
        )
    default = ["1.3B-480p", "14B-720p"] if device.type == "cuda" else ["tiny"]
    rows = run(args.shape or default, device)
    print_table(rows)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
