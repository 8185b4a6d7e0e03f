"""Keep Triton's and Inductor's compile caches on the cache volume so warm starts skip compiling.

Triton writes its cache without handling a full or read-only disk gracefully, so we only point it at
the volume after proving a real write succeeds there and enough space is left; otherwise the caches
go to local disk for this start. Directories the user already chose are kept when they take a write.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# A heuristic, not a measurement: a few hundred kernels take tens of MB, but a nearly full volume
# is about to fail the next checkpoint download too.
MIN_FREE_BYTES = 1 << 30
_CACHES = (("TRITON_CACHE_DIR", "triton"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"))


def local_compile_root() -> Path:
    return Path(tempfile.gettempdir()) / "turbovideo-compile"


def configure_compile_cache(cache_dir: Path, *, min_free_bytes: int = MIN_FREE_BYTES) -> Path | None:
    """Set TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR under ``cache_dir`` unless already set to a
    directory that takes a write.

    Falls back to a local directory (one log line) when ``cache_dir`` is not writable or nearly full.
    Never raises. Returns the Triton cache directory in effect, or None when neither place works
    (then Triton keeps its own default).
    """
    unset = []
    for var, sub in _CACHES:
        # Trimmed, as CACHE_DIR is: a blank endpoint field would cache in a folder named " " in the
        # working directory (not on the volume), a pasted trailing space in a second "triton " folder.
        chosen = os.environ.get(var, "").strip()
        problem = _probe(Path(chosen), 0) if chosen else None
        if problem is not None:
            logger.warning(
                "compile cache: %s=%s is %s; choosing another place for this start", var, chosen, problem
            )
        if chosen and problem is None:
            os.environ[var] = chosen
        else:
            os.environ.pop(var, None)
            unset.append((var, sub))
    if unset:
        root = _usable_root(Path(cache_dir), min_free_bytes)
        if root is not None:
            for var, sub in unset:
                os.environ[var] = str(root / sub)
    triton = os.environ.get("TRITON_CACHE_DIR")
    return Path(triton) if triton else None


def _usable_root(cache_dir: Path, min_free_bytes: int) -> Path | None:
    problem = _probe(cache_dir / "triton", min_free_bytes)
    if problem is None:
        return cache_dir
    fallback = local_compile_root()
    if _probe(fallback / "triton", 0) is None:
        logger.warning(
            "compile cache: %s is %s; compiling into %s for this start", cache_dir, problem, fallback
        )
        return fallback
    logger.warning(
        "compile cache: %s is %s and %s is unusable too; using Triton's default", cache_dir, problem, fallback
    )
    return None


def _probe(directory: Path, min_free_bytes: int) -> str | None:
    """Why ``directory`` cannot take the cache, or None when it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # An empty file still fits on a full volume or past a quota; a written, synced block does not.
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-") as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
        free = shutil.disk_usage(directory).free
    except OSError as e:
        return f"not writable ({e.strerror or e})"
    if free < min_free_bytes:
        return f"nearly full ({free >> 20} MiB free)"
    return None
