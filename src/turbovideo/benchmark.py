"""Timing and error helpers shared by the GPU benchmark scripts in scripts/."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from turbovideo.files import write_failure


def benchmark_device(
    script: str, requested: str | None = "cuda", *, cpu_smoke: bool = False, out: str | Path | None = None
) -> torch.device:
    """``requested`` as a device, or a one-line exit when it is not one or is CUDA and this machine has none.

    ``cpu_smoke``: the script also runs (small configurations) with ``--device cpu``, so say so.
    ``out``: the results file, whose folder is created and checked now, not after minutes of runs.
    """
    try:
        device = torch.device(requested or "cuda")
    except RuntimeError:
        device = None
    # torch.device also takes meta, mps, xla, ...: the benchmarks would fail on them minutes later.
    if device is None or device.type not in ("cuda", "cpu"):
        raise SystemExit(f"{script}: --device must be cuda, cuda:N or cpu, got {requested!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        hint = "; pass --device cpu with a tiny configuration for a smoke run" if cpu_smoke else ""
        raise SystemExit(f"{script} needs a CUDA GPU{hint}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(
            f"{script}: --device {requested} names no GPU; this machine has {torch.cuda.device_count()}"
        )
    if out is not None:
        check_out(script, out)
    return device


def check_out(script: str, out: str | Path) -> None:
    """Create ``out``'s folder and check the file takes a write, now rather than after minutes of runs."""
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a"):  # touch() passes a directory (it only sets its times)
            pass
    except OSError as e:
        raise SystemExit(f"{script}: cannot write --out {out}: {write_failure(Path(out), e)}") from None


def at_least_one(text: str) -> int:
    """An argparse type for counts of timed calls: a whole number of at least 1 (no median of none)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def parse_sizes(parser: argparse.ArgumentParser, flag: str, text: str, count: int) -> tuple[int, ...]:
    """``text`` such as ``21x60x104`` as ``count`` positive whole numbers, else a usage exit naming ``flag``."""
    parts = text.lower().split("x")
    if len(parts) != count or not all(p.isdigit() and int(p) > 0 for p in parts):
        parser.error(f"{flag}: expected {count} positive whole numbers joined by x, got {text!r}")
    return tuple(int(p) for p in parts)


def dit_latent(parser: argparse.ArgumentParser, text: str, config: object) -> tuple[int, ...]:
    """``--latent`` T x H x W for the DiT ``config``, whose patches must tile it, else a usage exit."""
    latent = parse_sizes(parser, "--latent", text, 3)
    if any(n % p for n, p in zip(latent, config.patch_size, strict=True)):
        patch = "x".join(map(str, config.patch_size))
        parser.error(f"--latent {text}: each side must be a multiple of {config.label}'s {patch} patch")
    return latent


def median_ms(
    fn: Callable[[], object], device: torch.device | str = "cuda", iters: int = 10, warmup: int = 2
) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` calls: CUDA events on a GPU, wall clock elsewhere."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


BACK_TO_BACK_CALLS = 10
# An upper bound on the GPU's clock (H100/H200 boost at 1.98 GHz): the spin lasts at least as asked.
_SPIN_CYCLES_PER_S = 2.0e9


def back_to_back_ms(fn: Callable[[], object], iters: int = 10, calls: int = BACK_TO_BACK_CALLS) -> float:
    """Per-call GPU milliseconds of ``calls`` calls run back to back (CUDA), as inside the DiT, where the
    CPU queues layers well ahead of the GPU. A call timed alone also waits on its launch (Python,
    Triton's launcher, descriptors), and calls merely queued together still do where enqueueing one
    takes longer than running it (1.3B's o projection and its quantizer, 0.22 ms of GPU time, timed
    0.31 ms that way on an H200). So a spin kernel holds the GPU while all of them are queued, for
    twice the time queueing them took."""
    queue = lambda: [fn() for _ in range(calls)]  # noqa: E731
    fn()  # compiles, autotunes, allocates
    torch.cuda.synchronize()
    begin = time.perf_counter()
    queue()
    queued_s = time.perf_counter() - begin
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(2 * queued_s * _SPIN_CYCLES_PER_S))
        start.record()
        queue()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / calls


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b||, computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def peak_gib(device: torch.device | str) -> float | None:
    """Peak allocated GPU memory since the last reset, in GiB (None off the GPU)."""
    # The device's own counter: without it, the current device's (cuda:0 for --device cuda:1).
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None
