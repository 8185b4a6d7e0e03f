"""umT5-XXL text-encoder benchmark: one 512-token prompt, random bf16 weights, on one GPU.

Usage (repository root, CUDA GPU): python scripts/bench_text_encoder.py --out bench_text_encoder.json

Times (CUDA-event median of --iters after warm-up) the encoder forward, plus the floor of the same
run: the encoder's bf16 linears alone. Also reports how far bf16 is from fp32 on these random
weights, and peak memory. Prints a table and writes every row as JSON to --out. ``--config tiny --device cpu``
runs the same code on a CPU as a smoke test (timed with perf_counter).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from turbovideo.benchmark import at_least_one, benchmark_device, median_ms, peak_gib, rel_error
from turbovideo.models.text_encoder import TEXT_ENCODER_CONFIGS, UMT5Encoder, build_text_encoder

UPSTREAM_H100_MS = 54.0  # performance.md: upstream umT5-XXL encode of 512 tokens on an H100


def linear_flops(encoder: UMT5Encoder, tokens: int) -> float:
    c = encoder.config
    return 2.0 * tokens * c.num_layers * (4 * c.dim * c.dim + 3 * c.dim * c.ffn_dim)


def attention_flops(encoder: UMT5Encoder, tokens: int) -> float:
    c = encoder.config
    return 4.0 * tokens * tokens * c.dim * c.num_layers


def linears_only(encoder: UMT5Encoder, x: torch.Tensor) -> Callable[[], object]:
    """The 7 GEMMs of every block on the same weights, with nothing between them."""
    weights = [
        (blk.attn.q.weight, blk.attn.k.weight, blk.attn.v.weight, blk.attn.o.weight)
        + (blk.ffn.gate[0].weight, blk.ffn.fc1.weight, blk.ffn.fc2.weight)
        for blk in encoder.blocks
    ]

    def run() -> None:
        for q, k, v, o, gate, fc1, fc2 in weights:
            for w in (q, k, v, o):
                F.linear(x, w)
            F.linear(F.linear(x, gate) * F.linear(x, fc1), fc2)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    parser.add_argument("--config", default="umt5-xxl", choices=sorted(TEXT_ENCODER_CONFIGS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=at_least_one, default=512)
    parser.add_argument("--iters", type=at_least_one, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--skip-fp32", action="store_true", help="skip the fp32 accuracy reference (needs 4x memory)"
    )
    args = parser.parse_args(argv)
    device = benchmark_device("bench_text_encoder.py", args.device, cpu_smoke=True, out=args.out)

    begin = time.perf_counter()
    encoder = build_text_encoder(args.config, device=device, dtype=torch.bfloat16)
    build_s = time.perf_counter() - begin
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, encoder.config.vocab_size, (1, args.tokens), generator=generator)
    ids[0, -1] = 1  # </s>
    ids, mask = ids.to(device), torch.ones_like(ids, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    flops = linear_flops(encoder, args.tokens) + attention_flops(encoder, args.tokens)
    with torch.inference_mode():
        output = encoder(ids, mask)
        ms = median_ms(lambda: encoder(ids, mask), device, args.iters, args.warmup)
        rows = [{"case": "encoder bf16", "ms": ms, "tflops": flops / ms / 1e9}]
        x = torch.randn(args.tokens, encoder.dim, device=device, dtype=torch.bfloat16)
        ms = median_ms(linears_only(encoder, x), device, args.iters, args.warmup)
        rows.append(
            {
                "case": "floor: bf16 linears only",
                "ms": ms,
                "tflops": linear_flops(encoder, args.tokens) / ms / 1e9,
            }
        )
        peak = peak_gib(device)
        accuracy = {}
        if not args.skip_fp32:
            reference = copy.deepcopy(encoder).float()
            accuracy["bf16_vs_fp32"] = rel_error(output, reference(ids, mask))
            del reference

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"umT5 text encoder ({args.config}), {args.tokens} tokens, batch 1, bf16, {name}")
    print(f"random-weight build {build_s:.1f} s; peak memory during encode {peak or 0:.2f} GiB")
    print(f"{'case':40s} {'ms':>9s} {'TFLOP/s':>9s}")
    for row in rows:
        print(f"{row['case']:40s} {row['ms']:9.2f} {row['tflops']:9.1f}")
    print(f"{'upstream on an H100 (performance.md)':40s} {UPSTREAM_H100_MS:9.2f}")
    for key, value in accuracy.items():
        print(f"relative error {key}: {value:.2e} (random weights)")

    result = {
        "device": name,
        "config": args.config,
        "tokens": args.tokens,
        "iters": args.iters,
        "build_s": build_s,
        "peak_gib": peak,
        "upstream_h100_ms": UPSTREAM_H100_MS,
        "rows": rows,
        "accuracy": accuracy,
    }
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
