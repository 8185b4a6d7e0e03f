"""Writing a file so that its name never points at a cut one; saying why a file cannot be written."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_when_written(path: Path) -> Iterator[Path]:
    """Yield a hidden path beside ``path`` to write to. Once the block ends, that file is synced and
    renamed over ``path``; if anything fails it is removed and ``path`` keeps what it held (a full disk
    or a kill mid-write leaves no cut file under the final name). The random part keeps writers apart
    that share a volume from containers, where every worker is pid 1."""
    partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
    try:
        yield partial
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, path)
    finally:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            partial.unlink(missing_ok=True)


def write_failure(path: Path, error: OSError) -> str:
    """Why ``path`` could not be written, in words: a file where one of its folders must be is named
    (the OS says "File exists" or "Not a directory"), anything else as the OS says it."""
    blocking = file_in_the_way(path.parents)
    return f"{blocking} is a file, not a folder" if blocking else error.strerror or str(error)


def file_in_the_way(folders: Iterable[Path]) -> Path | None:
    """The first of ``folders`` that exists as something other than a folder (unreadable ones skipped)."""
    for path in folders:
        with contextlib.suppress(OSError):
            if path.exists() and not path.is_dir():
                return path
    return None
