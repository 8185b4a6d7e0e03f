"""Compile the Triton kernels the served models use into the cache volume, so workers start warm.

    python scripts/warmup_kernels.py                       # the MODELS the worker serves, every aspect ratio
    python scripts/warmup_kernels.py --model TurboWan2.1-T2V-14B-720P --aspect-ratio 16:9 --out warm.json

Triton compiles a kernel the first time a process meets a new shape class and stores the binary in
TRITON_CACHE_DIR, which the worker points at <CACHE_DIR>/triton on the network volume
(turbovideo.worker.compile_cache). Running this once per volume, on the GPU type the endpoint uses,
spares every new worker that compile on its first request. It runs a one-block copy of each
model's DiT with random weights at the request's frame size: the same kernels at the same shapes
as a real request, without the checkpoints, and a random-weight VAE decodes two latent frames of
each size (its norm, bias and upsampling kernels). The settings follow the worker's environment (MODELS,
CHECKPOINT_VARIANT, CACHE_DIR); the flags override them. Without CUDA there is nothing to compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import sys
import time
from pathlib import Path

import torch

from turbovideo.benchmark import check_out
from turbovideo.catalog import DEFAULT_FRAMES, MAX_FRAMES, MIN_FRAMES, ModelSpec, resolve_models
from turbovideo.models.dit import WanDiT
from turbovideo.models.dit_configs import DIT_CONFIGS, DiTConfig
from turbovideo.models.random_init import materialize
from turbovideo.models.tokenizer import MAX_LENGTH as TEXT_TOKENS
from turbovideo.models.vae import WanVAE, build_vae, latent_shape
from turbovideo.pipeline.resolution import ASPECT_RATIOS, SIZES, is_valid_frame_count, table_size
from turbovideo.worker.compile_cache import configure_compile_cache, local_compile_root
from turbovideo.worker.config import ConfigError, load_config, use_quantized


def warm_dit(
    config: DiTConfig,
    latent: tuple[int, int, int],
    *,
    quantized: bool,
    attention: str,
    device: torch.device,
) -> tuple[str, float, float]:
    """Run a one-block copy of ``config`` twice at ``latent``; returns (backend, first s, second s).

    The first call compiles whatever the cache lacks; the second runs compiled code, so the
    difference is what compiling cost.
    """
    with torch.device("meta"):
        model = WanDiT(dataclasses.replace(config, num_layers=1), torch.bfloat16, quantized)
    materialize(model, device, seed=0)
    model.eval().requires_grad_(False)
    model.set_attention(attention)
    x = torch.randn(1, config.out_dim, *latent, device=device)
    y = torch.randn(1, config.cond_dim, *latent, device=device) if config.task == "i2v" else None
    t = torch.full((1,), 0.9, device=device)
    context = torch.randn(1, TEXT_TOKENS, config.text_dim, device=device)
    seconds = []
    with torch.inference_mode():
        for _ in range(2):
            started = time.perf_counter()
            model(x, t, context, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
    return model.attention_backend, seconds[0], seconds[1]


def warm_vae(vae: WanVAE, latent: tuple[int, int, int], device: torch.device) -> tuple[float, float]:
    """Decode two latent frames of ``latent``'s size twice (the VAE's Triton kernels; cuDNN's conv
    search is per process and not cached); returns (first s, second s)."""
    x = torch.randn(1, vae.config.z_dim, 2, *latent[1:], device=device)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        vae.decode(x)
        torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1]


def import_kernels() -> list[str]:
    """Import every module of turbovideo.kernels (a broken install fails here, not in a request)."""
    import turbovideo.kernels as package

    names = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    for name in names:
        importlib.import_module(name)
    return names


def count_files(directory: Path | None) -> int:
    if directory is None or not directory.is_dir():
        return 0
    return sum(1 for p in directory.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="catalog name(s) or alias, comma-separated (default: MODELS)")
    parser.add_argument("--resolution", choices=tuple(SIZES), help="default: each model's own")
    parser.add_argument(
        "--aspect-ratio", action="append", choices=ASPECT_RATIOS, help="repeatable (default: all five)"
    )
    parser.add_argument("--num-frames", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--variant", choices=("auto", "bf16", "quant"), help="default: CHECKPOINT_VARIANT")
    parser.add_argument(
        "--attention", action="append", choices=("auto", "sla", "sagesla"), help="repeatable (default: auto)"
    )
    parser.add_argument("--cache-dir", type=Path, help="default: CACHE_DIR, as the worker decides it")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not is_valid_frame_count(args.num_frames, MIN_FRAMES, MAX_FRAMES):
        parser.error(
            f"--num-frames must be 4k+1 between {MIN_FRAMES} and {MAX_FRAMES}, got {args.num_frames}"
        )

    try:
        specs = resolve_models(args.model, "--model") if args.model else None
        # --model stands in for MODELS, which a RunPod pod (RUNPOD_POD_ID set) would otherwise require.
        config = load_config({**os.environ, "MODELS": args.model} if args.model else None)
        specs = specs or list(config.models)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        check_out("warmup_kernels.py", args.out)
    # Before anything imports Triton, so that it caches where the worker will look.
    cache_dir = args.cache_dir or config.cache_dir
    triton_dir = configure_compile_cache(cache_dir)
    if triton_dir is None or triton_dir.is_relative_to(local_compile_root()):
        # The worker falls back to this machine's disk for a start; a warm-up there is lost with it.
        print(
            f"error: the compile cache cannot go under {cache_dir} (said above); nothing would stay warm",
            file=sys.stderr,
        )
        return 1
    modules = import_kernels()
    print(f"imported {len(modules)} kernel modules; Triton cache: {triton_dir}")
    if not torch.cuda.is_available():
        print("no CUDA device: Triton kernels compile for a GPU, so there is nothing to warm here")
        return 0

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_properties(device)
    quantized = use_quantized(args.variant or config.variant, gpu.total_memory)
    files_before = count_files(triton_dir)
    rows = run_all(
        specs,
        resolution=args.resolution,
        aspect_ratios=args.aspect_ratio or list(ASPECT_RATIOS),
        num_frames=args.num_frames,
        attentions=args.attention or ["auto"],
        quantized=quantized,
        device=device,
    )
    compile_s = sum(r["compile_s"] for r in rows)
    print(
        f"compiling took {compile_s:.1f} s in all on {gpu.name}; "
        f"{count_files(triton_dir) - files_before} new files in {triton_dir}"
    )
    if args.out:
        report = {"gpu": gpu.name, "triton_cache": str(triton_dir), "compile_s": compile_s, "runs": rows}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run_all(
    specs: list[ModelSpec],
    *,
    resolution: str | None,
    aspect_ratios: list[str],
    num_frames: int,
    attentions: list[str],
    quantized: bool,
    device: torch.device,
) -> list[dict]:
    """Warm every (model, aspect ratio, attention), then the VAE at every frame size; one table row each."""
    variant = "quant" if quantized else "bf16"
    print(
        f"{'model':28} {'variant':7} {'size':9} {'latent':12} {'attention':13} {'first s':>8} {'warm s':>8}"
    )
    rows = []
    sizes: dict[tuple[int, int], tuple[int, int, int]] = {}
    for spec in specs:
        config = DIT_CONFIGS[spec.dit_config]
        for aspect in aspect_ratios:
            size = resolution or spec.default_resolution
            width, height = table_size(size, aspect)
            latent = latent_shape(num_frames, width, height)[1:]
            for attention in attentions:
                backend, first, warm = warm_dit(
                    config, latent, quantized=quantized, attention=attention, device=device
                )
                torch.cuda.empty_cache()
                print(
                    f"{spec.name:28} {variant:7} {f'{width}x{height}':9} {'x'.join(map(str, latent)):12} "
                    f"{backend:13} {first:8.2f} {warm:8.3f}"
                )
                rows.append(
                    {
                        "model": spec.name,
                        "part": "dit",
                        "variant": variant,
                        "width": width,
                        "height": height,
                        "num_frames": num_frames,
                        "attention": backend,
                        "first_s": first,
                        "warm_s": warm,
                        "compile_s": max(first - warm, 0.0),
                    }
                )
            sizes[(width, height)] = latent
    # The VAE is shared by every model: once per frame size.
    vae = build_vae(device=device)
    for (width, height), latent in sizes.items():
        first, warm = warm_vae(vae, latent, device)
        frames = "2x" + "x".join(map(str, latent[1:]))
        print(
            f"{'wan2.1-vae':28} {'bf16':7} {f'{width}x{height}':9} {frames:12} {'':13} {first:8.2f} {warm:8.3f}"
        )
        rows.append(
            {
                "model": "wan2.1-vae",
                "part": "vae",
                "width": width,
                "height": height,
                "first_s": first,
                "warm_s": warm,
                "compile_s": max(first - warm, 0.0),
            }
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
