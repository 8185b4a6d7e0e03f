"""Whole-request benchmark of the pipeline with random weights at the real shapes, one stage at a time.

    python scripts/bench.py --model all --out bench.json                 # H100: 1.3B 480p, 14B 720p, A14B I2V 720p
    python scripts/bench.py --model TurboWan2.2-I2V-A14B-720P --blocks 8 --out i2v.json   # truncated, extrapolated
    python scripts/bench.py --model tiny-t2v --device cpu --frames 5 --out /tmp/smoke.json  # CPU smoke run

For each model: build ``VideoPipeline.random`` (umT5, VAE and DiT(s) at the real sizes, seeded random
weights, bf16), run one request to warm up (kernel compiles, cuDNN algorithm choice, allocator; its
wall time is reported as the process's first request, after the worker's one-step start-up warm-up
with ``--start-warm-up``; run twice with a fresh TRITON_CACHE_DIR to see an empty and a warm compile
cache), then time a second, warm request with a new prompt (so the text encoder runs): prompt encode
(+ I2V image encode), every DiT step (by CUDA events, without synchronising between steps), VAE
decode and mp4 mux, and the peak GPU memory of that request. The DiT's forwards replay as CUDA graphs
(captured in the first request) unless ``--no-cuda-graphs``. ``--blocks N`` keeps N DiT blocks per
expert and scales the DiT time by num_layers / N; those
rows are labelled "extrapolated". Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from turbovideo.benchmark import benchmark_device
from turbovideo.catalog import MODELS, resolve_models
from turbovideo.pipeline import GenerationRequest, ProgressEvent, VideoPipeline

DEFAULT_SET = ("TurboWan2.1-T2V-1.3B-480P", "TurboWan2.1-T2V-14B-720P", "TurboWan2.2-I2V-A14B-720P")
# performance.md targets (H100), seconds.
TARGETS = {
    "TurboWan2.1-T2V-1.3B-480P": {"dit": 0.6, "decode": 1.0, "total": 2.0},
    "TurboWan2.1-T2V-14B-720P": {"dit": 12.0},
}
WARMUP_PROMPT = "A fox walks through fresh snow at dawn, cinematic lighting, slow tracking shot."
TIMED_PROMPT = "A red sailboat crosses a calm bay under a pink sky, seagulls circling, wide shot."


def test_image(width: int, height: int) -> Image.Image:
    """A smooth colour gradient as the I2V input (content does not change the work)."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.full_like(xs, 96)], axis=-1
    )
    return Image.fromarray(rgb.astype(np.uint8))


class StageClock:
    """Progress callback that stamps every event, synchronising the device only at the end of each
    stage, so the request runs as the worker runs it. On a GPU each event is also a CUDA event, which
    the GPU records when it gets there: that times the denoising steps one by one while the host
    queues the next step as the GPU runs this one, as it does in a request (a synchronisation per step
    would add the host's start of every forward to it). Decoded frames are not timed one by one: the
    decode loop keeps the GPU queue full and the muxer copies frames out without waiting."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()
        self.events: list[tuple[ProgressEvent, float, torch.cuda.Event | None]] = []

    def __call__(self, event: ProgressEvent) -> None:
        marker = None
        if self.device.type == "cuda":
            if event.step == event.total:
                torch.cuda.synchronize(self.device)
            marker = torch.cuda.Event(enable_timing=True)
            marker.record()
        self.events.append((event, time.perf_counter(), marker))

    def step_seconds(self, stage: str) -> list[float]:
        """Duration of each event of ``stage``, measured from the event before it (on the GPU's clock
        when both are CUDA events)."""
        out, previous = [], (None, self.start, None)
        for entry in self.events:
            event, stamp, marker = entry
            if event.stage == stage:
                _, before, before_marker = previous
                if marker is not None and before_marker is not None:
                    marker.synchronize()
                    out.append(before_marker.elapsed_time(marker) / 1e3)
                else:
                    out.append(stamp - before)
            previous = entry
        return out


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    spec = MODELS[name]
    built = time.perf_counter()
    pipe = VideoPipeline.random(
        spec, device, quantized=args.quant, attention=args.attention, blocks=args.blocks
    )
    build_s = time.perf_counter() - built
    pipe.cuda_graphs = args.cuda_graphs
    config = pipe.experts[0].config
    kept = len(pipe.experts[0].blocks)
    scale = config.num_layers / kept

    def request(prompt: str) -> GenerationRequest:
        image = test_image(1280, 720) if spec.task == "i2v" else None
        return GenerationRequest(
            prompt=prompt,
            task=spec.task,
            image=image,
            resolution=args.resolution,
            num_frames=args.frames,
            num_steps=args.steps,
            attention=args.attention,
            sla_topk=args.topk,
        )

    with tempfile.TemporaryDirectory() as scratch:
        start_warm_up_s = pipe.warm_up() if args.start_warm_up else None
        first = time.perf_counter()
        pipe.generate(request(WARMUP_PROMPT), Path(scratch) / "warmup")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        first_request_s = time.perf_counter() - first
        clock = StageClock(device)
        result = pipe.generate(request(TIMED_PROMPT), Path(scratch) / "timed", clock)
        mp4_bytes = sum(p.stat().st_size for p in result.videos)

    steps = clock.step_seconds("denoise")
    timings = dict(result.timings)
    dit_full = timings["denoise"] * scale
    row = {
        "model": name,
        "dit_config": config.name,
        "resolution": f"{result.width}x{result.height}",
        "frames": result.num_frames,
        "steps": args.steps,
        "attention_backend": result.attention_backend,
        "quantized": args.quant,
        "cuda_graphs": pipe.graphed_forwards > 0,
        "blocks": kept,
        "num_layers": config.num_layers,
        "extrapolated": kept != config.num_layers,
        "build_s": build_s,
        "timings_s": timings,
        "dit_steps_s": steps,
        "dit_total_s": dit_full,
        "total_s": timings["total"] - timings["denoise"] + dit_full,
        "start_warm_up_s": start_warm_up_s,
        "first_request_s": first_request_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "placement": None
        if pipe.placement is None
        else {"resident": sorted(pipe.placement.resident), "swapped": sorted(pipe.placement.swapped)},
        "mp4_bytes": mp4_bytes,
        "targets_s": TARGETS.get(name, {}),
    }
    return row


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<28} {'size':>11} {'attn':>14} {'encode':>8} {'dit':>9} {'decode':>8} {'mux':>6} {'total':>8} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        t = r["timings_s"]
        mark = "*" if r["extrapolated"] else ""
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(
            f"{r['model']:<28} {r['resolution']:>11} {r['attention_backend']:>14} {t['encode']:>8.3f} "
            f"{r['dit_total_s']:>8.3f}{mark or ' '} {t['decode']:>8.3f} {t['mux']:>6.3f} {r['total_s']:>7.3f}{mark or ' '} {peak:>9}"
        )
        steps = ", ".join(f"{s:.3f}" for s in r["dit_steps_s"])
        note = (
            f" (measured on {r['blocks']}/{r['num_layers']} blocks, x{r['num_layers'] / r['blocks']:.1f})"
            if mark
            else ""
        )
        graphs = "CUDA graphs" if r["cuda_graphs"] else "eager"
        print(f"{'':<28} DiT steps [{steps}] s, {graphs}{note}")
        after = (
            ""
            if r["start_warm_up_s"] is None
            else f" (after a start-up warm-up of {r['start_warm_up_s']:.2f} s)"
        )
        print(f"{'':<28} first request of the process {r['first_request_s']:.3f} s{after}")
        for stage, target in r["targets_s"].items():
            value = {"dit": r["dit_total_s"], "decode": t["decode"], "total": r["total_s"]}[stage]
            verdict = "ok" if value <= target else "MISSED"
            print(f"{'':<28} target {stage} <= {target:.2f} s: {value:.3f} s {verdict}")
    if any(r["extrapolated"] for r in rows):
        print("* extrapolated from a truncated DiT")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="all",
        help=f"'all' ({', '.join(DEFAULT_SET)}) or catalog names and aliases, comma-separated",
    )
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (use a tiny model)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", default=None, help="default: the model's (480p / 720p)")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--quant", action="store_true", help="int8 W8A8 DiT linears")
    parser.add_argument(
        "--blocks", type=int, default=None, help="keep N DiT blocks per expert and extrapolate"
    )
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run every DiT forward eagerly instead of replaying CUDA graphs",
    )
    parser.add_argument(
        "--start-warm-up",
        action="store_true",
        help="run the worker's start-up warm-up before the first request",
    )
    args = parser.parse_args()

    try:  # catalog names and aliases ("tiny" is tiny-t2v and tiny-i2v), comma-separated
        names = (
            list(DEFAULT_SET)
            if args.model == "all"
            else [s.name for s in resolve_models(args.model, "--model")]
        )
    except ValueError as err:
        parser.error(str(err))
    device = benchmark_device("bench.py", args.device, cpu_smoke=True, out=args.out)
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": vars(args),
        "results": [],
        "errors": {},
    }
    for name in names:
        print(f"# {name} ...", file=sys.stderr, flush=True)
        try:
            report["results"].append(bench_model(name, args, device))
        except Exception as exc:  # one model that does not fit must not lose the others' rows
            report["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            print(f"# {name} failed: {report['errors'][name]}", file=sys.stderr, flush=True)
        # The pipeline is gone once bench_model returns; give its GPU memory back before the next.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report["results"])
    for name, error in report["errors"].items():
        print(f"{name}: FAILED ({error})")
    print(f"wrote {args.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
