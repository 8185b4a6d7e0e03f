"""The checkpoint cache against a loopback Hub, with the real huggingface_hub client doing the HTTP."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hub_server import HubServer, Served, read_only_dir

from turbovideo.catalog import MODELS, HubFile, ModelSpec
from turbovideo.worker import checkpoints, hub_transfer, locking
from turbovideo.worker.checkpoints import CheckpointDownloadError, default_cache_dir, ensure_checkpoints
from turbovideo.worker.locking import VolumeLock

SPEC = MODELS["TurboWan2.1-T2V-1.3B-480P"]
DIT = SPEC.dit_files(False)[0]
# huggingface_hub writes in 10 MiB pieces: the DiT must span a few for partial files to appear.
MIB = 1 << 20
DIT_SIZE = 24 * MIB


def fake_files(spec: ModelSpec = SPEC, quantized: bool = False) -> dict[tuple[str, str], Served]:
    """Random bytes under the real Hub names: the DiT 24 MiB, the rest small; tokenizer files are git files."""
    return {
        (f.repo, f.filename): Served(
            os.urandom(DIT_SIZE if f == DIT else 20_000 + i), lfs=f.filename.endswith(".pth")
        )
        for i, f in enumerate(spec.files(quantized))
    }


@pytest.fixture(autouse=True)
def _no_retry_pauses(monkeypatch):
    monkeypatch.setattr(checkpoints, "RETRY_DELAYS_S", (0.0, 0.0))


@pytest.fixture
def hub():
    with HubServer(fake_files()) as server:
        yield server


def target(cache: Path, f: HubFile) -> Path:
    return cache / f.repo / f.filename


def marker(cache: Path, f: HubFile) -> Path:
    t = target(cache, f)
    return t.with_name(f".{t.name}.complete")


def assert_model_dir(model_dir: Path, hub: HubServer) -> None:
    for f in SPEC.files(False):
        assert (model_dir / f.filename).read_bytes() == hub.files[(f.repo, f.filename)].content


def test_first_download_then_no_network_and_offline(hub, tmp_path, monkeypatch):
    messages: list[str] = []
    model_dir = ensure_checkpoints(
        SPEC, False, tmp_path, endpoint=hub.endpoint, token="hf_secret", progress=messages.append
    )
    assert model_dir == tmp_path / "models" / f"{SPEC.name}-bf16"
    assert_model_dir(model_dir, hub)
    record = json.loads(marker(tmp_path, DIT).read_text())
    assert record["size"] == DIT_SIZE and record["sha256_verified"] is True
    leftovers = [p.name for p in tmp_path.rglob(".*") if p.suffix in {".lock", ".partial", ".tmp"}]
    assert leftovers == []
    assert any("fetched" in m and DIT.filename in m for m in messages)
    # The token goes to the Hub, never to the CDN host that serves LFS bytes.
    assert {r.authorization for r in hub.requests if r.server == "hub"} == {"Bearer hf_secret"}
    assert {r.authorization for r in hub.requests if r.server == "cdn"} == {None}

    seen = len(hub.requests)
    assert ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint) == model_dir
    assert ensure_checkpoints(SPEC, False, tmp_path, offline=True) == model_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint) == model_dir
    assert len(hub.requests) == seen
    assert_model_dir(model_dir, hub)


def test_a_cached_file_cut_short_after_its_marker_is_downloaded_again(hub, tmp_path):
    # The marker records the size: a file cut on the volume (a full disk, a bad copy) is not complete.
    ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    with open(target(tmp_path, DIT), "r+b") as fh:
        fh.truncate(MIB)
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    assert hub.full_gets(DIT.repo, DIT.filename) == 2


@pytest.mark.parametrize("intact", [True, False], ids=["intact", "same-size-other-bytes"])
def test_a_file_put_in_place_without_a_marker_is_adopted_only_when_its_sha256_matches(hub, tmp_path, intact):
    served = hub.files[(DIT.repo, DIT.filename)].content
    dit = target(tmp_path, DIT)
    dit.parent.mkdir(parents=True)
    dit.write_bytes(served if intact else os.urandom(len(served)))
    messages: list[str] = []
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint, progress=messages.append)
    assert_model_dir(model_dir, hub)
    assert hub.full_gets(DIT.repo, DIT.filename) == (0 if intact else 1)
    adopted = f"verified {DIT.repo}/{DIT.filename} already in place"
    assert any(m.startswith(adopted) for m in messages) is intact


def test_big_files_report_bytes_so_far(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_transfer, "PROGRESS_EVERY_S", 0.0)
    messages: list[str] = []
    ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint, progress=messages.append)
    assert [m for m in messages if m.startswith(f"{DIT.repo}/{DIT.filename}: ") and "%)" in m][-1].startswith(
        f"{DIT.repo}/{DIT.filename}: 25.2 MB of 25.2 MB (100%)"
    )


def test_random_weight_spec_touches_nothing(tmp_path):
    cache = tmp_path / "cache"
    assert ensure_checkpoints(MODELS["tiny-i2v"], True, cache, endpoint="http://127.0.0.1:9") is None
    assert not cache.exists()


def test_offline_with_empty_cache_names_the_file_and_the_fix(hub, tmp_path):
    with pytest.raises(CheckpointDownloadError) as info:
        ensure_checkpoints(SPEC, False, tmp_path, offline=True, endpoint=hub.endpoint)
    message = str(info.value)
    assert DIT.filename in message and "download_checkpoints.py" in message and "\n" not in message
    assert hub.requests == []


def test_files_seeded_without_their_markers_are_named_as_such_offline(hub, tmp_path):
    seeded = tmp_path / "seeded"
    ensure_checkpoints(SPEC, False, tmp_path / "first", endpoint=hub.endpoint)
    shutil.copytree(
        tmp_path / "first", seeded, ignore=shutil.ignore_patterns(".*")
    )  # cp dir/* skips dot-files
    with pytest.raises(CheckpointDownloadError) as info:
        ensure_checkpoints(SPEC, False, seeded, offline=True)
    assert " is in the cache at " in str(info.value) and "but has no completion marker" in str(info.value)
    # Online, the download script's way, they are verified in place: no body is fetched again.
    before = len(hub.requests)
    ensure_checkpoints(SPEC, False, seeded, endpoint=hub.endpoint)
    assert not [r for r in hub.requests[before:] if r.method == "GET"]


def test_dropped_connection_is_resumed_with_range(hub, tmp_path):
    hub.drop_after, hub.drops_left = 15 * MIB, 1
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    first, again = (r.range for r in hub.body_gets(DIT.repo, DIT.filename))
    assert first is None and again.startswith("bytes=") and 0 < int(again[6:-1]) <= 15 * MIB


def test_a_server_error_during_a_download_is_tried_again(hub, tmp_path):
    hub.errors_left = 1
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    assert hub.errors_left == 0


def test_a_refused_download_link_is_asked_for_again_not_blamed_on_the_token(hub, tmp_path):
    # The Hub let us in; its signed link then answered 403 (expired while a resume waited).
    hub.error_status, hub.errors_left = 403, 1
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    assert hub.errors_left == 0


def test_an_endpoint_that_is_no_hub_caches_nothing(hub, tmp_path):
    hub.commit_header = False  # a web page or proxy answering 200 with an ETag to every path
    with pytest.raises(CheckpointDownloadError, match="with no X-Repo-Commit header, as a Hugging Face Hub"):
        ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_a_file_system_error_after_the_transfer_is_one_sentence_naming_the_cache(hub, tmp_path):
    blocked = next(f for f in SPEC.files(False) if f != DIT and f.filename.endswith(".pth"))
    (target(tmp_path, blocked) / "junk").mkdir(parents=True)  # the final rename meets a folder
    with pytest.raises(
        CheckpointDownloadError, match=r"^cannot use the cache at .*Is a directory.*\(CACHE_DIR; "
    ):
        ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)


def test_a_lasting_server_error_gives_up_as_transient(hub, tmp_path):
    hub.errors_left = 100
    with pytest.raises(CheckpointDownloadError, match="HTTP 503") as info:
        ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert info.value.transient
    assert 100 - hub.errors_left == len(checkpoints.RETRY_DELAYS_S) + 1  # tries, then gives up


def test_a_partial_longer_than_the_file_is_started_over_once(hub, tmp_path):
    dit = target(tmp_path, DIT)
    dit.parent.mkdir(parents=True)
    etag = hub.files[(DIT.repo, DIT.filename)].etag()
    checkpoints._sidecar(dit, f"{etag[:16]}.partial").write_bytes(os.urandom(DIT_SIZE + MIB))
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    assert hub.full_gets(DIT.repo, DIT.filename) == 1


def test_a_partial_of_an_older_revision_is_removed(hub, tmp_path):
    # Its bytes belong to another version of the file: kept, it would fill the volume for nothing.
    dit = target(tmp_path, DIT)
    dit.parent.mkdir(parents=True)
    old = checkpoints._sidecar(dit, "00000000deadbeef.partial")
    old.write_bytes(os.urandom(MIB))
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    assert not old.exists()


def test_a_rewind_after_a_takeover_does_not_touch_the_new_owners_partial(tmp_path):
    # http_get rewinds (seek + truncate) when a server ignores the Range header.
    partial = tmp_path / ".x.pth.0123.partial"
    partial.write_bytes(b"x" * 1000)
    lock = VolumeLock(tmp_path / ".x.pth.lock")
    assert lock.try_acquire()
    with open(partial, "r+b") as fh:
        writer = hub_transfer._PartialWriter(fh, True, 2000, "x.pth", lambda _: None, lock)
        (tmp_path / ".x.pth.lock").write_text(json.dumps({"token": "theirs"}))
        with pytest.raises(hub_transfer.LockLost):
            writer.seek(0)
        with pytest.raises(hub_transfer.LockLost):
            writer.truncate()
    assert partial.read_bytes() == b"x" * 1000
    lock.release()


@pytest.mark.parametrize("when", ["during the pause before a retry", "during the transfer"])
def test_a_worker_whose_lock_was_taken_over_stops_touching_the_file(hub, tmp_path, monkeypatch, when):
    dit = target(tmp_path, DIT)
    dit.parent.mkdir(parents=True)
    lock = VolumeLock(checkpoints._sidecar(dit, "lock"))
    assert lock.try_acquire()
    if when == "during the transfer":
        monkeypatch.setattr(hub_transfer, "PROGRESS_EVERY_S", 0.0)  # the writer looks at the lock every chunk
        trigger = f"{DIT.repo}/{DIT.filename}: "
    else:
        hub.errors_left = 1
        trigger = "trying again"

    taken_at: list[int] = []

    def report(message: str) -> None:
        if message.startswith(trigger) or trigger in message:  # another worker judged us dead
            lock.path.write_text(json.dumps({"token": "theirs"}))
            taken_at.extend(p.stat().st_size for p in dit.parent.glob(f".{dit.name}.*.partial"))

    download = functools.partial(
        checkpoints._download, DIT, dit, lock, token=None, endpoint=hub.endpoint, report=report
    )
    with pytest.raises(hub_transfer.LockLost):
        checkpoints._with_retries(download, lock, report)
    assert not dit.exists() and not marker(tmp_path, DIT).exists()
    if when == "during the transfer":  # not one more byte: the partial is the new owner's to continue
        (partial,) = dit.parent.glob(f".{dit.name}.*.partial")
        assert 0 < partial.stat().st_size == taken_at[0] < DIT_SIZE
    else:  # no second try without the lock
        assert len(hub.body_gets(DIT.repo, DIT.filename)) == 1
    lock.release()


@pytest.mark.parametrize(("scheme", "transient"), [("http", True), ("https", False)])
def test_refused_connections_are_transient_but_tls_failures_are_a_setting(hub, scheme, transient):
    # A closed port (an outage) against TLS spoken to a plain-HTTP server (a wrong endpoint setting).
    port = hub.endpoint.rsplit(":", 1)[1]
    endpoint = f"https://127.0.0.1:{port}" if scheme == "https" else "http://127.0.0.1:1"
    with pytest.raises(CheckpointDownloadError, match="could not reach") as info:
        hub_transfer.locate(DIT, token=None, endpoint=endpoint, retries=False)
    assert info.value.transient is transient


def test_a_cut_tls_handshake_is_transient(tmp_path):
    # A server that accepts and hangs up at once, as an overloaded load balancer may.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def hang_up() -> None:
        for _ in range(3):
            connection, _ = server.accept()
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    with pytest.raises(CheckpointDownloadError, match="could not reach") as info:
        hub_transfer.locate(DIT, token=None, endpoint=f"https://127.0.0.1:{port}", retries=False)
    server.close()
    assert info.value.transient


def test_a_host_name_that_does_not_resolve_is_a_setting_not_an_outage():
    # A typo in HF_ENDPOINT: a fresh worker would fail the same way (only EAI_AGAIN is an outage).
    with pytest.raises(CheckpointDownloadError, match="could not reach no-such-hub.invalid") as info:
        hub_transfer.locate(DIT, token=None, endpoint="http://no-such-hub.invalid", retries=False)
    assert not info.value.transient


@pytest.mark.parametrize(
    ("status", "expected", "transient"),
    [
        (401, r"access to .* was refused \(HTTP 401.*; set HF_TOKEN", False),
        (403, r"access to .* was refused \(HTTP 403.*; set HF_TOKEN", False),
        (404, r"does not exist on the Hub \(HTTP 404\)", False),
        (408, "the Hub answered HTTP 408", True),
        (429, "the Hub answered HTTP 429", True),
        (500, "the Hub answered HTTP 500", True),
        (400, "the Hub answered HTTP 400", False),
    ],
)
def test_the_hubs_refusal_says_whether_a_fresh_worker_could_do_better(hub, status, expected, transient):
    # A token that cannot read the file is the operator's to fix, not a reason to replace the worker;
    # rate limits and server errors pass.
    hub.hub_status = status
    with pytest.raises(CheckpointDownloadError, match=expected) as info:
        hub_transfer.locate(DIT, token="hf_secret", endpoint=hub.endpoint, retries=False)
    assert info.value.transient is transient


def test_an_endpoint_answering_without_an_etag_caches_nothing(hub, tmp_path):
    hub.etag_header = False  # the sha256 the file is checked against, and the key of its partial file
    with pytest.raises(CheckpointDownloadError, match="with no ETag, as a Hugging Face Hub would not"):
        ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def _partial_of(cache: Path, hub: HubServer, f: HubFile, length: int) -> Path:
    """The partial file an interrupted download of ``f`` leaves: its first ``length`` bytes."""
    served = hub.files[(f.repo, f.filename)]
    dit = target(cache, f)
    dit.parent.mkdir(parents=True, exist_ok=True)
    partial = checkpoints._sidecar(dit, f"{served.etag()[:16]}.partial")
    partial.write_bytes(served.content[:length])
    return partial


def test_a_partial_that_already_holds_the_whole_file_is_finished_without_fetching_it_again(hub, tmp_path):
    # Stopped after the last byte but before the rename: nothing is left to fetch.
    _partial_of(tmp_path, hub, DIT, DIT_SIZE)
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    assert hub.body_gets(DIT.repo, DIT.filename) == []
    assert json.loads(marker(tmp_path, DIT).read_text())["sha256_verified"] is True


def test_a_server_that_ignores_the_range_header_still_gives_a_verified_file_in_one_transfer(hub, tmp_path):
    # Some CDNs answer a resume with the whole file (200): it is rewound, and the sha256 covers only it.
    hub.ignore_range = True
    _partial_of(tmp_path, hub, DIT, 3 * MIB)
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    assert [r.range for r in hub.body_gets(DIT.repo, DIT.filename)] == [f"bytes={3 * MIB}-"]
    assert json.loads(marker(tmp_path, DIT).read_text())["sha256_verified"] is True


def test_a_hard_linked_model_file_is_checked_against_the_cache_copy(hub, tmp_path):
    # Filesystems without symbolic links get hard links in models/<name>/.
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    link = model_dir / DIT.filename
    link.unlink()
    os.link(target(tmp_path, DIT), link)
    assert checkpoints.verify_cached(tmp_path, link, discard=True) is True
    data = bytearray(target(tmp_path, DIT).read_bytes())
    data[100] ^= 0xFF
    target(tmp_path, DIT).write_bytes(data)  # in place: the link shares the damage
    assert checkpoints.verify_cached(tmp_path, link, discard=True) is False
    assert not target(tmp_path, DIT).exists() and not marker(tmp_path, DIT).exists()


def test_a_file_another_worker_replaces_while_it_is_hashed_is_neither_judged_nor_removed(
    hub, tmp_path, monkeypatch
):
    # The hash reads the old, damaged file while another worker downloads a fresh copy and renames it
    # into place: only what was hashed may be removed, and the new copy is not it.
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    cached = target(tmp_path, DIT)
    good = cached.read_bytes()
    damaged = bytearray(good)
    damaged[100] ^= 0xFF
    cached.write_bytes(damaged)
    real_sha256 = checkpoints.sha256_of

    def hashed_while_replaced(path):
        digest = real_sha256(path)  # of the damaged file
        fresh = cached.with_name(".fresh")
        fresh.write_bytes(good)
        os.replace(fresh, cached)  # the other worker's rename: a new inode
        return digest

    monkeypatch.setattr(checkpoints, "sha256_of", hashed_while_replaced)
    assert checkpoints.verify_cached(tmp_path, model_dir / DIT.filename, discard=True) is None
    assert cached.read_bytes() == good and marker(tmp_path, DIT).exists()


def test_a_cached_file_without_a_sha256_on_record_is_never_judged_damaged(hub, tmp_path):
    # Git files' etags are not sha256s: nothing tells a damaged copy, so nothing may be removed.
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    (git_file,) = [f for f in SPEC.files(False) if f.filename.endswith("tokenizer.json")]
    assert json.loads(marker(tmp_path, git_file).read_text())["sha256_verified"] is False
    assert checkpoints.verify_cached(tmp_path, model_dir / git_file.filename, discard=True) is None
    assert target(tmp_path, git_file).exists() and marker(tmp_path, git_file).exists()


def test_a_model_link_pointing_elsewhere_is_pointed_back_at_its_file(hub, tmp_path):
    # e.g. a folder linked by an older layout, or by hand to the wrong file.
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    link = model_dir / DIT.filename
    link.unlink()
    link.symlink_to(os.path.relpath(target(tmp_path, SPEC.files(False)[1]), link.parent))
    assert ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint) == model_dir
    assert link.is_symlink()
    assert_model_dir(model_dir, hub)


def test_nothing_to_fetch_touches_nothing(tmp_path):
    checkpoints.check_room([], tmp_path / "no" / "cache")
    assert not (tmp_path / "no").exists()


_CHILD = """
import sys
from pathlib import Path
from turbovideo.catalog import MODELS
from turbovideo.worker.checkpoints import ensure_checkpoints
ensure_checkpoints(MODELS[sys.argv[1]], False, Path(sys.argv[2]), endpoint=sys.argv[3])
"""


def test_a_worker_stopped_during_its_download_releases_the_lock(hub, tmp_path):
    # SIGTERM (docker stop, RunPod scaling a starting worker down) used to end the process on the spot,
    # leaving the lock for every other worker on the volume to wait out (STALE_AFTER_S).
    hub.chunk, hub.delay_s = MIB, 0.1
    env = {
        **os.environ,
        "MODELS": SPEC.name,
        "CACHE_DIR": str(tmp_path / "cache"),
        "HF_ENDPOINT": hub.endpoint,
    }
    handler = Path(__file__).resolve().parents[1] / "handler.py"
    job = '{"input": {"prompt": "a fox"}}'
    worker = subprocess.Popen([sys.executable, str(handler), "--test_input", job], cwd=tmp_path, env=env)
    dit_dir = target(tmp_path / "cache", DIT).parent
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 0 for p in dit_dir.glob("*.partial")):
        assert time.monotonic() < deadline and worker.poll() is None, "the worker never started downloading"
        time.sleep(0.02)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 128 + signal.SIGTERM
    assert not (dit_dir / f".{DIT.filename}.lock").exists()
    assert next(dit_dir.glob("*.partial")).stat().st_size > 0  # kept for the next start to resume


def test_killed_download_leaves_nothing_complete_and_next_call_resumes(hub, tmp_path):
    hub.chunk, hub.delay_s = MIB, 0.1  # the DiT takes ~2.5 s to serve
    child = subprocess.Popen([sys.executable, "-c", _CHILD, SPEC.name, str(tmp_path), hub.endpoint])
    dit_dir = target(tmp_path, DIT).parent
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size > 0 for p in dit_dir.glob("*.partial")):
        assert time.monotonic() < deadline and child.poll() is None, "the child never started downloading"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()

    (partial,) = dit_dir.glob("*.partial")
    kept = partial.stat().st_size
    assert 0 < kept < DIT_SIZE
    assert not target(tmp_path, DIT).exists() and not marker(tmp_path, DIT).exists()
    assert (dit_dir / f".{DIT.filename}.lock").exists()  # its owner died holding it

    hub.delay_s = 0.0
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    assert [r.range for r in hub.body_gets(DIT.repo, DIT.filename)] == [None, f"bytes={kept}-"]


def _fetch_in_process(cache: str, endpoint: str, start_together, results) -> None:
    start_together.wait()
    said: list[str] = []
    try:
        path = str(ensure_checkpoints(SPEC, False, Path(cache), endpoint=endpoint, progress=said.append))
    except Exception as e:  # reported to the parent, which fails the test with it
        path = f"{type(e).__name__}: {e}"
    results.put((path, said))


def test_two_processes_at_once_download_each_file_once(hub, tmp_path):
    hub.chunk, hub.delay_s = MIB, 0.02
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_fetch_in_process, args=(str(tmp_path), hub.endpoint, go, results)) for _ in "ab"
    ]
    for w in workers:
        w.start()
    time.sleep(1.5)  # let both children import before the race starts
    go.set()
    got = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=10)
    assert [path for path, _ in got] == [str(tmp_path / "models" / f"{SPEC.name}-bf16")] * 2
    assert_model_dir(Path(got[0][0]), hub)
    for f in SPEC.files(False):
        gets = hub.body_gets(f.repo, f.filename)
        assert [r.range for r in gets] == [None], f"{f.filename} was fetched {len(gets)} times"
    # They really raced: one waited for the other, or they shared the files out.
    waited = any(m.startswith("waiting for") for _, said in got for m in said)
    shared = all(any(m.startswith("fetched") for m in said) for _, said in got)
    assert waited or shared


def test_stale_lock_of_a_vanished_worker_is_broken(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "STALE_AFTER_S", 1.0)  # its silence is still watched for half of it
    lock = target(tmp_path, DIT).with_name(f".{DIT.filename}.lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "gone-pod", "pid_namespace": "pid:[1]", "pid": 7, "token": "t"}))
    old = time.time() - 10 * 60
    os.utime(lock, (old, old))
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert_model_dir(model_dir, hub)
    assert not lock.exists()


@pytest.mark.parametrize(
    ("lie", "expected"),
    [({"size": DIT_SIZE + 10}, "wrong size"), ({"sha256": "0" * 64}, "sha256")],
)
def test_corrupt_download_is_rejected_and_removed(tmp_path, lie, expected):
    files = fake_files()
    files[(DIT.repo, DIT.filename)] = Served(files[(DIT.repo, DIT.filename)].content, **lie)
    with HubServer(files) as hub, pytest.raises(CheckpointDownloadError, match=expected) as info:
        ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    dit_dir = target(tmp_path, DIT).parent
    assert sorted(p.name for p in dit_dir.iterdir()) == []
    # Tried again here (one damaged transfer is bad luck), but bytes that keep arriving wrong are a
    # setting (a proxy, a mirror) that a fresh worker would not fix: no replacement.
    assert not info.value.transient
    assert len(hub.body_gets(DIT.repo, DIT.filename)) == len(checkpoints.RETRY_DELAYS_S) + 1


def test_missing_file_on_the_hub(tmp_path):
    files = fake_files()
    del files[(DIT.repo, DIT.filename)]
    with HubServer(files) as hub, pytest.raises(CheckpointDownloadError, match="does not exist") as info:
        ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    assert not info.value.transient


def test_read_only_cache_dir_is_a_clear_error(hub, tmp_path):
    with (
        read_only_dir(tmp_path / "cache") as cache,
        pytest.raises(CheckpointDownloadError, match="not writable"),
    ):
        ensure_checkpoints(SPEC, False, cache, endpoint=hub.endpoint)


def test_pre_seeded_read_only_cache_is_used_as_is(hub, tmp_path):
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    seen = len(hub.requests)
    with read_only_dir(tmp_path):
        assert ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint) == model_dir
        assert_model_dir(model_dir, hub)
    assert len(hub.requests) == seen


def test_pre_seeded_read_only_cache_with_hard_links_is_used_as_is(hub, tmp_path):
    # Seeded on a filesystem without symbolic links: models/<name>/ holds hard links, which a
    # read-only volume must not have to rebuild.
    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    for f in SPEC.files(False):
        link = model_dir / f.filename
        link.unlink()
        os.link(target(tmp_path, f), link)
    with read_only_dir(tmp_path):
        assert ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint) == model_dir
    assert not any(p.is_symlink() for p in model_dir.rglob("*"))


def test_file_larger_than_the_free_space_is_a_clear_error(tmp_path):
    files = fake_files()
    files[(DIT.repo, DIT.filename)].size = 1 << 60  # the Hub claims an exabyte
    with HubServer(files) as hub, pytest.raises(CheckpointDownloadError, match="not enough space"):
        ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)


_FULL_DISK_CHILD = """
import resource, signal, sys
from pathlib import Path
from turbovideo.worker import checkpoints, hub_transfer, locking
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
try:
    checkpoints._atomic_write(Path(sys.argv[1]) / ".x.pth.complete", b"{}" * 100)
except checkpoints.CheckpointDownloadError as e:
    print(e)
"""


def test_a_marker_the_disk_cannot_take_is_a_clear_error_and_leaves_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path)], capture_output=True, text=True
    )
    assert done.stdout.startswith(f"the cache at {tmp_path} is full"), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_room_is_checked_for_all_models_together(tmp_path):
    other = MODELS["TurboWan2.1-T2V-14B-480P"]
    files = fake_files() | fake_files(other)
    free = shutil.disk_usage(tmp_path).free
    for f in (DIT, other.dit_files(False)[0]):
        files[(f.repo, f.filename)].size = free * 6 // 10
    with HubServer(files) as hub:
        for spec in (SPEC, other):  # each model fits on its own
            checkpoints.check_room(spec.files(False), tmp_path, endpoint=hub.endpoint)
        with pytest.raises(CheckpointDownloadError, match="not enough space"):
            checkpoints.check_room([*SPEC.files(False), *other.files(False)], tmp_path, endpoint=hub.endpoint)


def test_room_leaves_what_runpods_disk_check_needs_on_the_container_disk(tmp_path):
    # The SDK's disk check runs after the start: a download that left under 10 % of / free made every
    # start download (or load), then get killed by it, with no job ever told why.
    free = shutil.disk_usage(tmp_path).free
    files = fake_files()
    files[(DIT.repo, DIT.filename)].size = free // 2
    keep_free = checkpoints.disk_check_reserve(tmp_path / "cache", 100.0, root=tmp_path)  # all of it
    assert keep_free == shutil.disk_usage(tmp_path).total
    with HubServer(files) as hub:
        checkpoints.check_room(SPEC.files(False), tmp_path / "cache", endpoint=hub.endpoint)
        with pytest.raises(CheckpointDownloadError, match="RunPod's disk check.*attach a network volume"):
            checkpoints.check_room(
                SPEC.files(False), tmp_path / "cache", endpoint=hub.endpoint, keep_free=keep_free
            )


def test_the_disk_check_reserve_applies_only_to_the_root_file_system(tmp_path):
    assert (
        checkpoints.disk_check_reserve(tmp_path, 10.0, root=tmp_path)
        == shutil.disk_usage(tmp_path).total // 10
    )
    assert checkpoints.disk_check_reserve(tmp_path, 0.0, root=tmp_path) == 0
    assert checkpoints.disk_check_reserve(tmp_path, 10.0, root=Path("/proc")) == 0  # another file system


def test_room_counts_a_file_that_two_models_share_once(tmp_path):
    # The T2V and I2V models share the text encoder and the VAE: counting them twice refused volumes
    # that hold both models comfortably.
    files = fake_files()
    files[(DIT.repo, DIT.filename)].size = shutil.disk_usage(tmp_path).free * 6 // 10
    with HubServer(files) as hub:
        checkpoints.check_room([*SPEC.files(False), *SPEC.files(False)], tmp_path, endpoint=hub.endpoint)


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        file.truncate(size)  # its length, without the disk space


def test_room_counts_only_what_an_interrupted_download_still_lacks(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    files = fake_files()
    files[(DIT.repo, DIT.filename)].size = free + (4 << 30)  # more than is free, but mostly here already
    _sparse(target(tmp_path, DIT).with_name(f".{DIT.filename}.0123456789abcdef.partial"), 8 << 30)
    with HubServer(files) as hub:
        checkpoints.check_room(SPEC.files(False), tmp_path, endpoint=hub.endpoint)


def test_a_resumed_download_needs_room_only_for_what_it_lacks(hub, tmp_path, monkeypatch):
    # 20 of the DiT's 24 MiB are here; the cache reports 8 MiB free (no nearly full file system can be
    # made here without root): enough for the 4 MiB it lacks, not for the whole file.
    dit = target(tmp_path, DIT)
    dit.parent.mkdir(parents=True)
    served = hub.files[(DIT.repo, DIT.filename)]
    kept = DIT_SIZE - 4 * MIB
    checkpoints._sidecar(dit, f"{served.etag()[:16]}.partial").write_bytes(served.content[:kept])
    real = shutil.disk_usage

    def usage(path):
        found = real(path)
        return found._replace(free=8 * MIB) if Path(path).is_relative_to(tmp_path) else found

    monkeypatch.setattr(hub_transfer.shutil, "disk_usage", usage)
    lock = VolumeLock(checkpoints._sidecar(dit, "lock"))
    assert lock.try_acquire()
    checkpoints._download(DIT, dit, lock, token=None, endpoint=hub.endpoint, report=lambda _: None)
    lock.release()
    assert dit.read_bytes() == served.content
    assert [r.range for r in hub.body_gets(DIT.repo, DIT.filename)] == [f"bytes={kept}-"]


def test_room_needs_nothing_for_a_file_in_place_without_its_marker(tmp_path):
    # A pre-seeded copy is adopted after a hash check, not downloaded: no space is needed for it.
    size = 2 * shutil.disk_usage(tmp_path).free
    files = fake_files()
    files[(DIT.repo, DIT.filename)].size = size
    _sparse(target(tmp_path, DIT), size)
    with HubServer(files) as hub:
        checkpoints.check_room(SPEC.files(False), tmp_path, endpoint=hub.endpoint)


def test_room_is_not_checked_offline_and_the_hub_not_asked(tmp_path):
    files = fake_files()
    files[(DIT.repo, DIT.filename)].size = 1 << 60  # would not fit
    with HubServer(files) as hub:
        checkpoints.check_room(SPEC.files(False), tmp_path, endpoint=hub.endpoint, offline=True)
        assert hub.requests == []


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir() or Path("/dev/shm").stat().st_dev == Path("/tmp").stat().st_dev,
    reason="needs /dev/shm on a file system of its own",
)
def test_the_disk_check_reserve_is_nothing_for_a_cache_on_another_real_file_system(tmp_path):
    # /proc has no size at all; a network volume (here /dev/shm) has one, which is not the root's.
    assert shutil.disk_usage("/dev/shm").total > 0
    assert checkpoints.disk_check_reserve(tmp_path, 10.0, root=Path("/dev/shm")) == 0


def test_a_model_dir_keeps_working_when_the_volume_is_mounted_elsewhere(hub, tmp_path):
    # /runpod-volume on serverless workers, /workspace on pods: the links must be relative.
    model_dir = ensure_checkpoints(SPEC, False, tmp_path / "volume", endpoint=hub.endpoint)
    (tmp_path / "volume").rename(tmp_path / "workspace")
    assert_model_dir(tmp_path / "workspace" / model_dir.relative_to(tmp_path / "volume"), hub)


@pytest.mark.parametrize(("value", "offline"), [("true", True), (" Yes", True), ("on", True), ("0", False)])
def test_offline_mode_takes_the_words_huggingface_hub_takes(value, offline):
    assert checkpoints.hub_offline({"HF_HUB_OFFLINE": value}) is offline


def test_a_file_missing_on_the_hub_is_asked_for_once(tmp_path):
    # No retry can bring it: three tries only made the start slower (5 and 30 s pauses in production).
    files = fake_files()
    del files[(DIT.repo, DIT.filename)]
    with HubServer(files) as hub, pytest.raises(CheckpointDownloadError, match="does not exist"):
        ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    asked = [r for r in hub.requests if r.file is None]  # the requests for a file it does not have
    assert len(asked) == 1, asked


def test_default_cache_dir_follows_env_then_volume_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("CACHE_DIR")
    monkeypatch.setattr(checkpoints, "RUNPOD_VOLUME", tmp_path / "volume")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "turbovideo"
    (tmp_path / "volume").mkdir()
    assert default_cache_dir() == tmp_path / "volume" / "turbovideo"


@pytest.mark.parametrize(
    ("damaged", "offline"),
    [(True, False), (True, True), (False, False)],
    ids=["damaged", "offline", "intact"],
)
def test_a_cached_file_that_fails_to_load_is_checked_against_its_sha256(hub, tmp_path, damaged, offline):
    from turbovideo.worker.startup import create_handler

    ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    lfs = [f for f in SPEC.files(False) if hub.files[(f.repo, f.filename)].lfs]
    if damaged:  # a byte flipped on the volume; the size still matches the marker
        for f in lfs:
            data = bytearray(target(tmp_path, f).read_bytes())
            data[100] ^= 0xFF
            target(tmp_path, f).write_bytes(data)
    env = {"MODELS": SPEC.name, "CACHE_DIR": str(tmp_path), "CHECKPOINT_VARIANT": "bf16"}
    env |= {"HF_HUB_OFFLINE": "1"} if offline else {"HF_ENDPOINT": hub.endpoint}
    answer = create_handler(env)({"id": "j", "input": {"prompt": "a"}})
    gone = [f for f in SPEC.files(False) if not target(tmp_path, f).exists()]
    if damaged and not offline:  # removed; the replacement worker downloads it again
        assert answer["refresh_worker"] is True and "so it was removed" in answer["error"]
        assert len(gone) == 1 and gone[0] in lfs and not marker(tmp_path, gone[0]).exists()
        return
    assert "refresh_worker" not in answer and gone == []
    if offline:  # nobody could download it again: left for a person to replace
        assert answer["error"].endswith("(offline mode, HF_HUB_OFFLINE, forbids downloading it again)")
    else:  # the fake files are not checkpoints, but exactly as the Hub serves them
        assert "downloading it again would not help" in answer["error"]


@pytest.mark.parametrize("endpoint", ["huggingface.co", "htps://huggingface.co"])
def test_an_hf_endpoint_without_http_is_a_setting_not_an_outage(tmp_path, endpoint):
    with pytest.raises(CheckpointDownloadError) as info:
        ensure_checkpoints(SPEC, False, tmp_path, endpoint=endpoint)
    assert not info.value.transient and not info.value.retry  # a replacement worker fails the same way
    assert "HF_ENDPOINT" in str(info.value)


def test_huggingface_hubs_own_offline_switch_is_honoured(tmp_path, monkeypatch):
    # huggingface_hub also goes offline on TRANSFORMERS_OFFLINE (read when it is imported).
    assert checkpoints.hub_offline({"TRANSFORMERS_OFFLINE": "1"})
    assert not checkpoints.hub_offline({"TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "0"})
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointDownloadError) as info:
        ensure_checkpoints(SPEC, False, tmp_path, endpoint="http://127.0.0.1:9", offline=False)
    assert not info.value.transient


def test_an_io_error_reading_an_intact_cached_file_asks_for_a_fresh_worker(hub, tmp_path, monkeypatch):
    # The network volume fails one read (EIO) while a worker loads its checkpoints. The file is fine.
    import builtins
    import errno

    from turbovideo.models.checkpoint import CheckpointError, read_state_dict
    from turbovideo.worker.config import load_config
    from turbovideo.worker.startup import _heal_or_describe

    model_dir = ensure_checkpoints(SPEC, False, tmp_path, endpoint=hub.endpoint)
    real_open = builtins.open

    def flaky_open(file, *args, **kwargs):
        if str(file).endswith(DIT.filename):
            raise OSError(errno.EIO, "Input/output error", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", flaky_open)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(model_dir / DIT.filename)
    monkeypatch.setattr(builtins, "open", real_open)
    config = load_config({"MODELS": SPEC.name, "CACHE_DIR": str(tmp_path), "HF_ENDPOINT": hub.endpoint})
    failure = _heal_or_describe(info.value, config)
    assert failure.refresh, failure.message  # a fresh worker reads it fine; this one must not eat every job
    assert "worker version" not in failure.message
    assert target(tmp_path, DIT).exists() and marker(tmp_path, DIT).exists()  # nothing removed


def test_offline_by_transformers_offline_names_that_variable(tmp_path, monkeypatch):
    # A base image's TRANSFORMERS_OFFLINE=1 puts the worker offline; HF_HUB_OFFLINE is not set at all.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(CheckpointDownloadError, match=r"offline mode \(TRANSFORMERS_OFFLINE\)"):
        ensure_checkpoints(SPEC, False, tmp_path)
