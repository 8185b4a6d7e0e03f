"""An exclusive lock that works between workers sharing a network volume.

``flock`` is unreliable on network filesystems (it can silently succeed for every caller), so the
lock is a plain file created with ``O_CREAT | O_EXCL``: exactly one creator wins on any POSIX-ish
filesystem. The file holds its owner (host, pid namespace, pid, a random token) and its mtime is
the owner's heartbeat, refreshed by a thread. A lock is stale when its owner is a dead process of
this very machine, or when its heartbeat stopped for ``stale_after`` seconds. A stale lock is broken
by renaming it to a unique name (only one breaker can win the rename), never by delete-then-create.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STALE_AFTER_S = 120.0
CONFIRM_READS = 3
# Tokens of the locks this process holds now: a lock file naming this process with another token is
# one a failed release left behind.
_HELD_TOKENS: set[str] = set()


def _machine() -> dict[str, str]:
    """Who we are, precisely enough to tell whether a pid in a lock file is one of our processes."""
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_namespace = ""
    host = os.environ.get("RUNPOD_POD_ID") or socket.gethostname()
    return {"host": host, "pid_namespace": pid_namespace}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written: on a nearly full disk one call may write only a part,
    and the next one raises the reason (ENOSPC, EDQUOT, EFBIG)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _remove_if_still(path: Path, fd: int) -> None:
    """Remove ``path`` if it is still the file open as ``fd``: a write that hung long enough may have
    seen our nameless file broken as stale and replaced by another worker's lock."""
    with contextlib.suppress(OSError):
        ours, now = os.fstat(fd), path.stat()
        if (ours.st_dev, ours.st_ino) == (now.st_dev, now.st_ino):
            path.unlink()


def read_owner(path: Path) -> dict | None:
    """The owner record of a lock file, or None when it is gone or not yet written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class VolumeLock:
    """One lock file. ``try_acquire`` never blocks; the caller decides how to wait."""

    def __init__(self, path: Path, *, stale_after: float | None = None) -> None:
        self.path = path
        self.stale_after = STALE_AFTER_S if stale_after is None else stale_after
        self._token: str | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        # Heartbeat observed while waiting: (token, mtime_ns) and when we first saw it unchanged.
        # Comparing against our own monotonic clock makes staleness immune to clock skew between hosts.
        self._observed: tuple[tuple[str | None, int], float] | None = None

    @property
    def held(self) -> bool:
        """True while we own the lock and nobody has broken it."""
        return self._token is not None and not self._lost.is_set()

    def try_acquire(self) -> bool:
        if self._token is not None:
            raise RuntimeError(f"{self.path} is already held by this process")
        for _ in range(2):  # second try only right after breaking a stale lock
            token = secrets.token_hex(8)
            _HELD_TOKENS.add(token)  # before the record exists: this process never takes it for an orphan
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                _HELD_TOKENS.discard(token)
                if self._break_if_stale():
                    continue
                return False
            owner = {**_machine(), "pid": os.getpid(), "token": token, "started": time.time()}
            try:
                _write_all(fd, json.dumps(owner).encode())
                os.fsync(fd)
            except BaseException:
                _HELD_TOKENS.discard(token)
                # An empty or cut record names nobody: left behind (a full disk), every worker would wait
                # out the stale timeout for it, and we would take our own cut record for a new owner's.
                _remove_if_still(self.path, fd)
                raise
            finally:
                os.close(fd)
            self._token = token
            _HELD_TOKENS.add(token)
            self._lost.clear()
            self._stop.clear()
            self._heartbeat = threading.Thread(
                target=self._beat, name=f"heartbeat {self.path.name}", daemon=True
            )
            self._heartbeat.start()
            return True
        return False

    def confirm(self) -> bool:
        """Whether the lock file still names us, read now (the heartbeat notices a takeover only at
        its next beat). A file naming someone else (or half written: ours was complete before we held
        it) or one still missing on a later look (a breaker moves a fresh lock aside only for an
        instant) counts as lost; a read that fails on a flaky network filesystem does not."""
        if self._token is None or self._lost.is_set():
            return False
        seen_gone = False
        for attempt in range(CONFIRM_READS):
            look = self._look()
            if look == "ours":
                return True
            # A file gone twice, or gone and then unreadable, has changed hands.
            if look == "theirs" or (seen_gone and look in ("gone", "unreadable")):
                self._lost.set()
                return False
            seen_gone = seen_gone or look == "gone"
            time.sleep(0.05 * (attempt + 1))
        if seen_gone:
            self._lost.set()
        return not seen_gone  # unreadable throughout: the heartbeat decides later

    def _look(self) -> str:
        """The lock file right now: "ours", "theirs", "gone" or "unreadable"."""
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return "gone"
        except OSError:
            return "unreadable"
        except ValueError:  # ours was complete before we held it: this is a new owner's, half written
            return "theirs"
        return "ours" if isinstance(owner, dict) and owner.get("token") == self._token else "theirs"

    def release(self) -> None:
        if self._token is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        owner = read_owner(self.path)
        if owner is not None and owner.get("token") == self._token:
            # A volume gone read-only refuses this: warn, for the error that ended the work matters more.
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning(
                    "could not remove lock %s (%s); other workers wait until it goes stale", self.path, exc
                )
        _HELD_TOKENS.discard(self._token)
        self._token = None
        self._heartbeat = None

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            if not self.confirm():
                logger.warning("lock %s was taken over by another worker", self.path)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _is_stale(self, owner: dict | None, mtime_ns: int) -> bool:
        me = _machine()
        if owner is not None and all(owner.get(k) == v for k, v in me.items()):
            if isinstance(owner.get("pid"), int) and not _process_alive(owner["pid"]):
                return True
            # Our own process (with a known pid namespace), but no lock it holds: a failed release's.
            if (
                me["pid_namespace"]
                and owner.get("pid") == os.getpid()
                and owner.get("token") not in _HELD_TOKENS
            ):
                return True
        seen = ((owner or {}).get("token"), mtime_ns)
        now = time.monotonic()
        if self._observed is None or self._observed[0] != seen:
            self._observed = (seen, now)
            return False
        silent_for = now - self._observed[1]
        # An old mtime alone proves nothing: the clock that stamped it (the file server's, or the holder's)
        # may run minutes behind ours. It only shortens the wait once we saw the heartbeat miss two beats.
        if time.time() - mtime_ns / 1e9 > self.stale_after and silent_for > self.stale_after / 2:
            return True
        return silent_for > self.stale_after

    def _break_if_stale(self) -> bool:
        """Move a stale lock out of the way. True when the path is free to be created again."""
        owner = read_owner(self.path)  # opened first: on NFS an open revalidates the cached mtime
        try:
            mtime_ns = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return True
        if not self._is_stale(owner, mtime_ns):
            return False
        graveyard = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, graveyard)
        except FileNotFoundError:
            return True  # another waiter broke it first
        moved = read_owner(graveyard)
        if (moved or {}).get("token") != (owner or {}).get("token"):
            # Between our check and the rename someone else broke the stale lock and took a fresh one:
            # put theirs back (link fails if the name is taken again, which is just as good).
            with contextlib.suppress(FileExistsError):
                os.link(graveyard, self.path)
            graveyard.unlink(missing_ok=True)
            return False
        graveyard.unlink(missing_ok=True)
        self._observed = None
        logger.warning("broke stale lock %s held by %s", self.path, owner)
        return True
