"""One checkpoint file from the Hub into the cache's partial file: where it is, and the body transfer.

``locate`` asks the Hub for the file's size, ETag (its sha256 for LFS files) and download URL;
``fill_partial`` appends the missing bytes with a Range request, hashing them on the way and
confirming every few seconds that the file's lock is still ours. huggingface_hub's own
``hf_hub_download`` deletes its partial file on any failure, so an interrupted 28 GB download would
restart from zero; these use its lower-level metadata and ranged-GET helpers instead.

Failures are sorted by what fixes them (``CheckpointDownloadError``): ``retry`` ones are tried again in
this process (server errors, dropped or refused connections, damaged bytes); ``transient`` ones are
those a fresh worker may beat, so a start that still fails with one asks to be replaced.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from turbovideo.catalog import HubFile
from turbovideo.errors import one_line
from turbovideo.files import file_in_the_way
from turbovideo.worker.locking import VolumeLock

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

REVISION = "main"
PROGRESS_EVERY_S = 5.0
_FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


class LockLost(Exception):
    """Another worker broke our lock (it judged us dead) and now downloads the file itself."""


class CheckpointDownloadError(RuntimeError):
    """A checkpoint could not be made available; the message is one actionable sentence.

    ``transient``: the network or the server failed, so a later attempt (also a fresh worker's) may
    succeed unchanged. ``retry``: worth another try in this process (also bytes that arrived damaged,
    which a fresh worker would not fix if they keep arriving so); defaults to ``transient``.
    """

    def __init__(self, message: str, *, transient: bool = False, retry: bool | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry = transient if retry is None else retry


def hub_setting_problem(env: Mapping[str, str]) -> str | None:
    """One line naming a Hub variable that huggingface_hub would misread, else None.

    It reads the timeouts with ``int()`` when it is imported (any other value, even an empty one, is a
    traceback then) and takes HF_ENDPOINT as written (a stray space lands in the host name, whose
    failed lookup then reads as a network fault of the Hub).
    """
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        value = env.get(name)
        if value is not None and not _whole_seconds(value):
            return f"{name}={value!r} is not valid; set it to a whole number of seconds, 1 or more (e.g. 60), or unset it"
    endpoint = env.get("HF_ENDPOINT")
    if endpoint is None:
        return None
    try:
        parsed = urlparse(endpoint)
        parsed.port  # noqa: B018 (raises ValueError for a port that is no number)
    except ValueError:
        parsed = None
    if (
        parsed is None
        or endpoint != endpoint.strip()
        or parsed.scheme not in ("http", "https")
        or not parsed.hostname
    ):
        return (
            f"HF_ENDPOINT={endpoint!r} is not an http(s) URL of a host (no spaces, a numeric port if any); "
            "use e.g. https://huggingface.co, or unset it"
        )
    return None


def _whole_seconds(text: str) -> bool:
    """What huggingface_hub reads with ``int()`` and its HTTP client takes as a timeout (not 0 or less)."""
    try:
        return int(text) >= 1
    except ValueError:
        return False


def locate(
    f: HubFile, *, token: str | None, endpoint: str | None, retries: bool = True
) -> tuple[HfFileMetadata, str, dict[str, str]]:
    """Ask the Hub for the file's size, ETag and download URL: (metadata, url, request headers)."""
    # Imported here: huggingface_hub reads its environment (HF_ENDPOINT, HF_HUB_OFFLINE) at import.
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers

    name = f"{f.repo}/{f.filename}"
    url = hf_hub_url(f.repo, f.filename, revision=REVISION, endpoint=endpoint)
    host = urlparse(url).netloc
    try:
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=retries)
    except HfHubHTTPError as e:
        raise _hub_error(e, name) from e
    except Exception as e:  # network layer: DNS, refused, timeout, TLS
        raise CheckpointDownloadError(
            f"could not reach {host or repr(url)} to fetch {name} ({_first_line(e)}); check HF_ENDPOINT "
            "(a full http(s):// URL) and the network, or pre-seed the cache and set HF_HUB_OFFLINE=1",
            transient=not _is_a_setting(e),
        ) from e
    if meta.etag is None or meta.commit_hash is None:
        # A web page or a proxy answering 200 to every path: caching its bytes would poison the cache.
        missing = "ETag" if meta.etag is None else "X-Repo-Commit header"
        raise CheckpointDownloadError(
            f"{host} answered for {name} with no {missing}, as a Hugging Face Hub would not; is HF_ENDPOINT a Hub?"
        )
    headers = build_hf_headers(token=token)
    source = meta.location or url
    if urlparse(source).netloc != host:
        headers.pop("authorization", None)  # a signed CDN URL must not receive the Hub token
    return meta, source, headers


def _is_a_setting(e: BaseException) -> bool:
    """A host name that does not resolve, a certificate that does not verify, TLS spoken to a plain
    port, a proxy that refuses us (4xx): fixed by a setting, not by waiting (unlike refused connections,
    timeouts, resets and cut handshakes, as during an outage)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        if isinstance(seen, ssl.SSLError) and getattr(seen, "reason", None) == "WRONG_VERSION_NUMBER":
            return True
        if isinstance(seen, socket.gaierror) and seen.errno != socket.EAI_AGAIN:
            return True
        # HF_ENDPOINT without http(s)://, or huggingface_hub's own offline switch: nothing a new worker fixes.
        if type(seen).__name__ in ("UnsupportedProtocol", "InvalidURL", "OfflineModeIsEnabled"):
            return True
        # httpx's and httpcore's ProxyError carry the proxy's status line, e.g. "407 Proxy Authentication…".
        if type(seen).__name__ == "ProxyError" and str(seen).lstrip().startswith("4"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fill_partial(
    partial: Path,
    source: str,
    headers: dict[str, str],
    size: int | None,
    hash_it: bool,
    name: str,
    report: Callable[[str], None],
    lock: VolumeLock,
) -> tuple[int, str | None]:
    """Append the missing bytes to ``partial`` with a Range request; returns (its size, its sha256).
    Stops (``LockLost``) when another worker has taken the file's lock over."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    host = urlparse(source).netloc
    try:
        # Writes go to explicit offsets, not appended: if another worker takes the lock over and resumes
        # this file, a write of ours still in flight puts the same bytes (same ETag) where they belong.
        with os.fdopen(os.open(partial, os.O_RDWR | os.O_CREAT, 0o644), "r+b") as fh:
            have = fh.seek(0, os.SEEK_END)
            if size is not None and have > size:
                fh.truncate(0)
                have = fh.seek(0)
            check_free_space(partial.parent, (size or 0) - have)
            writer = _PartialWriter(fh, hash_it, size, name, report, lock)
            report(
                f"downloading {name} ({format_size(size)})"
                + (f", resuming at {format_size(have)}" if have else "")
            )
            try:
                http_get(
                    source, writer, resume_size=have, headers=headers, expected_size=size, tqdm_class=_NoBar
                )
            except HfHubHTTPError as e:
                raise _hub_error(e, name, link=source) from e
            except (OSError, LockLost):
                raise  # the file system, or the size check: both handled below
            except Exception as e:  # the connection kept failing after http_get's own retries
                raise CheckpointDownloadError(
                    f"download of {name} from {host} broke off ({_first_line(e)}); the partial file is kept "
                    "for the next attempt to resume",
                    transient=True,
                ) from e
            fh.flush()
            os.fsync(fh.fileno())
            return os.fstat(fh.fileno()).st_size, writer.hexdigest()
    except OSError as e:
        if e.errno is None:  # huggingface_hub's consistency check: the body length differs from the size
            if not lock.confirm():
                raise LockLost from e
            partial.unlink(missing_ok=True)
            raise CheckpointDownloadError(
                f"{name} from {host} arrived with the wrong size, not the {size} bytes the Hub announced; "
                "removed it",
                retry=True,
            ) from e
        raise filesystem_error(e, partial.parent) from e


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


class _PartialWriter:
    """The file object http_get writes to: appends to the partial file, hashing and reporting on the way.

    http_get may rewind (when a server ignores our Range header); the hash then restarts from what is
    left on disk so it always covers exactly the file's bytes.
    """

    def __init__(
        self, fh, hash_it: bool, total: int | None, name: str, report: Callable[[str], None], lock: VolumeLock
    ) -> None:
        self._lock = lock
        self._fh = fh
        self._hash_it = hash_it
        self._total = total
        self._name = name
        self._report = report
        self._rehash()
        self._last_report = time.monotonic()
        self._last_bytes = fh.tell()

    def _rehash(self) -> None:
        self._hash = hashlib.sha256() if self._hash_it else None
        if self._hash is not None:
            self._fh.flush()
            _hash_prefix(self._fh.fileno(), self._fh.tell(), self._hash)

    def write(self, data: bytes) -> int:
        now = time.monotonic()
        tick = now - self._last_report >= PROGRESS_EVERY_S
        if tick:
            self._confirm_lock()
        n = self._fh.write(data)
        if self._hash is not None:
            self._hash.update(data)
        if tick:
            done = self._fh.tell()
            rate = (done - self._last_bytes) / (now - self._last_report)
            share = f" ({100 * done / self._total:.0f}%)" if self._total else ""
            self._report(
                f"{self._name}: {format_size(done)} of {format_size(self._total)}{share}, {rate / 1e6:.0f} MB/s"
            )
            self._last_report, self._last_bytes = now, done
        return n

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._confirm_lock()  # http_get rewinds to restart: writes that follow must still be ours
        pos = self._fh.seek(offset, whence)
        self._rehash()
        return pos

    def truncate(self, size: int | None = None) -> int:
        self._confirm_lock()
        new = self._fh.truncate(size)
        self._rehash()
        return new

    def _confirm_lock(self) -> None:
        if not self._lock.confirm():
            raise LockLost  # the file is another worker's now: stop writing into its partial

    def hexdigest(self) -> str | None:
        return None if self._hash is None else self._hash.hexdigest()


class _NoBar:
    """Stands in for tqdm inside http_get: we report progress through the callback instead."""

    def __init__(self, **_: object) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _hash_prefix(fd: int, length: int, h) -> None:
    pos = 0
    while pos < length:
        block = os.pread(fd, min(16 << 20, length - pos), pos)
        if not block:
            break
        h.update(block)
        pos += len(block)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        _hash_prefix(fh.fileno(), os.fstat(fh.fileno()).st_size, h)
    return h.hexdigest()


# Where the cache is set: the worker's variable, or the download script's flag.
_CACHE_SETTING = "CACHE_DIR; --dest of download_checkpoints.py"


def check_free_space(directory: Path, needed: int, keep_free: int = 0) -> None:
    """``needed`` more bytes must fit in ``directory``, leaving ``keep_free`` (see ``disk_check_reserve``)."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise CheckpointDownloadError(
            f"not enough space in {directory}: need {format_size(needed)} more, {format_size(free)} free; "
            f"enlarge the volume or point the cache elsewhere ({_CACHE_SETTING})"
        )
    if needed + keep_free > free:
        raise CheckpointDownloadError(
            f"not enough space in {directory} on the container disk: need {format_size(needed)} more, "
            f"{format_size(free)} free, and RunPod's disk check stops a worker that leaves less than "
            f"{format_size(keep_free)} of it free; attach a network volume (the cache then goes there) or "
            "enlarge the container disk"
        )


def filesystem_error(e: OSError, directory: Path) -> CheckpointDownloadError:
    if e.errno in _FULL_DISK:
        return CheckpointDownloadError(
            f"the cache at {directory} is full ({e.strerror}); enlarge the volume or point the cache "
            f"elsewhere ({_CACHE_SETTING})"
        )
    if e.errno in _READ_ONLY:
        return CheckpointDownloadError(
            f"the cache at {directory} is not writable ({e.strerror}); point the cache at a writable directory "
            f"({_CACHE_SETTING}) or pre-seed it with scripts/download_checkpoints.py"
        )
    blocking = file_in_the_way((directory, *directory.parents))
    why = f"{blocking} is a file, not a folder" if blocking else str(e)
    return CheckpointDownloadError(f"cannot use the cache at {directory}: {why} ({_CACHE_SETTING})")


def _hub_error(e, name: str, link: str | None = None) -> CheckpointDownloadError:
    """``link``: the download URL the Hub gave, when the body transfer failed (the Hub had already let us in)."""
    status = e.response.status_code if getattr(e, "response", None) is not None else None
    if status in (401, 403) and link is not None:
        # The Hub granted the file moments ago: its signed link expired (a resume after a long pause)
        # or was refused. A new attempt asks the Hub for a fresh one.
        return CheckpointDownloadError(
            f"the download link of {name} at {urlparse(link).netloc} was refused (HTTP {status}); asking the "
            "Hub for a new one",
            transient=True,
        )
    if status in (401, 403):
        said = getattr(e, "server_message", None)
        return CheckpointDownloadError(
            f"access to {name} was refused (HTTP {status}{': ' + one_line(said, 200) if said else ''}); set HF_TOKEN "
            "(download_checkpoints.py: --token) to a token of an account that can read it (a gated repository: "
            "accept its terms on its Hub page)"
        )
    if status == 404:
        return CheckpointDownloadError(
            f"{name} does not exist on the Hub (HTTP 404); check HF_ENDPOINT, or pre-seed the cache"
        )
    transient = status is None or status >= 500 or status in (408, 429)
    return CheckpointDownloadError(f"the Hub answered HTTP {status} for {name}", transient=transient)


def format_size(n: int | None) -> str:
    if n is None:
        return "unknown size"
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"
