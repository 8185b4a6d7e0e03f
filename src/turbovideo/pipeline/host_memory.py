"""How much host (CPU) memory this process can still take, read as the two judges of it read it.

RunPod's memory fitness check reads MemAvailable (``/proc/meminfo``; psutil's
``virtual_memory().available`` is that field on Linux): in a container that is usually the whole
host's figure. The kernel's OOM killer ends the process, without a word, once its container's cgroup
reaches its memory limit. Everything here reads files under ``root`` (``/`` unless a test says
otherwise), so it can be checked against any layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from turbovideo.errors import InputError

GIB = 1 << 30
# cgroup v1 says "no limit" with a number near 2**63 (rounded down to a page).
_NO_LIMIT_V1 = 1 << 62


def gib_text(n: int, *, up: bool = False) -> str:
    """``n`` bytes as GiB to one decimal, rounded down (``up``: up), so that a shortfall never reads as
    enough: 3.96 GiB available against 4 needed is "3.9", not "4.0"."""
    tenths = -(-n * 10 // GIB) if up else n * 10 // GIB
    return f"{tenths / 10:.1f}"


class HostMemoryError(InputError):
    """The modules a placement moves off the GPU while idle need more host memory for their pinned copies
    than the host (or the container's memory limit) has free. Made before any copy: past that limit the
    kernel's OOM killer would end the process without a word. ``summary`` is the message without advice."""

    def __init__(self, summary: str, advice: str) -> None:
        super().__init__(f"{summary}; {advice}")
        self.summary = summary


@dataclass(frozen=True)
class HostMemory:
    available: int  # MemAvailable, bytes: what RunPod's memory check compares with RUNPOD_MIN_MEMORY_GB
    limit_room: int | None  # the container's memory limit less what it holds (below); None: no limit

    @property
    def room(self) -> int:
        """Bytes the process can still allocate before either the host or its container runs out."""
        return self.available if self.limit_room is None else min(self.available, self.limit_room)


def read_host_memory(root: Path = Path("/")) -> HostMemory | None:
    """The host's available memory and the room under this process's cgroup limit; None where there is
    no ``/proc/meminfo`` to read (not Linux)."""
    available = _meminfo_available(root / "proc/meminfo")
    if available is None:
        return None
    return HostMemory(available, _cgroup_room(root))


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                return int(value.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: Path) -> int | None:
    """The tightest limit on this process's cgroup and its ancestors, less what each holds. Page cache
    on the inactive list counts as free: the kernel drops it before the OOM killer acts (this is the
    "working set" container tools report). Active page cache counts as held, which errs towards too
    little room rather than too much."""
    mount = root / "sys/fs/cgroup"
    if "memory" in _read(mount / "cgroup.controllers").split():  # v2, one hierarchy
        own = _own_dir(root, mount, lambda controllers: controllers == "")
        rooms = []
        for level in [own, *own.parents]:
            if not level.is_relative_to(mount):
                break
            limit = _read(level / "memory.max").strip()
            if limit and limit != "max":
                rooms.append(_room(limit, _read(level / "memory.current"), _stat(level, "inactive_file")))
        found = [r for r in rooms if r is not None]
        return min(found) if found else None
    v1 = mount / "memory"
    if (v1 / "memory.limit_in_bytes").is_file():
        own = _own_dir(root, v1, lambda controllers: "memory" in controllers.split(","))
        limits = [_int(_read(own / "memory.limit_in_bytes")), _stat(own, "hierarchical_memory_limit")]
        limit = min((n for n in limits if n is not None), default=None)
        if limit is None or limit >= _NO_LIMIT_V1:
            return None
        return _room(str(limit), _read(own / "memory.usage_in_bytes"), _stat(own, "total_inactive_file"))
    return None


def _own_dir(root: Path, mount: Path, is_hierarchy: Callable[[str], bool]) -> Path:
    """This process's cgroup folder under ``mount``, from /proc/self/cgroup; the mount itself where that
    path is not there (inside a container the mount is usually the container's own cgroup)."""
    for line in _read(root / "proc/self/cgroup").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if is_hierarchy(controllers):
            own = mount / path.strip().lstrip("/")
            return own if own.is_dir() else mount
    return mount


def _room(limit: str, usage: str, inactive_file: int | None) -> int | None:
    total, used = _int(limit), _int(usage)
    if total is None or used is None:
        return None
    return max(0, total - max(0, used - (inactive_file or 0)))


def _stat(folder: Path, key: str) -> int | None:
    for line in _read(folder / "memory.stat").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _int(value)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None
