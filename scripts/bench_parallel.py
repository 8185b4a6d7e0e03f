"""Benchmark Ulysses sequence parallelism: a 4-step DiT run on 1 GPU vs all visible GPUs, and their difference.

    python scripts/bench_parallel.py --out bench_parallel.json                     # Wan2.1-14B 720p, all GPUs
    python scripts/bench_parallel.py --out b.json --blocks 8                       # 8 of 40 blocks, extrapolated
    python scripts/bench_parallel.py --out /tmp/smoke.json --model tiny-t2v --latent 3x6x10 --device cpu --gpus 2

No torchrun: the script is rank 0 and starts one follower process per other GPU with the worker's own
launcher (turbovideo.parallel), NCCL on CUDA, gloo with --device cpu. Random bf16 weights and SLA
attention (Triton on CUDA) unless --attention says otherwise; the same model runs first alone on
GPU 0, then sharded over the group. A run is --steps forwards (one rCM
request's DiT work); times are medians of --repeats runs after one warm-up forward each. With
--blocks N < the model's depth, times are scaled by depth/N and labelled as extrapolated.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from turbovideo.benchmark import at_least_one, benchmark_device, dit_latent
from turbovideo.models import DIT_CONFIGS, build_dit
from turbovideo.parallel import SequenceParallelGroup, check_head_split


def timed_run(forward, timesteps: list[torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds for one forward per timestep (a request's DiT work) and the first forward's output."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    outputs = [forward(t) for t in timesteps]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, outputs[0]


def measure(forward, timesteps, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    forward(timesteps[0])  # warm-up: Triton compilation
    runs = [timed_run(forward, timesteps, device) for _ in range(repeats)]
    return statistics.median(seconds for seconds, _ in runs), runs[0][1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--model", default="wan2.1-t2v-14b", choices=sorted(DIT_CONFIGS))
    parser.add_argument(
        "--latent", default="21x90x160", help="T x H x W of the 16-channel latent (720p 16:9)"
    )
    parser.add_argument(
        "--blocks", type=int, default=None, help="run only the first N blocks and extrapolate"
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=at_least_one, default=2)
    parser.add_argument("--attention", default="sla", help="sla (Triton on CUDA), sagesla, dense or auto")
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument(
        "--gpus", type=int, default=None, help="ranks in the group (default: all visible GPUs)"
    )
    parser.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo smoke run)")
    args = parser.parse_args()

    device = benchmark_device("bench_parallel.py", args.device, cpu_smoke=True, out=args.out)
    if device.type == "cuda":
        device = torch.device("cuda", 0)
    world = (
        args.gpus if args.gpus is not None else (torch.cuda.device_count() if device.type == "cuda" else 2)
    )
    if world < 2:
        print("error: sequence parallelism needs at least 2 GPUs", file=sys.stderr)
        return 2
    config = DIT_CONFIGS[args.model]
    frames, height, width = dit_latent(parser, args.latent, config)
    try:
        check_head_split(config.label, config.num_heads, world)
    except ValueError as err:
        parser.error(str(err))
    blocks = args.blocks or config.num_layers
    tokens = frames * (height // 2) * (width // 2)

    # Followers first: they must not inherit a CUDA context, and they wait on their pipes meanwhile.
    group = SequenceParallelGroup.start(world, backend="nccl" if device.type == "cuda" else "gloo")
    try:
        model = build_dit(args.model, device=device, dtype=torch.bfloat16, attention=args.attention)
        model.blocks = model.blocks[:blocks]
        model.set_attention(args.attention, args.topk)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, 16, frames, height, width, device=device, generator=g).bfloat16()
        context = torch.randn(1, 512, config.text_dim, device=device, generator=g).bfloat16()
        context[:, 60:] = 0  # a 60-token prompt, zero-padded like the umT5 output
        y = None
        if config.task == "i2v":
            y = torch.randn(1, config.cond_dim, frames, height, width, device=device, generator=g).bfloat16()
        timesteps = [
            torch.tensor([t], device=device, dtype=torch.bfloat16)
            for t in torch.linspace(988.0, 250.0, args.steps).tolist()
        ]

        with torch.inference_mode():
            single_s, single_out = measure(lambda t: model(x, t, context, y), timesteps, device, args.repeats)
        peak_single = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        parallel = group.replicate(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        parallel_s, parallel_out = measure(
            lambda t: parallel(x, t, context, y), timesteps, device, args.repeats
        )
        peak_parallel = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    finally:
        group.close()

    scale = config.num_layers / blocks
    diff = (parallel_out.double() - single_out.double()).abs()
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "gpus": world,
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "model": args.model,
        "latent": [16, frames, height, width],
        "tokens": tokens,
        "heads": config.num_heads,
        "blocks_run": blocks,
        "extrapolated": blocks < config.num_layers,
        "steps": args.steps,
        "attention": model.attention_backend,
        "topk": args.topk,
        "single_gpu_s": single_s * scale,
        "parallel_s": parallel_s * scale,
        "speedup": single_s / parallel_s,
        "efficiency": single_s / (world * parallel_s),
        "max_rel_diff": (diff.max() / single_out.double().abs().max()).item(),
        "rel_l2_diff": (diff.norm() / single_out.double().norm()).item(),
        "peak_gib_rank0_single": peak_single,
        "peak_gib_rank0_parallel": peak_parallel,
    }
    label = f" (extrapolated from {blocks} of {config.num_layers} blocks)" if results["extrapolated"] else ""
    print(
        f"{config.label}, latent {args.latent} ({tokens} tokens), {args.steps} steps, {results['attention']}{label}"
    )
    print(f"{'GPUs':>5} {'DiT s':>9} {'speedup':>8} {'efficiency':>10} {'peak GiB r0':>12}")
    for gpus, seconds, peak in (
        (1, results["single_gpu_s"], peak_single),
        (world, results["parallel_s"], peak_parallel),
    ):
        speedup = results["single_gpu_s"] / seconds
        peak_text = f"{peak:.1f}" if peak is not None else "-"
        print(f"{gpus:>5} {seconds:>9.2f} {speedup:>8.2f} {speedup / gpus:>10.1%} {peak_text:>12}")
    print(
        f"{world}-GPU output vs 1-GPU: max rel diff {results['max_rel_diff']:.2e}, rel L2 {results['rel_l2_diff']:.2e}"
    )
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
