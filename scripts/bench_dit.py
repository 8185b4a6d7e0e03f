"""Benchmark one Wan DiT forward; by default Wan2.1-1.3B at 480p (latent 16x21x60x104, 32,760 tokens) on CUDA.

    python scripts/bench_dit.py --out bench_dit.json
    python scripts/bench_dit.py --out /tmp/smoke.json --model tiny-t2v --latent 3x8x12 --device cpu  # smoke run

Random weights (build_dit), bf16. Measures dense (SDPA) and SLA (topk 0.1) forwards, each with its
relative error against an fp32 forward of the same weights, plus attention-only baselines at the
same token count: cuDNN SDPA (CUDA only) and the selected SLA backend. Times are medians after
warm-up (CUDA events on a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from turbovideo.benchmark import at_least_one, benchmark_device, dit_latent, median_ms, peak_gib, rel_error
from turbovideo.models import DIT_CONFIGS, build_dit
from turbovideo.models.attention import select_attention


def bench_forwards(args: argparse.Namespace, latent: tuple[int, ...], device: torch.device) -> list[dict]:
    """bf16 forwards with dense and SLA attention, then their errors against fp32 forwards."""
    config = DIT_CONFIGS[args.model]
    frames, height, width = latent
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 16, frames, height, width, device=device, generator=g).bfloat16()
    t = torch.tensor([988.0], device=device, dtype=torch.bfloat16)  # first rCM step at sigma_max 80
    context = torch.randn(1, 512, config.text_dim, device=device, generator=g).bfloat16()
    context[:, 60:] = 0  # a 60-token prompt, zero-padded like the umT5 output
    y = None
    if config.task == "i2v":
        y = torch.randn(1, config.cond_dim, frames, height, width, device=device, generator=g).bfloat16()
    model = build_dit(args.model, device=device, dtype=torch.bfloat16, attention="dense")

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x, t, context, y)

    rows, outputs = [], []
    for name in ("dense", "sla"):
        model.set_attention(name, topk=args.topk)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(forward, device, args.iters, args.warmup)
        outputs.append(forward().float())
        what = f"{config.label} forward bf16, {name}"
        rows.append(
            {"what": what, "backend": model.attention_backend, "ms": ms, "peak_gib": peak_gib(device)}
        )

    model.float()  # the same weights in fp32 (norm weights already are)
    for row, output, name in zip(rows, outputs, ("dense", "sla-reference"), strict=True):
        model.set_attention(name, topk=args.topk)
        row["rel_err_vs_fp32"] = rel_error(output, forward())
        row["fp32_backend"] = model.attention_backend
    return rows


def bench_attention(args: argparse.Namespace, device: torch.device, tokens: int, heads: int) -> list[dict]:
    """One self-attention call at the model's shape: cuDNN SDPA baseline and the selected SLA backend."""
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, tokens, heads, 128, device=device, generator=g).bfloat16() for _ in range(3))
    rows = []
    if device.type == "cuda":
        qh, kh, vh = (z.transpose(1, 2).contiguous() for z in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ms = median_ms(
                lambda: F.scaled_dot_product_attention(qh, kh, vh), device, args.iters, args.warmup
            )
        rows.append({"what": f"attention H={heads} L={tokens}, SDPA", "backend": "cudnn-sdpa", "ms": ms})
    sla = select_attention("sla", device)
    proj_l = torch.nn.Linear(128, 128, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        ms = median_ms(lambda: sla(q, k, v, proj_l=proj_l, topk=args.topk), device, args.iters, args.warmup)
    rows.append({"what": f"attention H={heads} L={tokens}, SLA {args.topk}", "backend": sla.name, "ms": ms})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--model", default="wan2.1-t2v-1.3b", choices=sorted(DIT_CONFIGS))
    parser.add_argument("--latent", default="21x60x104", help="T x H x W of the 16-channel latent")
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=at_least_one, default=5)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    latent = dit_latent(parser, args.latent, DIT_CONFIGS[args.model])
    device = benchmark_device("bench_dit.py", args.device, cpu_smoke=True, out=args.out)
    # The fp32 reference must really be fp32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    config = DIT_CONFIGS[args.model]
    frames, height, width = latent
    tokens = frames * (height // 2) * (width // 2)
    rows = bench_forwards(args, latent, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += bench_attention(args, device, tokens, config.num_heads)

    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "latent": [16, frames, height, width],
        "tokens": tokens,
        "topk": args.topk,
        "rows": rows,
    }
    print(f"{'what':<44} {'backend':<16} {'ms':>9} {'rel err':>9} {'peak GiB':>9}")
    for row in rows:
        err = f"{row['rel_err_vs_fp32']:.2e}" if "rel_err_vs_fp32" in row else "-"
        peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "-"
        print(f"{row['what']:<44} {row['backend']:<16} {row['ms']:>9.2f} {err:>9} {peak:>9}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
