"""The volume lock: exclusive, kept alive by its heartbeat, broken only when its owner is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from hub_server import read_only_dir

from turbovideo.worker.locking import VolumeLock, read_owner


def test_one_holder_at_a_time_and_heartbeat_keeps_it(tmp_path):
    path = tmp_path / "x.lock"
    holder, waiter = VolumeLock(path, stale_after=0.6), VolumeLock(path, stale_after=0.6)
    assert holder.try_acquire()
    deadline = time.monotonic() + 1.5  # well past the stale timeout
    while time.monotonic() < deadline:
        assert not waiter.try_acquire()
        time.sleep(0.05)
    assert holder.held
    holder.release()
    assert not path.exists()
    assert waiter.try_acquire()
    waiter.release()


def test_frozen_heartbeat_goes_stale_even_from_a_clock_far_ahead(tmp_path):
    path = tmp_path / "x.lock"
    path.write_text(
        json.dumps({"host": "elsewhere", "pid_namespace": "pid:[1]", "pid": 1, "token": "theirs"})
    )
    ahead = time.time() + 3600  # the other host's clock runs an hour fast: its mtime never looks old
    os.utime(path, (ahead, ahead))
    lock = VolumeLock(path, stale_after=0.5)
    assert not lock.try_acquire()
    time.sleep(0.6)
    assert lock.try_acquire()  # the heartbeat did not move for longer than stale_after
    assert read_owner(path)["token"] != "theirs"
    lock.release()


def test_lock_of_a_dead_local_process_is_taken_at_once(tmp_path):
    path = tmp_path / "x.lock"
    code = "import os, sys; from pathlib import Path; from turbovideo.worker.locking import VolumeLock\n"
    code += "assert VolumeLock(Path(sys.argv[1])).try_acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert path.exists()
    lock = VolumeLock(path)  # default two-minute timeout: only the dead pid can explain success
    assert lock.try_acquire()
    assert list(tmp_path.iterdir()) == [path]  # the broken lock is not left behind under another name
    lock.release()


def test_holder_notices_when_its_lock_is_taken_over(tmp_path):
    path = tmp_path / "x.lock"
    lock = VolumeLock(path, stale_after=0.2)
    assert lock.try_acquire()
    path.write_text(json.dumps({"token": "someone-else"}))
    time.sleep(0.3)
    assert not lock.held
    lock.release()
    assert read_owner(path) == {"token": "someone-else"}  # not ours to delete


def test_an_unreadable_lock_file_is_not_mistaken_for_a_takeover(tmp_path):
    path = tmp_path / "x.lock"
    lock = VolumeLock(path)
    assert lock.try_acquire()
    record = path.read_bytes()
    path.unlink()
    path.mkdir()  # reading it now fails with an OSError, as a flaky network filesystem may
    try:
        assert lock.confirm() and lock.held
    finally:
        path.rmdir()
        path.write_bytes(record)
    path.write_text(json.dumps({"token": "theirs"}))
    assert not lock.confirm() and not lock.held
    lock.release()
    assert read_owner(path) == {"token": "theirs"}  # the new owner's lock stays


def test_a_lock_this_process_left_behind_is_taken_at_once(tmp_path):
    path = tmp_path / "x.lock"
    first = VolumeLock(path)
    assert first.try_acquire()
    owner = read_owner(path)
    first.release()
    path.write_text(json.dumps(owner))  # as if the release had failed to remove it
    second = VolumeLock(path)
    assert second.try_acquire()
    second.release()


def test_a_new_owners_record_still_being_written_is_a_takeover(tmp_path):
    path = tmp_path / "x.lock"
    lock = VolumeLock(path)
    assert lock.try_acquire()
    path.unlink()  # a breaker moved ours aside ...
    path.touch()  # ... and created its own, its record not written yet
    assert not lock.confirm()
    lock.release()
    assert path.exists()  # not ours to remove


def test_a_live_heartbeat_stamped_by_a_clock_behind_ours_is_not_broken(tmp_path, monkeypatch):
    # The file server (or the holder) stamps mtimes 10 min behind the waiter's clock: every stamp looks
    # old, but the heartbeat keeps moving, so its owner is alive.
    from turbovideo.worker import locking

    path = tmp_path / "x.lock"
    holder = VolumeLock(path, stale_after=0.8)  # beats every 0.2 s
    assert holder.try_acquire()

    class Ahead:
        def __getattr__(self, name):
            return getattr(time, name)

        def time(self):
            return time.time() + 600

    monkeypatch.setattr(locking, "time", Ahead())
    waiter = VolumeLock(path, stale_after=0.8)
    deadline = time.monotonic() + 2.5  # three times the stale timeout
    try:
        while time.monotonic() < deadline:
            assert not waiter.try_acquire(), "a live lock was broken"
            time.sleep(0.05)
        assert holder.held
    finally:
        holder.release()


_FULL_DISK_LOCK_CHILD = """
import resource, signal, sys
from pathlib import Path
from turbovideo.worker.locking import VolumeLock
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    print(VolumeLock(Path(sys.argv[1])).try_acquire())
except OSError as e:
    print(e.strerror)
"""


def test_a_lock_record_the_disk_cannot_take_is_an_error_and_leaves_no_lock(tmp_path):
    # 0: the first write fails (the empty file used to stay); 10: only part of the record fits, which
    # os.write reports as a short write (the cut record used to stay, taken for the holder's own).
    for room in (0, 10):
        path = tmp_path / f"x{room}.lock"
        done = subprocess.run(
            [sys.executable, "-c", _FULL_DISK_LOCK_CHILD, str(path), str(room)],
            capture_output=True,
            text=True,
        )
        assert done.stdout.strip() == "File too large", done.stderr
        assert not path.exists()


def test_a_lock_the_volume_will_not_let_go_is_released_with_a_warning(tmp_path, caplog):
    # The lock's folder turns read-only under a download (as a volume remounted read-only would).
    path = tmp_path / "locks" / "x.lock"
    path.parent.mkdir()
    lock = VolumeLock(path, stale_after=5)
    assert lock.try_acquire()
    with read_only_dir(path.parent):
        lock.release()  # must not replace the error that ended the work
        assert path.exists()
    assert not lock.held
    assert "could not remove lock" in caplog.text and "other workers wait until it goes stale" in caplog.text


def test_a_failed_record_write_removes_only_its_own_file(tmp_path):
    # The write hung long enough for another worker to break our nameless file and take the lock.
    from turbovideo.worker.locking import _remove_if_still

    path = tmp_path / "x.lock"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.rename(path, tmp_path / "x.lock.stale-1")
        path.write_text(json.dumps({"token": "theirs"}))
        _remove_if_still(path, fd)
        assert read_owner(path) == {"token": "theirs"}
        os.rename(path, tmp_path / "x.lock.theirs")
        os.rename(tmp_path / "x.lock.stale-1", path)
        _remove_if_still(path, fd)  # ours again: removed
        assert not path.exists()
    finally:
        os.close(fd)


def test_a_live_owner_of_another_user_is_not_taken_for_dead(tmp_path, monkeypatch):
    from turbovideo.worker import locking

    path = tmp_path / "x.lock"
    path.write_text(json.dumps({**locking._machine(), "pid": 4_000_000, "token": "theirs"}))

    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")  # as for a process another user runs

    monkeypatch.setattr(locking.os, "kill", kill)
    assert not VolumeLock(path).try_acquire()
    assert read_owner(path)["token"] == "theirs"


def test_a_dead_pid_in_the_lock_of_another_pod_on_the_same_host_is_not_taken_for_ours(tmp_path, monkeypatch):
    # Containers of two pods may share a hostname and a pid namespace name; the pod id tells them apart,
    # else another pod's live holder would be judged dead by a pid that means nothing here.
    path = tmp_path / "x.lock"
    code = "import os, sys; from pathlib import Path; from turbovideo.worker.locking import VolumeLock\n"
    code += "assert VolumeLock(Path(sys.argv[1])).try_acquire(); os._exit(0)"
    env = {**os.environ, "RUNPOD_POD_ID": "pod-a"}
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)
    monkeypatch.setenv("RUNPOD_POD_ID", "pod-b")
    assert not VolumeLock(path).try_acquire()
    assert read_owner(path)["host"] == "pod-a"


def test_a_lock_moved_aside_for_an_instant_is_still_held(tmp_path):
    # A breaker that finds a fresh lock after its rename puts it back: a holder looking just then keeps it.
    path = tmp_path / "x.lock"
    lock = VolumeLock(path)
    assert lock.try_acquire()
    aside = tmp_path / "x.lock.stale-1"
    os.rename(path, aside)
    threading.Timer(0.02, os.rename, (aside, path)).start()
    try:
        assert lock.confirm() and lock.held
    finally:
        time.sleep(0.05)
        lock.release()
    assert not path.exists()


def test_a_fresh_lock_taken_between_the_staleness_check_and_the_break_is_put_back(tmp_path, monkeypatch):
    from turbovideo.worker import locking

    path = tmp_path / "x.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    path.write_text(json.dumps({**locking._machine(), "pid": int(dead.stdout), "token": "dead"}))
    waiter, other = VolumeLock(path), VolumeLock(path)
    judge = waiter._is_stale

    def racing(owner, mtime_ns):
        stale = judge(owner, mtime_ns)
        if stale:  # another waiter breaks the dead lock and takes a fresh one first
            path.unlink()
            assert other.try_acquire()
        return stale

    monkeypatch.setattr(waiter, "_is_stale", racing)
    try:
        assert not waiter.try_acquire()
        assert other.confirm() and other.held
        assert sorted(tmp_path.iterdir()) == [path]
    finally:
        other.release()


def test_a_holder_whose_lock_was_taken_over_stops_touching_it(tmp_path):
    # Its heartbeat would keep the new owner's lock looking alive after that owner died.
    path = tmp_path / "x.lock"
    lock = VolumeLock(path, stale_after=0.2)  # beats every 0.05 s
    assert lock.try_acquire()
    path.write_text(json.dumps({"token": "someone-else"}))
    time.sleep(0.3)
    assert not lock.held
    os.utime(path, (1000, 1000))
    time.sleep(0.3)
    try:
        assert path.stat().st_mtime == 1000
    finally:
        lock.release()
