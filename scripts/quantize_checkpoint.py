"""Convert an unquantized TurboDiffusion DiT file into the ``-quant`` (W8A8 int8) layout.

    python scripts/quantize_checkpoint.py TurboWan2.1-T2V-1.3B-480P.pth TurboWan2.1-T2V-1.3B-480P-quant.pth

The 10 linears of every block become ``int8_weight`` + ``scale`` (128x128 tiles, amax/128); proj_l
and everything outside the blocks are copied unchanged. The input is memory-mapped and converted
one tensor at a time. OUT ending in ``.safetensors`` is written as safetensors, anything else as .pth.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from turbovideo.files import replaced_when_written
from turbovideo.models.checkpoint import CheckpointError, read_state_dict
from turbovideo.models.dit_checkpoint import quantize_dit_state


class WriteError(Exception):
    """The output file could not be written (the message is the reason)."""


def quantize_file(source: Path, target: Path) -> int:
    """Write the ``-quant`` layout of ``source`` to ``target``; returns the number of tensors written."""
    if target.exists() and source.exists() and os.path.samefile(source, target):
        # The input is memory-mapped: writing over it would destroy it mid-read (SIGBUS).
        raise CheckpointError(f"{target} is the input file itself; name a different output file")
    state = read_state_dict(source)
    try:
        quantized = dict(quantize_dit_state(state))
    except CheckpointError as exc:
        raise CheckpointError(f"{source.name}: {exc}") from None
    # Renamed over the target only once complete: a full disk or a kill mid-write must neither leave a
    # cut file under the final name nor destroy an earlier output of that name.
    try:
        with replaced_when_written(target) as partial:
            if target.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in quantized.items()}, str(partial))
            else:
                # Through a Python file object: a failed write then surfaces as an OSError that names it.
                with open(partial, "wb") as fh:
                    torch.save(quantized, fh)
    # torch.save reports an unwritable target as a RuntimeError, safetensors as its own SafetensorError.
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise WriteError(_write_failure(exc)) from exc
    return len(quantized)


def _write_failure(exc: BaseException) -> str:
    """Why a write failed, in one line: the OSError underneath (torch.save's own message for a full
    disk is an internal assertion, "unexpected pos ...") or else the first line of the message."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(exc).strip().partition("\n")[0] or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="unquantized DiT file (.pth or .safetensors)")
    parser.add_argument("target", type=Path, help="output file (.pth, or .safetensors)")
    args = parser.parse_args(argv)
    try:
        count = quantize_file(args.source, args.target)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WriteError as exc:
        print(f"error: cannot write {args.target}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.target} ({count} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
