"""Pre-seed a network volume or an image with checkpoints, through the worker's own cache code.

    python scripts/download_checkpoints.py --model TurboWan2.1-T2V-1.3B-480P --variant both --dest /runpod-volume/turbovideo

HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE (then it only checks the cache) are honoured as by the
worker. Exits 1 with one line on failure.
"""

from __future__ import annotations

import argparse
import os
import sys

from turbovideo.catalog import resolve_models
from turbovideo.worker.checkpoints import (
    CheckpointDownloadError,
    check_room,
    default_cache_dir,
    ensure_checkpoints,
)
from turbovideo.worker.hub_transfer import hub_setting_problem

VARIANTS = {"bf16": (False,), "quant": (True,), "both": (False, True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="catalog name(s) or alias, comma-separated")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="bf16")
    parser.add_argument("--dest", default="", help="cache directory (default: the worker's CACHE_DIR rule)")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN)")
    args = parser.parse_args(argv)
    if problem := hub_setting_problem(os.environ):  # as the worker refuses them at start
        print(f"error: {problem}", file=sys.stderr)
        return 1
    # Read as the worker reads CACHE_DIR (trimmed, ~ expanded): an empty --dest "$VAR" meant the current
    # directory, where no worker looks, and --dest=~/x a folder named "~".
    dest = default_cache_dir({"CACHE_DIR": args.dest} if args.dest.strip() else None)

    sizes: dict[str, int] = {}  # shared files count once in the total
    try:
        specs = resolve_models(args.model, "--model")
        wanted = [f for spec in specs for quantized in VARIANTS[args.variant] for f in spec.files(quantized)]
        check_room(wanted, dest, token=args.token)
        for spec in specs:
            for quantized in VARIANTS[args.variant]:
                model_dir = ensure_checkpoints(spec, quantized, dest, token=args.token, progress=print)
                if model_dir is None:
                    print(f"{spec.name}: seeded random weights, nothing to download")
                    break
                for f in spec.files(quantized):
                    name = f"{f.repo}/{f.filename}"
                    sizes[name] = (model_dir / f.filename).stat().st_size
                    print(f"  {sizes[name] / 1e9:10.3f} GB  {name}")
                print(f"{spec.name} ({'quant' if quantized else 'bf16'}) ready in {model_dir}")
    except (CheckpointDownloadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"total {sum(sizes.values()) / 1e9:.3f} GB in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
