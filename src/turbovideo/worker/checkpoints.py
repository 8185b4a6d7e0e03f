"""Checkpoint files on a (shared) cache directory: download once, verify, reuse offline.

Layout under the cache directory (the dot-files sit next to the file they describe)::

    <repo>/<filename>             the verified file, e.g. Wan-AI/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth
    .<name>.complete              written last, after size (and sha256) verification
    .<name>.lock                  held by the one worker downloading it (see locking.py)
    .<name>.<etag[:16]>.partial   an interrupted download, continued with an HTTP Range request
    models/<model>-<bf16|quant>/  relative symlinks: every file of one model in one directory

Several workers may start at once on one network volume: each file is downloaded by whichever
worker takes its lock first while the others take the remaining files or wait. A completion marker
means "no network needed", so a warm volume costs no Hub requests and works with HF_HUB_OFFLINE=1.

The transfer of one file (resumable, hashed, guarded by its lock) is hub_transfer.py's; here is
which files to fetch, who fetches each, how a finished one is recorded and checked later. Failures
are ``CheckpointDownloadError``s, sorted by what fixes them (see hub_transfer.py): ``retry`` ones are
tried again in this process, ``transient`` ones ask for a fresh worker when a start still fails. A
worker whose lock another worker took over (it judged us dead) stops touching the file and waits again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from turbovideo.catalog import HubFile, ModelSpec
from turbovideo.files import replaced_when_written
from turbovideo.worker.hub_transfer import (
    REVISION,
    CheckpointDownloadError,
    LockLost,
    check_free_space,
    filesystem_error,
    fill_partial,
    format_size,
    locate,
    sha256_of,
)
from turbovideo.worker.locking import STALE_AFTER_S, VolumeLock, read_owner

logger = logging.getLogger(__name__)

# Serverless workers mount the network volume here; what must outlive the worker goes onto it.
RUNPOD_VOLUME = Path("/runpod-volume")
POLL_S = 1.0  # how often a waiting worker looks at someone else's download
WAIT_REPORT_EVERY_S = 20.0
# Pauses before the second and third try of a download that failed on the network or the server's
# side (5xx, a broken connection, damaged bytes); huggingface_hub retries its metadata requests
# itself, but one failed body GET ends its download.
RETRY_DELAYS_S = (5.0, 30.0)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``CACHE_DIR`` (trimmed: a pasted trailing space would make a second, empty cache), else the
    network volume when one is mounted, else the user's cache. ``env`` defaults to the process's."""
    value = (os.environ if env is None else env).get("CACHE_DIR", "").strip()
    if value:
        return Path(value).expanduser()
    if RUNPOD_VOLUME.is_dir():
        return RUNPOD_VOLUME / "turbovideo"
    return Path.home() / ".cache" / "turbovideo"


def ensure_checkpoints(
    spec: ModelSpec,
    quantized: bool,
    cache_dir: Path,
    *,
    token: str | None = None,
    offline: bool | None = None,
    endpoint: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path | None:
    """Make every file of ``spec`` available and return one directory holding them by Hub filename.

    Returns None for random-weight specs. ``offline=None`` follows ``HF_HUB_OFFLINE``; offline, only
    files with a completion marker count. ``token=None`` lets huggingface_hub use ``HF_TOKEN``.
    """
    if spec.repo is None:
        return None
    report = progress or logger.info
    offline = _offline(offline)
    cache_dir = Path(cache_dir)
    variant = "quant" if quantized else "bf16"
    files = spec.files(quantized)
    pending = [f for f in files if not _is_complete(cache_dir, f)]
    if pending and offline:
        missing = pending[0]
        seed = f"`python scripts/download_checkpoints.py --model {spec.name} --variant {variant} --dest {cache_dir}`"
        if _target(cache_dir, missing).is_file():  # copied in without its hidden marker (cp dir/*, a sync)
            raise CheckpointDownloadError(
                f"{missing.repo}/{missing.filename} is in the cache at {cache_dir} but has no completion marker "
                f"(.{missing.filename.rsplit('/', 1)[-1]}.complete), so it is not trusted offline ({offline_setting()}); "
                f"run {seed} once online: it verifies files in place without downloading them again"
            )
        raise CheckpointDownloadError(
            f"{missing.repo}/{missing.filename} is not in the cache at {cache_dir} and offline mode ({offline_setting()}) "
            f"forbids downloading it; pre-seed it with {seed}"
        )
    if pending:
        _fetch_all(pending, cache_dir, token=token, endpoint=endpoint, report=report)
    return _link_model_dir(cache_dir, f"{spec.name}-{variant}", files)


def verify_cached(cache_dir: Path, path: Path, *, discard: bool) -> bool | None:
    """Whether ``path``, a file of the cache, still has the sha256 it was verified with at download;
    None when that cannot be told (not in the cache, no sha256 on record, changed meanwhile).

    ``discard``: a damaged file is removed with its marker, so the next start downloads it again.
    """
    try:
        path = _cached_file(Path(cache_dir), Path(path))
        marker = _sidecar(path, "complete")
        text = marker.read_text()
        record = json.loads(text)
        if not record.get("sha256_verified"):
            return None
        inode = path.stat().st_ino
        if sha256_of(path) == record.get("etag"):
            return True
        # Another worker may have replaced the file while we hashed: only remove what we hashed.
        if path.stat().st_ino != inode or marker.read_text() != text:
            return None
        if discard:
            marker.unlink()  # first: a file without its marker counts as missing, never as complete
            path.unlink(missing_ok=True)
    except (ValueError, OSError, AttributeError):
        return None
    return False


def _cached_file(cache_dir: Path, path: Path) -> Path:
    """The cache's own copy of ``path``: resolved through a symbolic link, or for a hard link (models/
    folders on filesystems without symlinks) the file in <repo>/ that shares its inode."""
    path = path.resolve()
    if not _sidecar(path, "complete").exists():
        with contextlib.suppress(OSError):
            for candidate in cache_dir.resolve().glob(f"*/*/{path.name}"):
                # Cache copies carry markers; other models' folders hold more links to the same file.
                if _sidecar(candidate, "complete").exists() and os.path.samefile(candidate, path):
                    return candidate
    path.relative_to(cache_dir.resolve())  # ValueError outside the cache
    return path


def _partial_bytes(target: Path) -> int:
    """Bytes the partial files of ``target`` hold (another worker may remove one as we look)."""
    total = 0
    for partial in target.parent.glob(f".{target.name}.*.partial"):
        with contextlib.suppress(FileNotFoundError):
            total += partial.stat().st_size
    return total


def offline_setting(env: Mapping[str, str] | None = None) -> str:
    """The variable that decides offline mode (in ``env``, default the process environment):
    ``HF_HUB_OFFLINE``, or ``TRANSFORMERS_OFFLINE`` when that one is unset or empty, as huggingface_hub
    itself reads them."""
    env = os.environ if env is None else env
    return (
        "TRANSFORMERS_OFFLINE"
        if not env.get("HF_HUB_OFFLINE") and env.get("TRANSFORMERS_OFFLINE")
        else "HF_HUB_OFFLINE"
    )


def hub_offline(env: Mapping[str, str] | None = None) -> bool:
    """Whether offline mode (``offline_setting``) forbids downloads."""
    env = os.environ if env is None else env
    return env.get(offline_setting(env), "").strip().lower() in {"1", "true", "yes", "on"}


def _offline(offline: bool | None) -> bool:
    return hub_offline() if offline is None else offline


def _target(cache_dir: Path, f: HubFile) -> Path:
    return cache_dir / f.repo / f.filename


def _sidecar(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{suffix}")


def _is_complete(cache_dir: Path, f: HubFile) -> bool:
    target = _target(cache_dir, f)
    try:
        marker = json.loads(_sidecar(target, "complete").read_text())
        return target.stat().st_size == marker["size"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_room(
    files: Iterable[HubFile],
    cache_dir: Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    offline: bool | None = None,
    keep_free: int = 0,
) -> None:
    """Refuse up front when the volume cannot take every file still missing (less what partials
    already hold), leaving ``keep_free`` bytes (``disk_check_reserve``): file by file
    (``ensure_checkpoints`` per model), a too-small volume would be found out only after the first
    downloads. Call it with every file a start or a script will fetch.

    Advisory: when the Hub does not answer at once, the downloads themselves (with their retries) decide.
    Offline (``None`` follows ``HF_HUB_OFFLINE``) nothing is downloaded, so nothing is checked.
    """
    if _offline(offline):
        return
    needed = 0
    for f in dict.fromkeys(files):  # models share files
        if _is_complete(cache_dir, f):
            continue
        try:
            size = locate(f, token=token, endpoint=endpoint, retries=False)[0].size or 0
        except CheckpointDownloadError as e:
            logger.warning("free space not checked up front (%s); each download checks its own file", e)
            return
        target = _target(cache_dir, f)
        if target.is_file() and target.stat().st_size == size:
            continue  # in place without its marker: adopted after a hash check, no space needed
        have = _partial_bytes(target)
        needed += max(0, size - have)
    if needed:
        _make_dirs(cache_dir)
        check_free_space(cache_dir, needed, keep_free)


def disk_check_reserve(cache_dir: Path, percent: float, root: Path = Path("/")) -> int:
    """Bytes a download into ``cache_dir`` must leave free for RunPod's disk fitness check, which stops
    (and restarts) a worker once ``root`` has less than ``percent`` % of its size free. It runs after the
    start, so a start that filled the container disk that far would download, load, and be killed, on
    every restart, without a job ever hearing why. 0 when the cache is on another file system (a
    network volume)."""
    if percent <= 0:
        return 0
    existing = next((p for p in (cache_dir, *cache_dir.parents) if p.exists()), root)
    try:
        if existing.stat().st_dev != root.stat().st_dev:
            return 0
        return int(shutil.disk_usage(root).total * percent / 100)
    except OSError:
        return 0


def _fetch_all(
    pending: list[HubFile],
    cache_dir: Path,
    *,
    token: str | None,
    endpoint: str | None,
    report: Callable[[str], None],
) -> None:
    """Download what nobody else is downloading; wait for the rest. Returns when all are complete."""
    locks: dict[HubFile, VolumeLock] = {}
    last_wait_report = 0.0
    while pending:
        progressed = False
        for f in list(pending):
            target = _target(cache_dir, f)
            lock = locks.get(f)
            if lock is None:
                _make_dirs(target.parent)
                lock = locks[f] = VolumeLock(_sidecar(target, "lock"))
            if not _is_complete(cache_dir, f):
                try:
                    acquired = lock.try_acquire()
                except OSError as e:
                    raise filesystem_error(e, target.parent) from e
                if not acquired:
                    continue
                try:
                    # Someone may have finished it between our look and our lock.
                    if not _is_complete(cache_dir, f):
                        download = functools.partial(
                            _download, f, target, lock, token=token, endpoint=endpoint, report=report
                        )
                        _with_retries(download, lock, report)
                except LockLost:
                    report(f"another worker took over the download of {f.repo}/{f.filename}; waiting for it")
                    continue
                except OSError as e:  # hashing a file in place, removing a stale partial, the final rename
                    raise filesystem_error(e, target.parent) from e
                finally:
                    lock.release()
            pending.remove(f)
            progressed = True
        if pending and not progressed:
            if time.monotonic() - last_wait_report > WAIT_REPORT_EVERY_S:
                last_wait_report = time.monotonic()
                report(_describe_wait(cache_dir, pending[0]))
            time.sleep(POLL_S)


def _describe_wait(cache_dir: Path, f: HubFile) -> str:
    target = _target(cache_dir, f)
    owner = read_owner(_sidecar(target, "lock")) or {}
    so_far = _partial_bytes(target)
    who = f"{owner.get('host', 'another worker')} (pid {owner.get('pid', '?')})"
    return (
        f"waiting for {who} to download {f.repo}/{f.filename} ({format_size(so_far)} so far; "
        f"taken over if that worker is gone for {STALE_AFTER_S:.0f} s)"
    )


def _with_retries(download: Callable[[], None], lock: VolumeLock, report: Callable[[str], None]) -> None:
    """``download()``, tried again after failures worth it (a partial file is resumed, not restarted)
    for as long as we hold its lock."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return download()
        except CheckpointDownloadError as e:
            if not e.retry or delay is None:
                raise
            report(f"{e}; trying again in {delay:.0f} s")
            time.sleep(delay)
            if not lock.confirm():
                raise LockLost from e


def _download(
    f: HubFile,
    target: Path,
    lock: VolumeLock,
    *,
    token: str | None,
    endpoint: str | None,
    report: Callable[[str], None],
) -> None:
    """Fetch one file into its partial, verify it, rename it into place, then write its marker."""
    name = f"{f.repo}/{f.filename}"
    meta, source, headers = locate(f, token=token, endpoint=endpoint)
    size = meta.size
    sha256 = meta.etag if _SHA256.fullmatch(meta.etag) else None

    # A file put in place by hand (or renamed just before a crash) is adopted once it verifies.
    if target.exists() and target.stat().st_size == size and (sha256 is None or sha256_of(target) == sha256):
        _write_marker(target, f, meta.commit_hash, meta.etag, size, sha256)
        report(f"verified {name} already in place ({format_size(size)})")
        return

    partial = _sidecar(target, f"{meta.etag[:16]}.partial")
    for stale in target.parent.glob(f".{target.name}.*.partial"):
        if stale != partial:  # left from an older revision of the file
            stale.unlink(missing_ok=True)
    started = time.monotonic()
    # From here the partial file may become another worker's if it takes the lock over: whatever
    # happened, we touch the partial again only after confirming the lock is still ours.
    try:
        got, digest = fill_partial(partial, source, headers, size, sha256 is not None, name, report, lock)
    except CheckpointDownloadError:
        if not lock.confirm():
            raise LockLost from None
        raise
    if not lock.confirm():
        raise LockLost
    if (size is not None and got != size) or digest != sha256:
        partial.unlink(missing_ok=True)
        found = f"{got} bytes" if size is not None and got != size else f"sha256 {digest}"
        raise CheckpointDownloadError(
            f"{name} arrived with {found}, not what the Hub announced ({size} bytes, sha256 {sha256}); "
            "removed it",
            retry=True,
        )
    os.replace(partial, target)
    _fsync_dir(target.parent)
    _write_marker(target, f, meta.commit_hash, meta.etag, got, sha256)
    report(f"fetched {name} ({format_size(got)}) in {time.monotonic() - started:.1f} s")


def _write_marker(
    target: Path, f: HubFile, commit: str | None, etag: str, size: int, sha256: str | None
) -> None:
    record = {
        "repo": f.repo,
        "filename": f.filename,
        "revision": REVISION,
        "commit": commit,
        "etag": etag,
        "size": size,
        "sha256_verified": sha256 is not None,
        "fetched_at": time.time(),
    }
    _atomic_write(_sidecar(target, "complete"), json.dumps(record, indent=1).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        with replaced_when_written(path) as partial:
            partial.write_bytes(data)
    except OSError as e:
        raise filesystem_error(e, path.parent) from e
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable on local disks; some network filesystems refuse it, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_dirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise filesystem_error(e, path) from e


def _link_model_dir(cache_dir: Path, name: str, files: tuple[HubFile, ...]) -> Path:
    """One directory per model and variant whose entries are relative links into the repo folders.

    Relative links keep working when the volume is mounted elsewhere (/runpod-volume vs /workspace).
    """
    model_dir = cache_dir / "models" / name
    try:
        for f in files:
            link = model_dir / f.filename
            link.parent.mkdir(parents=True, exist_ok=True)
            target = _target(cache_dir, f)
            source = os.path.relpath(target, link.parent)
            if link.is_symlink():
                if os.readlink(link) == source:
                    continue
            elif link.exists() and os.path.samefile(link, target):
                continue  # the hard link a filesystem without symlinks got (maybe read-only by now)
            # Unique per writer: workers in containers are all pid 1 and may link the same folder at once.
            tmp = link.with_name(f".{link.name}.{secrets.token_hex(8)}.link")
            try:
                tmp.symlink_to(source)
            except OSError:  # a filesystem without symlinks: a hard link reads the same
                os.link(target, tmp)
            os.replace(tmp, link)
    except OSError as e:
        raise filesystem_error(e, model_dir) from e
    return model_dir
