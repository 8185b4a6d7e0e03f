"""GPU memory of each stage of a request: the memory plan's estimate against the measured peak.

    python scripts/bench_memory.py --model TurboWan2.1-T2V-1.3B-480P --quant --out mem.json
    python scripts/bench_memory.py --model TurboWan2.1-T2V-14B-720P --blocks 2 --case 720p:81:1 --case 720p:161:1 --out mem14.json

The worker refuses a request whose estimate does not fit the GPU (E_INPUT, naming what would fit), so
an estimate below what a stage really takes means an out-of-memory error instead. This builds
``VideoPipeline.random`` (real shapes, random weights) and runs each case (resolution:frames:samples)
twice: the first run of a size also pays for cuDNN's algorithm search. For each stage it reports the
plan's estimate (``Placement.stage_bytes``: resident weights, visiting ones, activations) and the peak
allocated memory measured between the progress events that end the stage (two denoising steps: the
first window of a stage also holds the previous stage's modules until they leave, so it is left out
where there are more); "UNDER" marks a stage that took more than estimated. Activations do not depend on the block count, so ``--blocks`` (fewer DiT
blocks) measures a big model's activations on a smaller card; its weights are then smaller.
Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from turbovideo.benchmark import benchmark_device
from turbovideo.catalog import MODELS
from turbovideo.errors import InputError
from turbovideo.pipeline import GenerationRequest, ProgressEvent, VideoPipeline

sys.path.insert(0, str(Path(__file__).parent))
from bench import test_image  # noqa: E402

GIB = 2**30
DEFAULT_CASES = ("480p:81:1", "480p:81:4", "720p:81:1")


class StagePeaks:
    """Progress callback: the peak allocated memory between consecutive events, by stage.

    The first window of a stage also holds the modules of the stage before it until they leave the
    GPU, so a stage of several windows (DiT steps, decoded latent frames) is measured without it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.windows: dict[str, list[int]] = {}
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    def __call__(self, event: ProgressEvent) -> None:
        torch.cuda.synchronize(self.device)
        stage = {"encode": "text" if event.step == 1 else "image", "mux": "decode"}.get(
            event.stage, event.stage
        )
        self.windows.setdefault(stage, []).append(torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self, stage: str) -> int:
        windows = self.windows.get(stage, [0])
        return max(windows[1:] if len(windows) > 1 else windows)


def parse_case(text: str) -> str:
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise argparse.ArgumentTypeError(f"expected resolution:num_frames:num_samples, got {text!r}")
    return text


def measure(pipe: VideoPipeline, case: str, device: torch.device) -> list[dict]:
    """One row per stage; a single "refused" row (the worker's E_INPUT sentence) if the plan refuses it."""
    resolution, frames, samples = case.split(":")
    spec = pipe.spec
    request = GenerationRequest(
        prompt=f"memory {case}",
        task=spec.task,
        image=test_image(1280, 720) if spec.task == "i2v" else None,
        resolution=resolution,
        num_frames=int(frames),
        num_samples=int(samples),
        num_steps=2,  # every step takes the same memory; the second is measured alone
    )
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for attempt in ("first", "again"):
            peaks = StagePeaks(device)
            try:
                pipe.generate(request, Path(scratch) / attempt, peaks)
            except InputError as exc:
                return [{"case": case, "refused": str(exc)}]
            runs.append(peaks)
    estimates = dict(pipe.placement.stage_bytes)
    rows = []
    for stage, estimate in estimates.items():
        measured = "denoise" if stage.startswith("denoise") else stage
        first, again = (run.peak(measured) for run in runs)
        rows.append(
            {
                "case": case,
                "stage": stage,
                "estimate_gib": estimate / GIB,
                "first_gib": first / GIB,
                "again_gib": again / GIB,
                "headroom": (estimate - max(first, again)) / estimate,
                "resident": sorted(pipe.placement.resident),
                "swapped": sorted(pipe.placement.swapped),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'case':<14} {'stage':<18} {'estimate':>9} {'first':>9} {'again':>9} {'headroom':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "refused" in r:
            print(f"{r['case']:<14} refused: {r['refused']}")
            continue
        flag = "  UNDER" if r["headroom"] < 0 else ""
        print(
            f"{r['case']:<14} {r['stage']:<18} {r['estimate_gib']:>8.2f}G {r['first_gib']:>8.2f}G "
            f"{r['again_gib']:>8.2f}G {r['headroom']:>8.0%}{flag}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a catalog name")
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--quant", action="store_true", help="int8 W8A8 DiT linears")
    parser.add_argument("--blocks", type=int, default=None, help="keep N DiT blocks per expert")
    parser.add_argument(
        "--limit-gib",
        type=float,
        default=None,
        help="plan as if the GPU had only this much for the pipeline (e.g. 21 for a 24 GB card)",
    )
    parser.add_argument(
        "--case",
        action="append",
        type=parse_case,
        help=f"resolution:num_frames:num_samples, repeatable (default: {' '.join(DEFAULT_CASES)})",
    )
    args = parser.parse_args()
    if args.model not in MODELS:
        parser.error(f"--model must be one of {', '.join(MODELS)}")
    device = benchmark_device("bench_memory.py", "cuda", out=args.out)
    pipe = VideoPipeline.random(MODELS[args.model], device, quantized=args.quant, blocks=args.blocks)
    if args.limit_gib is not None:
        pipe.gpu_memory_limit = int(args.limit_gib * GIB)
    rows: list[dict] = []
    for case in args.case or DEFAULT_CASES:
        rows += measure(pipe, case, device)
    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": vars(args),
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(rows)
    print(f"wrote {args.out}")
    return 1 if any(r.get("headroom", 0) < 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
