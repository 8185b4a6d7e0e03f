"""Where a DiT forward spends its GPU time: one profiled forward, kernels grouped by kind.

    python scripts/profile_dit.py --out profile_dit.json [--model wan2.1-t2v-1.3b] [--latent 21x60x104] [--quant]
        [--prompt-tokens 512] [--cuda-graphs] [--attention auto]

Random weights, bf16 (``--quant``: int8 W8A8 block linears, as the ``-quant`` checkpoints), the attention
backend ``--attention`` names (default: the one `auto` picks). The text context holds ``--prompt-tokens`` rows (default 512: the longest prompt,
all of the context upstream attends to); a request passes its prompt's rows only, e.g. 20-100, and makes their
keys once for all its steps, as here before the profiled forward. Prints the top kernels and the time per
group (GEMM, attention, elementwise/norm, other), and the forward's wall time against its kernel time
with the number of launches: where wall exceeds kernels, the GPU waited for the host to enqueue
(``--cuda-graphs``: the forward replays as CUDA graphs, as a pipeline's do). Writes all of it as JSON.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from turbovideo.benchmark import benchmark_device, dit_latent, median_ms
from turbovideo.catalog import ATTENTION_CHOICES
from turbovideo.models import DIT_CONFIGS, build_dit
from turbovideo.pipeline.forward_graphs import ForwardGraphs

# Kernel-name fragments per group; the first group that matches wins.
GROUPS = {
    "gemm": ("gemm", "cutlass", "sm90_xmma", "nvjet", "int8_gemm", "_int_mm"),
    "attention": ("sparse", "sla", "attn", "flash", "fmha", "sdpa", "cudnn"),
    "elementwise/norm": (
        "norm",
        "rope",
        "residual",
        "elementwise",
        "vectorized",
        "reduce",
        "quant",
        "gelu",
        "silu",
        "mul",
        "add",
    ),
}


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS.items():
        if any(fragment in lowered for fragment in fragments):
            return group
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="wan2.1-t2v-1.3b", choices=sorted(DIT_CONFIGS))
    parser.add_argument("--latent", default="21x60x104", help="T x H x W of the 16-channel latent")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--quant", action="store_true", help="int8 W8A8 block linears")
    parser.add_argument(
        "--prompt-tokens", type=int, default=512, help="rows of text context (the rest is zero padding)"
    )
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the forward as CUDA graphs")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES)
    args = parser.parse_args()

    config = DIT_CONFIGS[args.model]
    frames, height, width = dit_latent(parser, args.latent, config)
    device = benchmark_device("profile_dit.py", out=args.out)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 16, frames, height, width, device=device, generator=g).bfloat16()
    t = torch.tensor([988.0], device=device, dtype=torch.bfloat16)
    context = torch.randn(1, args.prompt_tokens, config.text_dim, device=device, generator=g).bfloat16()
    y = None
    if config.task == "i2v":
        y = torch.randn(1, config.cond_dim, frames, height, width, device=device, generator=g).bfloat16()
    model = build_dit(args.model, device=device, quantized=args.quant, attention=args.attention)
    graphs = ForwardGraphs()
    with torch.no_grad():
        keys = model.text_keys(context)  # once, as a request makes them for all its steps

    def forward() -> torch.Tensor:
        return graphs(model, x, t, keys, y) if args.cuda_graphs else model(x, t, keys, y)

    with torch.no_grad():
        for _ in range(2):  # compile (and capture) outside the profile
            forward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
        wall = median_ms(forward, device, iters=5, warmup=0)

    kernels = [
        (event.key, event.device_time_total / 1e3, event.count)
        for event in prof.key_averages()
        if event.device_time_total > 0
    ]
    kernels.sort(key=lambda row: -row[1])
    groups: dict[str, float] = defaultdict(float)
    for name, ms, _ in kernels:
        groups[group_of(name)] += ms
    total = sum(groups.values())
    launches = sum(count for _, _, count in kernels)

    # The JSON first: a reader that stops early (| head) must not cost the results.
    with open(args.out, "w") as f:
        json.dump(
            {
                "model": args.model,
                "latent": args.latent,
                "quantized": args.quant,
                "attention": model.attention_backend,
                "prompt_tokens": args.prompt_tokens,
                "cuda_graphs": graphs.captured(model) > 0,
                "total_ms": total,
                "wall_ms": wall,
                "launches": launches,
                "groups_ms": groups,
                "kernels": [{"name": n, "ms": ms, "count": c, "group": group_of(n)} for n, ms, c in kernels],
            },
            f,
            indent=2,
        )
    print(
        f"{config.label} forward{' (int8 linears)' if args.quant else ''}, latent {args.latent}, "
        f"{args.prompt_tokens} prompt tokens{', CUDA graphs' if graphs.captured(model) else ''}, "
        f"attention {model.attention_backend}: {total:.1f} ms of kernels in {launches} launches, "
        f"{wall:.1f} ms wall (median of 5)"
    )
    for group, ms in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"  {group:18s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    print(f"top {args.top} kernels:")
    for name, ms, count in kernels[: args.top]:
        print(f"  {ms:8.2f} ms  x{count:<4d} [{group_of(name)}] {name[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
