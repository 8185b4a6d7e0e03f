"""Delivery: uploads to an S3 server on loopback (moto), presigned URLs, and nothing lost on failure."""

import logging
import shutil
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import botocore.endpoint
import pytest
from botocore.exceptions import EndpointConnectionError
from s3_server import dead_endpoint, loopback_s3, loopback_s3_with_keys, silent_endpoint

from turbovideo.worker import storage as storage_module
from turbovideo.worker.config import BucketConfig, ConfigError
from turbovideo.worker.storage import BucketStorage, LocalStorage, UploadError, region_for, safe_job_id

ACCESS_KEY = "AKIATESTWORKER0001"
SECRET_KEY = "s3cr3t-worker-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def s3_endpoint():
    with loopback_s3(ACCESS_KEY, SECRET_KEY) as (endpoint, _):
        yield endpoint


def bucket_at(endpoint: str, prefix: str = "renders") -> BucketConfig:
    return BucketConfig(endpoint, ACCESS_KEY, SECRET_KEY, "videos", prefix)


@pytest.fixture
def job_files(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    videos = [scratch / f"video_{i}.mp4" for i in range(2)]
    for i, path in enumerate(videos):
        path.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes([i]) * 5000)
    thumbnail = scratch / "thumb.jpg"
    thumbnail.write_bytes(b"\xff\xd8\xff\xe0" + b"j" * 300)
    return videos, thumbnail


def test_upload_and_presigned_urls_return_the_same_bytes(s3_endpoint, job_files, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    videos, thumbnail = job_files
    originals = [p.read_bytes() for p in [*videos, thumbnail]]
    storage = BucketStorage(bucket_at(s3_endpoint), tmp_path / "durable")
    sent_headers = []
    storage.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent_headers.append(request.headers)
    )

    fields = storage.deliver("job-1", videos, thumbnail, expires_in=10**9)

    assert set(fields) == {"video_url", "videos", "thumbnail_url"}
    assert fields["videos"][0] == fields["video_url"]
    for url, original, content_type in zip(
        [*fields["videos"], fields["thumbnail_url"]],
        originals,
        ["video/mp4", "video/mp4", "image/jpeg"],
        strict=True,
    ):
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.read() == original
            assert answer.headers["Content-Type"] == content_type
    paths = [urlsplit(u).path for u in [*fields["videos"], fields["thumbnail_url"]]]
    assert paths == [
        "/videos/renders/job-1/sample_0.mp4",
        "/videos/renders/job-1/sample_1.mp4",
        "/videos/renders/job-1/thumbnail.jpg",
    ]
    query = parse_qs(urlsplit(fields["video_url"]).query)
    assert query["X-Amz-Expires"] == ["604800"]  # clamped to 7 days
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    # No checksum headers (R2 and other S3 look-alikes reject boto3's default CRC32).
    assert len(sent_headers) == 3
    assert not [name for headers in sent_headers for name in headers if "checksum" in name.lower()]
    # Logs name the objects but never the signature or the keys.
    assert "s3://videos/renders/job-1/sample_0.mp4" in caplog.text
    for secret in (SECRET_KEY, ACCESS_KEY, query["X-Amz-Signature"][0]):
        assert secret not in caplog.text


def test_single_sample_has_no_list_and_short_lifetimes_are_kept(s3_endpoint, job_files, tmp_path):
    videos, thumbnail = job_files
    storage = BucketStorage(bucket_at(s3_endpoint, prefix=""), tmp_path / "durable")
    fields = storage.deliver("job-2", videos[:1], thumbnail, expires_in=60)
    assert set(fields) == {"video_url", "thumbnail_url"}
    assert urlsplit(fields["video_url"]).path == "/videos/job-2/sample_0.mp4"
    assert parse_qs(urlsplit(fields["video_url"]).query)["X-Amz-Expires"] == ["60"]


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read()


@pytest.mark.parametrize("fresh_folders", [True, False], ids=["local-run", "on-runpod"])
def test_a_job_id_run_again_locally_keeps_the_first_runs_objects(
    s3_endpoint, job_files, tmp_path, fresh_folders
):
    videos, thumbnail = job_files
    storage = BucketStorage(bucket_at(s3_endpoint), tmp_path / "durable", fresh_folders=fresh_folders)
    runs = []
    for run in range(3):  # --test_input's job id is local_test every time
        videos[0].write_bytes(b"run %d" % run)
        runs.append(storage.deliver("local_test", videos[:1], thumbnail, expires_in=60)["video_url"])
    folders = [urlsplit(url).path.rsplit("/", 2)[1] for url in runs]
    if fresh_folders:
        assert folders == ["local_test", "local_test-2", "local_test-3"]
        assert [_fetch(url) for url in runs] == [b"run 0", b"run 1", b"run 2"]
    else:  # a retried RunPod job replaces its own earlier attempt
        assert folders == ["local_test"] * 3
        assert _fetch(runs[0]) == b"run 2"


def test_server_down_keeps_the_files_and_says_where(job_files, tmp_path):
    dead = dead_endpoint()
    videos, thumbnail = job_files
    contents = [p.read_bytes() for p in videos]
    storage = BucketStorage(bucket_at(dead), tmp_path / "durable", attempts=2)
    with pytest.raises(UploadError) as caught:
        storage.deliver("job-3", videos, thumbnail, expires_in=60)
    kept = tmp_path / "durable" / "job-3"
    assert str(kept) in str(caught.value) and "'videos'" in str(caught.value)
    assert [(kept / p.name).read_bytes() for p in videos] == contents
    assert (kept / thumbnail.name).exists()


def test_the_start_up_check_refuses_a_bucket_that_is_not_there_and_only_warns_otherwise(
    s3_endpoint, tmp_path, caplog, monkeypatch
):
    BucketStorage(bucket_at(s3_endpoint), tmp_path).check()  # there: silent
    missing = BucketConfig(s3_endpoint, ACCESS_KEY, SECRET_KEY, "vidoes", "")
    with pytest.raises(ConfigError) as caught:
        BucketStorage(missing, tmp_path).check()
    assert str(caught.value) == (
        f"BUCKET_NAME 'vidoes' is not a bucket at {s3_endpoint}: create it or correct BUCKET_NAME (NoSuchBucket)"
    )
    caplog.set_level(logging.WARNING)
    dead = BucketStorage(bucket_at(dead_endpoint()), tmp_path)
    sent, real_client = [], storage_module._client

    def counting_client(*args, **kwargs):
        client = real_client(*args, **kwargs)
        client.meta.events.register("before-send.s3.ListObjectsV2", lambda **_: sent.append(1))
        return client

    monkeypatch.setattr(storage_module, "_client", counting_client)
    started = time.monotonic()
    dead.check()  # unreachable now: the uploads decide
    assert time.monotonic() - started < 5
    assert len(sent) == 1  # one attempt, not the uploads' four
    assert "could not be checked (EndpointConnectionError" in caplog.text


def test_the_start_up_check_names_a_wrong_key_or_secret_and_lets_a_write_only_key_through(
    job_files, tmp_path, caplog
):
    with loopback_s3_with_keys() as (endpoint, keys):

        def storage(key_id: str, secret: str) -> BucketStorage:
            return BucketStorage(BucketConfig(endpoint, key_id, secret, "videos", ""), tmp_path / "kept")

        storage(*keys["writer"]).check()  # a key that may list: silent
        with pytest.raises(ConfigError) as caught:
            storage("AKIANOSUCHKEY0000000", keys["writer"][1]).check()
        assert (
            str(caught.value)
            == f"BUCKET_ACCESS_KEY_ID is not a key that {endpoint} knows: correct it (InvalidAccessKeyId)"
        )
        with pytest.raises(ConfigError) as caught:
            storage(keys["writer"][0], "not-the-secret").check()
        assert str(caught.value) == (
            "BUCKET_SECRET_ACCESS_KEY is not the secret of BUCKET_ACCESS_KEY_ID: correct it (SignatureDoesNotMatch)"
        )
        # A key that may put but not list: only a warning at start, and its uploads work.
        caplog.set_level(logging.WARNING)
        put_only = storage(*keys["put_only"])
        put_only.check()
        assert "could not be listed (AccessDenied); uploads will tell" in caplog.text
        videos, thumbnail = job_files
        urls = put_only.deliver("job-w", videos, thumbnail, expires_in=60)
        assert urls


def test_a_bucket_that_never_answers_is_given_up_on_at_the_deadline(job_files, tmp_path):
    videos, thumbnail = job_files
    with silent_endpoint() as endpoint:
        storage = BucketStorage(
            bucket_at(endpoint), tmp_path / "durable", attempts=4, deadline_s=0.2, read_timeout_s=1.0
        )
        started = time.monotonic()
        with pytest.raises(UploadError) as caught:
            storage.deliver("job-silent", videos, thumbnail, expires_in=60)
        elapsed = time.monotonic() - started
    # One attempt timed out; no other started past the deadline (4 would take over 4 s per file).
    assert "failed after 1 attempt (UploadDeadlinePassed: no attempt left within the 0.2 s" in str(
        caught.value
    )
    assert elapsed < 3.5
    assert sorted(p.name for p in (tmp_path / "durable" / "job-silent").iterdir()) == sorted(
        p.name for p in [*videos, thumbnail]
    )


def test_failure_mid_upload_keeps_every_file(s3_endpoint, job_files, tmp_path):
    videos, thumbnail = job_files
    storage = BucketStorage(bucket_at(s3_endpoint), tmp_path / "durable", attempts=2)
    puts = []

    def fail_after_first(request, **_):
        puts.append(request.url)
        if len(puts) > 1:
            raise EndpointConnectionError(endpoint_url=request.url)

    storage.client.meta.events.register("before-send.s3.PutObject", fail_after_first)
    with pytest.raises(UploadError, match=r"failed after 2 attempts \(EndpointConnectionError") as caught:
        storage.deliver("job-4", videos, thumbnail, expires_in=60)
    assert len(puts) == 3  # the first upload, then the second one tried twice (the error counts its own)
    kept = tmp_path / "durable" / "job-4"
    assert str(kept) in str(caught.value)
    assert sorted(p.name for p in kept.iterdir()) == ["thumb.jpg", "video_0.mp4", "video_1.mp4"]


def test_local_storage_moves_files_into_the_job_folder(job_files, tmp_path):
    videos, thumbnail = job_files
    fields = LocalStorage(tmp_path / "outputs").deliver("job-5", videos, thumbnail, expires_in=60)
    folder = (tmp_path / "outputs" / "job-5").resolve()
    assert fields == {
        "video_path": str(folder / "video_0.mp4"),
        "video_paths": [str(folder / "video_0.mp4"), str(folder / "video_1.mp4")],
        "thumbnail_path": str(folder / "thumb.jpg"),
    }
    assert all(Path(p).is_file() for p in fields["video_paths"]) and not videos[0].exists()


def test_a_job_id_delivered_again_gets_a_folder_of_its_own(tmp_path):
    def files(tag: str, samples: int) -> tuple[list[Path], Path]:
        scratch = tmp_path / f"scratch-{tag}"
        scratch.mkdir()
        videos = [scratch / f"sample_{i}.mp4" for i in range(samples)]
        for path in [*videos, scratch / "thumbnail.jpg"]:
            path.write_text(tag)
        return videos, scratch / "thumbnail.jpg"

    outputs = tmp_path / "outputs"
    (outputs / "reserved").mkdir(parents=True)  # made ahead and empty (runpod_quickstart.sh): taken as is
    local = LocalStorage(outputs)
    assert (
        Path(local.deliver("reserved", *files("r", 1), expires_in=60)["video_path"]).parent.name == "reserved"
    )
    first = local.deliver("local_test", *files("first", 2), expires_in=60)
    second = local.deliver("local_test", *files("second", 1), expires_in=60)
    third = local.deliver("local_test", *files("third", 1), expires_in=60)
    assert [Path(p).read_text() for p in first["video_paths"]] == ["first", "first"]
    assert Path(second["video_path"]).parent.name == "local_test-2"
    assert Path(third["video_path"]).parent.name == "local_test-3"
    assert sorted(p.name for p in (outputs / "local_test-2").iterdir()) == ["sample_0.mp4", "thumbnail.jpg"]
    assert Path(second["video_path"]).read_text() == "second"
    # Files a failed upload keeps follow the same rule.
    bucket = BucketStorage(bucket_at(dead_endpoint()), outputs, attempts=1)
    with pytest.raises(UploadError) as caught:
        bucket.deliver("local_test", *files("kept", 1), expires_in=60)
    assert str(caught.value).endswith(f"the video was kept at {(outputs / 'local_test-4').resolve()}")
    assert Path(first["video_path"]).read_text() == "first"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("3f9a-12bc-u1", "3f9a-12bc-u1"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("..", "job"),
        ("", "job"),
        (None, "None"),
        ("a/b c", "a_b_c"),
        ("x" * 300, "x" * 128),  # a file name's limit is 255 bytes
    ],
)
def test_job_ids_become_one_safe_path_component(raw, expected):
    assert safe_job_id(raw) == expected


@pytest.mark.parametrize(
    "endpoint, region",
    [
        ("https://0123abcd.r2.cloudflarestorage.com", "auto"),
        ("https://my-bucket.s3.us-west-2.amazonaws.com", "us-west-2"),
        ("https://s3.eu-central-1.amazonaws.com", "eu-central-1"),
        ("https://s3.amazonaws.com", "us-east-1"),
        # The region sits behind "dualstack." or a "-fips" suffix, and China's hosts end in .com.cn.
        ("https://s3.dualstack.eu-west-1.amazonaws.com", "eu-west-1"),
        ("https://my-bucket.s3-fips.dualstack.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
        ("https://s3.cn-north-1.amazonaws.com.cn", "cn-north-1"),
        ("https://s3-eu-west-1.amazonaws.com", "eu-west-1"),
        # No region in these names: "external-1" and "accelerate" are not regions.
        ("https://s3-external-1.amazonaws.com", "us-east-1"),
        ("https://my-bucket.s3-accelerate.amazonaws.com", "us-east-1"),
        ("http://127.0.0.1:9000", "us-east-1"),
    ],
)
def test_signing_region_follows_the_endpoint(endpoint, region):
    assert region_for(endpoint) == region


def test_every_upload_gets_its_retries_even_after_a_long_outage(tmp_path, monkeypatch):
    monkeypatch.setattr(botocore.endpoint.time, "sleep", lambda seconds: None)  # no backoff waits
    storage = BucketStorage(bucket_at(dead_endpoint()), tmp_path / "durable", attempts=4)
    messages = []
    for job in range(60):  # botocore's client-wide retry budget covers about 50 retried failures
        video = tmp_path / f"scratch-{job}" / "sample.mp4"
        video.parent.mkdir()
        video.write_bytes(b"v")
        (video.parent / "thumb.jpg").write_bytes(b"t")
        with pytest.raises(UploadError) as caught:
            storage.deliver(f"job-{job}", [video], video.parent / "thumb.jpg", expires_in=60)
        messages.append(str(caught.value))
    # botocore's standard mode stopped retrying after about a dozen such jobs ("after 1 attempt"), so
    # one transient error then failed a paid job that a retry would have delivered.
    assert all("failed after 4 attempts (EndpointConnectionError" in message for message in messages)


def test_a_volume_that_fills_up_leaves_no_partial_copy(job_files, tmp_path, monkeypatch):
    videos, thumbnail = job_files
    volume, spare = tmp_path / "volume", tmp_path / "spare"
    real_move = storage_module.shutil.move

    def move(source, target):
        if Path(target).is_relative_to(volume):  # a copy across filesystems, cut short by a full disk
            Path(target).write_bytes(Path(source).read_bytes()[:100])
            raise OSError(28, "No space left on device")
        return real_move(source, target)

    monkeypatch.setattr(storage_module.shutil, "move", move)
    storage = BucketStorage(bucket_at(dead_endpoint()), volume, spare_dir=spare, attempts=1)
    with pytest.raises(UploadError) as caught:
        storage.deliver("job-5", videos, thumbnail, expires_in=60)
    assert str(caught.value).endswith(f"the video was kept at {(spare / 'job-5').resolve()}")
    assert not (volume / "job-5").exists()
    assert sorted(p.name for p in (spare / "job-5").iterdir()) == ["thumb.jpg", "video_0.mp4", "video_1.mp4"]


def test_a_file_no_folder_takes_does_not_stop_the_others(job_files, tmp_path, monkeypatch):
    videos, thumbnail = job_files
    real_move = storage_module.shutil.move

    def move(source, target):
        if Path(source).name == "video_1.mp4":
            raise OSError(5, "Input/output error")
        return real_move(source, target)

    monkeypatch.setattr(storage_module.shutil, "move", move)
    storage = BucketStorage(bucket_at(dead_endpoint()), tmp_path / "volume", attempts=1)
    with pytest.raises(UploadError) as caught:
        storage.deliver("job-6", videos, thumbnail, expires_in=60)
    kept = (tmp_path / "volume" / "job-6").resolve()
    assert str(caught.value).endswith(
        f"video_1.mp4 could not be kept (OSError: [Errno 5] Input/output error); only video_0.mp4, thumb.jpg "
        f"kept, at {kept}"
    )
    assert sorted(p.name for p in kept.iterdir()) == ["thumb.jpg", "video_0.mp4"]


def test_an_output_dir_whose_link_target_was_removed_is_named_not_spun_on(job_files, tmp_path):
    target, outputs = tmp_path / "target", tmp_path / "outputs"
    target.mkdir()
    outputs.symlink_to(target)  # e.g. /app/outputs -> /workspace/outputs
    target.rmdir()  # someone cleaned up while the worker ran
    videos, thumbnail = job_files
    local = LocalStorage(outputs, spare_dir=tmp_path / "volume")
    with pytest.raises(UploadError) as caught:
        local.deliver("job-7", videos, thumbnail, expires_in=60)
    message = str(caught.value)
    assert f"saving the video in OUTPUT_DIR {outputs} failed (NotADirectoryError:" in message
    assert f"not a folder (a file, or a link to nothing): '{outputs}'" in message
    assert message.endswith(f"the video was kept at {(tmp_path / 'volume' / 'job-7').resolve()}")


def test_only_a_thumbnail_kept_is_not_called_the_video(job_files, tmp_path, monkeypatch):
    videos, thumbnail = job_files
    real_move = storage_module.shutil.move

    def move(source, target):
        if Path(source).suffix == ".mp4":
            raise OSError(28, "No space left on device")
        return real_move(source, target)

    monkeypatch.setattr(storage_module.shutil, "move", move)
    with pytest.raises(UploadError) as caught:
        LocalStorage(tmp_path / "outputs").deliver("job-8", videos[:1], thumbnail, expires_in=60)
    kept = (tmp_path / "outputs" / "job-8").resolve()
    assert str(caught.value).endswith(
        f"video_0.mp4 could not be kept (OSError: [Errno 28] No space left on device); only thumb.jpg kept, at {kept}"
    )
    assert "the video was kept" not in str(caught.value)


def test_the_fresh_folder_probe_keeps_to_the_deadline_and_counts_its_attempts(job_files, tmp_path):
    videos, thumbnail = job_files
    with silent_endpoint() as endpoint:
        storage = BucketStorage(
            bucket_at(endpoint),
            tmp_path / "durable",
            fresh_folders=True,
            attempts=4,
            deadline_s=0.2,
            read_timeout_s=1.0,
        )
        started = time.monotonic()
        with pytest.raises(UploadError) as caught:
            storage.deliver("local_test", videos, thumbnail, expires_in=60)
        elapsed = time.monotonic() - started
    assert "failed after 1 attempt (UploadDeadlinePassed" in str(caught.value)
    assert elapsed < 3.5  # four probes of 1 s each, plus backoff, without the deadline


def _job(tmp_path: Path, name: str) -> tuple[list[Path], Path]:
    """A finished job's files in a scratch folder of their own: a 1000-byte video, a 1-byte thumbnail."""
    scratch = tmp_path / f"scratch-{name}"
    scratch.mkdir()
    (scratch / "sample_0.mp4").write_bytes(b"v" * 1000)
    (scratch / "thumbnail.jpg").write_bytes(b"t")
    return [scratch / "sample_0.mp4"], scratch / "thumbnail.jpg"


def test_a_disk_nobody_reads_keeps_its_room_by_removing_answered_jobs_only(tmp_path):
    outputs = tmp_path / "outputs"
    (outputs / "mine").mkdir(parents=True)  # not a folder this storage filled: never removed

    # A reserve larger than any disk: every delivery first removes what earlier ones left.
    tight = LocalStorage(outputs, keep_free_bytes=1 << 62)
    first = tight.deliver("job-a", *_job(tmp_path, "a"), expires_in=60)
    second = tight.deliver("job-b", *_job(tmp_path, "b"), expires_in=60)
    assert not Path(first["video_path"]).parent.exists() and Path(second["video_path"]).is_file()
    assert (outputs / "mine").is_dir()
    # Without a reserve (a local run, or a volume), every job's files stay.
    keeping = LocalStorage(outputs)
    kept = [keeping.deliver(f"job-{n}", *_job(tmp_path, n), expires_in=60)["video_path"] for n in ("c", "d")]
    assert all(Path(path).is_file() for path in kept)


def test_the_reserve_counts_the_files_about_to_arrive(tmp_path, monkeypatch):
    outputs, reserve, size = tmp_path / "outputs", 10_000, 1001  # a job's two files

    # A disk with room for the reserve and three jobs but one byte: its free space is what is not in use.
    capacity = reserve + 3 * size - 1
    used = lambda: sum(f.stat().st_size for f in outputs.rglob("*") if f.is_file())  # noqa: E731
    monkeypatch.setattr(
        storage_module.shutil,
        "disk_usage",
        lambda path: shutil._ntuple_diskusage(capacity, used(), capacity - used()),
    )
    tight = LocalStorage(outputs, keep_free_bytes=reserve)
    paths = [Path(tight.deliver(f"job-{n}", *_job(tmp_path, n), expires_in=60)["video_path"]) for n in "abc"]
    # The third job's files would have left one byte less than the reserve: the oldest job made room.
    assert [path.is_file() for path in paths] == [False, True, True]


def test_a_move_that_fails_after_the_file_arrived_keeps_it(tmp_path, monkeypatch):
    # E.g. a move across filesystems whose copy landed and whose source went: the copy is the only one.
    video = tmp_path / "scratch" / "sample_0.mp4"
    video.parent.mkdir()
    video.write_bytes(b"the only copy")
    real_move = storage_module.shutil.move

    def move_then_fail(source, target):
        real_move(source, target)
        raise OSError("failed after the move")

    monkeypatch.setattr(storage_module.shutil, "move", move_then_fail)
    storage_module.keep_files("job-x", [video], [tmp_path / "kept"])
    assert [p.read_bytes() for p in (tmp_path / "kept").rglob("*.mp4")] == [b"the only copy"]
