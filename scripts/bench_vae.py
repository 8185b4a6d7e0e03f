"""Wan2.1 VAE benchmark on one GPU: our fast decode vs the same module's upstream-like eager path.

Usage (repository root, CUDA GPU): python scripts/bench_vae.py --out bench_vae.json

Random-weight ``wan2.1-vae`` in bf16. Times (CUDA events, --warmup runs, then the median of --iters)
the decode of a 16x21x60x104 latent (81 frames at 480x832) with ``fast=True`` (channels-last, fused
norm + SiLU, copy-light causal cache) and ``fast=False`` (contiguous NCDHW, unfused ops, cat/pad cache,
i.e. upstream's op sequence), with the peak memory of each, and how far apart their outputs are (and
how far each is from an fp32 decode). Also (on a GPU): the 720p latent (16x21x90x160) decode time and peak memory,
and the encode of 81 frames at 480p. Prints a table and writes everything as JSON to --out.
``--config tiny --device cpu --latent 16x3x4x6`` runs the same code on a CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from turbovideo.benchmark import at_least_one, benchmark_device, median_ms, parse_sizes, rel_error
from turbovideo.models.vae import VAE_CONFIGS, WanVAE, build_vae, pixel_frames

UPSTREAM_H100_S = {"decode 480p": 1.82, "decode 720p": 4.73, "encode 720p": 2.93}  # performance.md
TARGET_DECODE_480P_S = 1.0


def run_with_peak(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float | None]:
    """Run ``fn`` once; its result and the peak memory allocated above what was held before."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, (torch.cuda.max_memory_allocated() - before) / 2**30


def bench_case(
    vae: WanVAE, name: str, fn: Callable[[], torch.Tensor], args, device, keep: bool = False
) -> tuple[dict, torch.Tensor | None]:
    """One timed row: time, peak memory above the held tensors; returns the output when ``keep``."""
    output, peak = run_with_peak(fn, device)
    seconds = median_ms(fn, device, args.iters, args.warmup) / 1e3
    row = {"case": name, "fast": vae.fast, "s": seconds, "peak_gib": peak}
    return row, output if keep else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--config", default="wan2.1-vae", choices=sorted(VAE_CONFIGS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--latent", default="16x21x60x104", help="CxTxHxW of the 480p latent")
    parser.add_argument(
        "--latent-720p", help="CxTxHxW; 'none' skips it (the default on a CPU; 16x21x90x160 on a GPU)"
    )
    parser.add_argument("--iters", type=at_least_one, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-fp32", action="store_true", help="skip the fp32 accuracy reference")
    parser.add_argument("--skip-encode", action="store_true")
    args = parser.parse_args(argv)
    device = benchmark_device("bench_vae.py", args.device, cpu_smoke=True, out=args.out)
    z_dim = VAE_CONFIGS[args.config].z_dim
    shape = parse_sizes(parser, "--latent", args.latent, 4)
    big_text = args.latent_720p or ("16x21x90x160" if device.type == "cuda" else "none")
    big_shape = None if big_text == "none" else parse_sizes(parser, "--latent-720p", big_text, 4)
    if any(s is not None and s[0] != z_dim for s in (shape, big_shape)):
        parser.error(f"a latent of {args.config} has {z_dim} channels (its first size)")

    vae = build_vae(args.config, device=device, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, *shape, generator=generator).to(device)
    _, frames, height, width = latent.shape[1:]
    label = f"{pixel_frames(frames)}x{8 * height}x{8 * width}"

    rows, outputs = [], {}
    for fast in (True, False):
        vae.fast = fast
        row, outputs[fast] = bench_case(
            vae, f"decode {label}", lambda: vae.decode(latent), args, device, True
        )
        rows.append(row)
    accuracy = {"fast_vs_eager_bf16": rel_error(outputs[True], outputs[False])}
    if not args.skip_fp32:
        reference = build_vae(args.config, device=device, dtype=torch.float32)
        expected = reference.decode(latent)
        accuracy["fast_bf16_vs_fp32"] = rel_error(outputs[True], expected)
        accuracy["eager_bf16_vs_fp32"] = rel_error(outputs[False], expected)
        del reference, expected
    outputs.clear()
    vae.fast = True

    if big_shape is not None:
        big = torch.randn(1, *big_shape, generator=generator).to(device)
        _, frames_720, height_720, width_720 = big.shape[1:]
        label_720 = f"{pixel_frames(frames_720)}x{8 * height_720}x{8 * width_720}"
        rows.append(bench_case(vae, f"decode {label_720}", lambda: vae.decode(big), args, device)[0])
        del big

    if not args.skip_encode:
        video = torch.rand(1, 3, pixel_frames(frames), 8 * height, 8 * width, generator=generator) * 2 - 1
        video = video.to(device, torch.bfloat16)
        for fast in (True, False):
            vae.fast = fast
            rows.append(bench_case(vae, f"encode {label}", lambda: vae.encode(video), args, device)[0])
        vae.fast = True

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"Wan2.1 VAE ({args.config}), random bf16 weights, batch 1, {name}, torch {torch.__version__}")
    print(f"median of {args.iters} after {args.warmup} warm-up (the VAE runs cuDNN in benchmark mode)")
    print(f"{'case':44s} {'path':>6s} {'s':>8s} {'peak GiB':>9s}")
    for row in rows:
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        path = "fast" if row["fast"] else "eager"
        print(f"{row['case']:44s} {path:>6s} {row['s']:8.3f} {peak:>9s}")
    print(f"target: decode 480p <= {TARGET_DECODE_480P_S} s; upstream on an H100: {UPSTREAM_H100_S}")
    for key, value in accuracy.items():
        print(f"relative error {key}: {value:.2e} (random weights)")

    result = {
        "device": name,
        "torch": torch.__version__,
        "config": args.config,
        "iters": args.iters,
        "warmup": args.warmup,
        "target_decode_480p_s": TARGET_DECODE_480P_S,
        "upstream_h100_s": UPSTREAM_H100_S,
        "rows": rows,
        "accuracy": accuracy,
    }
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
