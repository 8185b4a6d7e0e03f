"""Reading checkpoint files and loading them into modules built on ``meta``.

Every loader follows the same rules: build the module on ``meta`` (no memory), read the file
memory-mapped on the CPU, cast each tensor to the dtype the module declares (cast, never assert:
published files disagree on a few dtypes), then ``load_state_dict(strict=True, assign=True)`` so
peak host memory is about one copy of the file. Anything wrong becomes one ``CheckpointError``
sentence instead of a KeyError or a pickle traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]

# Prefixes that training exports put in front of the module keys.
_STRIP_PREFIXES = ("net.", "module.", "_orig_mod.")
_WRAPPER_INFIX = "_checkpoint_wrapped_module."
# torch.compile of single blocks (model.blocks[i] = torch.compile(block)) puts this inside the keys.
_COMPILED_INFIX = "._orig_mod."
# How weights_only loading names a pickled class or function it refuses (a well-formed file).
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
# Containers some exports nest the state dict in; the EMA weights first, as upstream publishes those.
_NESTING_KEYS = ("ema", "state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the module; the message is one sentence.

    ``path``: the file whose bytes could not be read, where that is the problem (a damaged download).
    """

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def read_state_dict(path: str | Path) -> StateDict:
    """Read a ``.pth``/``.pt``/``.safetensors`` file into a flat ``{key: tensor}`` dict on the CPU.

    ``.pth`` files are memory-mapped, so nothing is read until a tensor is used.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint file {path} is a folder; name the checkpoint file in it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes); delete it and download it again")
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    return _normalise_keys(_unnest(raw, path))


def _read_safetensors(path: Path) -> Mapping:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{_real(path)} ({path.stat().st_size} bytes) is truncated or is not a safetensors file: "
            f"{_first_line(exc)}",
            path=_real(path),
        ) from exc


def _read_torch(path: Path) -> Mapping:
    def load(mmap: bool) -> object:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as exc:
            # Files written with the legacy (non-zip) serialisation cannot be memory-mapped.
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            return load(mmap=False)
    except MemoryError:
        raise  # the host, not the file
    except Exception as exc:  # unpickling damaged bytes fails in many ways (IndexError, KeyError, ...)
        if "can't allocate memory" in str(exc):  # torch's own CPU allocator running out: the host again
            raise
        if python_object := _UNSAFE_GLOBAL.search(str(exc)):
            # Intact bytes (no path: downloading them again would not help), just more than weights.
            raise CheckpointError(
                f"{_real(path)} holds Python objects besides tensors ({python_object.group(1)}), which are not "
                "loaded from checkpoint files for safety; save its state dict alone with torch.save"
            ) from exc
        raise CheckpointError(
            f"{_real(path)} ({path.stat().st_size} bytes) is truncated or is not a PyTorch checkpoint: "
            f"{_first_line(exc)}",
            path=_real(path),
        ) from exc


def _real(path: Path) -> Path:
    """Where the bytes are: the worker's model folders hold links into the cache, so a damaged file is
    only fixed by deleting the file the link points to."""
    return path.resolve() if path.is_symlink() else path


def _unnest(raw: object, path: Path) -> Mapping:
    found = _tensor_dict_in(raw)
    if found is None:
        kind = type(raw).__name__
        raise CheckpointError(f"{_real(path)} does not hold a state dict of tensors (found a {kind})")
    return found


def _tensor_dict_in(raw: object) -> Mapping | None:
    """``raw`` if it is a state dict, else the first one in its nesting containers, depth first."""
    if not isinstance(raw, Mapping):
        return None
    if _is_tensor_dict(raw):
        return raw
    return next((d for k in _NESTING_KEYS if (d := _tensor_dict_in(raw.get(k))) is not None), None)


def _is_tensor_dict(raw: Mapping) -> bool:
    return len(raw) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items())


def _normalise_keys(raw: Mapping[str, torch.Tensor]) -> StateDict:
    state = {k.replace(_WRAPPER_INFIX, "").replace(_COMPILED_INFIX, "."): v for k, v in raw.items()}
    # Wrappers nest in either order (DDP around a compiled model gives "module._orig_mod.", compile
    # around DDP "_orig_mod.module.", DDP around a trainer "module.net."): strip until none is left.
    while prefix := next((p for p in _STRIP_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_into(
    module: nn.Module,
    state: StateDict,
    *,
    source: str,
    expected: str,
    describe: Callable[[StateDict], str] | None = None,
) -> nn.Module:
    """Assign ``state`` to ``module`` (built on ``meta``), casting each tensor to the module's dtype.

    ``source`` names the file and ``expected`` the model it should hold; ``describe`` tells the user
    what the file looks like instead (e.g. "a Wan2.1-14B -quant checkpoint") when keys do not fit.
    """
    target = module.state_dict(keep_vars=True)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong_shape = [
        f"{k} is {list(state[k].shape)} in the file but {list(target[k].shape)} in the model"
        for k in sorted(set(target) & set(state))
        if tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        looks_like = describe(state) if describe else None
        parts = [f"{source} does not fit {expected}"]
        if looks_like:
            parts[0] += f": it looks like {looks_like}"
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches ({_first(wrong_shape, 2)})")
        raise CheckpointError("; ".join(parts))
    cast = {
        k: v if v.dtype == target[k].dtype else _cast(k, v, target[k].dtype, source) for k, v in state.items()
    }
    module.load_state_dict(cast, strict=True, assign=True)
    return module


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype, source: str) -> torch.Tensor:
    """``value`` in the module's dtype. Between float precisions (bf16 <-> fp32) any file casts; otherwise
    (an int8 weight stored as floats or as int16) only values the module's dtype holds exactly, not a wrap
    or a cut."""
    cast = value.to(dtype)
    rounds = _kind(value.dtype) == _kind(dtype) == "float"
    if not rounds and not torch.equal(cast.to(value.dtype), value):
        raise CheckpointError(
            f"{source}: {key} holds {str(value.dtype).removeprefix('torch.')} values that the model's "
            f"{str(dtype).removeprefix('torch.')} cannot hold exactly; is this file of the right model and variant?"
        )
    return cast


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "integer"


def _first(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", +{len(items) - n} more" if len(items) > n else "")


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception message (torch's run on with advice after it)."""
    text = str(exc).strip().splitlines()
    return text[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
