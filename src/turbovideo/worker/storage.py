"""Where finished videos go: an S3-compatible bucket (presigned URLs back) or a local folder.

A generation writes into a scratch folder; delivery then moves the files to their final place.
Nothing is lost on the way: when an upload fails for good, the files are moved to a durable folder
(the network volume when one is mounted; the worker's own disk if that fails too) and the error says where.
Without a bucket, a local folder that refuses the files (a full disk) hands them to the volume the same way.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from turbovideo.errors import one_line
from turbovideo.worker.config import BucketConfig, ConfigError
from turbovideo.worker.schema import MAX_EXPIRES_S

logger = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 4  # botocore's legacy mode retries with jittered exponential backoff
# A job's whole upload: past it no attempt starts, and the files are kept instead. Without it a bucket
# that accepts connections but never answers held a job for 4 attempts x 60 s per file.
UPLOAD_DEADLINE_S = 180.0
READ_TIMEOUT_S = 60.0
# A bucket service's answers that mean a setting is wrong (not a permission, not the network).
_WRONG_SETTING = {
    "NoSuchBucket": "BUCKET_NAME {name!r} is not a bucket at {endpoint}: create it or correct BUCKET_NAME",
    "InvalidAccessKeyId": "BUCKET_ACCESS_KEY_ID is not a key that {endpoint} knows: correct it",
    "SignatureDoesNotMatch": "BUCKET_SECRET_ACCESS_KEY is not the secret of BUCKET_ACCESS_KEY_ID: correct it",
}
_CONTENT_TYPES = {".mp4": "video/mp4", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
# s3.<region>, s3-<region>, s3.dualstack.<region>, s3-fips.<region>, ... (.com.cn in China). A name such
# as s3-external-1 or s3-accelerate holds no region to sign with ("external-1" is none).
_AWS_HOST = re.compile(
    r"(?:^|\.)s3(?:-fips)?[.-](?:dualstack\.)?(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?$"
)


class UploadError(RuntimeError):
    """The bucket did not take the files; the message names the bucket and where the files were kept."""


class UploadDeadlinePassed(BotoCoreError):
    fmt = "no attempt left within the {seconds:g} s an upload may take"


class Storage(Protocol):
    def deliver(
        self,
        job_id: str,
        videos: list[Path],
        thumbnail: Path,
        expires_in: int,
        check_stop: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Move the job's files to their final place and return the response fields naming them.
        ``check_stop`` raises once the job is stopped; no upload (or retry) starts after it has."""


def safe_job_id(job_id: Any) -> str:
    """A job id usable as one path component and one key segment (ids come from outside)."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", str(job_id))[:128].lstrip(".")
    return text or "job"


def _run_names(job_id: str) -> Iterator[str]:
    """``job_id``, ``job_id-2``, ``job_id-3``, ...: the folder names of a job id's runs, in order."""
    yield job_id
    for run in itertools.count(2):
        yield f"{job_id}-{run}"


def claim_folder(parent: Path, job_id: str) -> Path:
    """A folder of ``parent`` for this run of job ``job_id``: ``<job_id>``, or ``<job_id>-2``, ``-3``, ...
    when an earlier run (the same id run again: ``--test_input``'s ``local_test``, a local API job whose
    ``/status`` was asked twice) holds it, so no run replaces or mixes with another's files. A folder made
    ahead and left empty (``runpod_quickstart.sh`` reserves its job's) is taken as it is."""
    return next(folder for folder in map(parent.joinpath, _run_names(job_id)) if _take(folder))


def _take(folder: Path) -> bool:
    """Make ``folder``, or take it as it is when it is an empty folder already."""
    try:
        folder.mkdir(parents=True)
        return True
    except FileExistsError as exc:
        if exc.filename is not None and Path(exc.filename) != folder:
            # A folder above it is a file or a link to nowhere (OUTPUT_DIR's target removed): no name of
            # this run's would ever be free, so say what is wrong instead of trying the next.
            raise NotADirectoryError(
                errno.ENOTDIR, "not a folder (a file, or a link to nothing)", exc.filename
            ) from None
        return folder.is_dir() and not any(folder.iterdir())


def move_files(files: list[Path], folder: Path) -> list[Path]:
    """Move ``files`` into ``folder`` (created) and return the new paths."""
    folder.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in files:
        target = folder / path.name
        shutil.move(str(path), str(target))
        moved.append(target.resolve())
    return moved


class LocalStorage:
    """No bucket: videos stay in ``OUTPUT_DIR/<job_id>/`` and the response names their paths. When
    OUTPUT_DIR refuses them (a full or read-only disk), they are kept in ``spare_dir`` if it takes them.

    ``keep_free_bytes`` (a disk nobody reads once a job is answered: a RunPod worker's own): before each
    delivery, the oldest job folders this storage filled are removed while the disk has less than that
    free beyond the new files, so that a long-lived worker does not fill its disk and fail a job.
    Nothing else in OUTPUT_DIR is ever removed."""

    def __init__(self, output_dir: Path, *, spare_dir: Path | None = None, keep_free_bytes: int = 0) -> None:
        self.output_dir = output_dir
        self.keep_dirs = [output_dir] + ([spare_dir] if spare_dir and spare_dir != output_dir else [])
        self.keep_free_bytes = keep_free_bytes
        self._delivered: collections.deque[Path] = collections.deque()

    def deliver(
        self,
        job_id: str,
        videos: list[Path],
        thumbnail: Path,
        expires_in: int,
        check_stop: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        files = [*videos, thumbnail]
        if self.keep_free_bytes:
            self._make_room(sum(path.stat().st_size for path in files))
        claimed: dict[Path, Path] = {}
        try:
            claimed[self.output_dir] = folder = claim_folder(self.output_dir, job_id)
            *video_paths, thumbnail_path = move_files(files, folder)
        except OSError as exc:
            failure = f"saving the video in OUTPUT_DIR {self.output_dir} failed ({type(exc).__name__}: {one_line(str(exc), 200)})"
            # Files that made it stay; the rest try this run's folder once more, then the spare folder.
            moved = claimed.get(self.output_dir)
            where = [path if path.exists() or moved is None else moved / path.name for path in files]
            kept = keep_files(job_id, where, self.keep_dirs, claimed)
            raise UploadError(f"{failure}; {kept}") from exc
        if self.keep_free_bytes:
            self._delivered.append(folder)
        fields: dict[str, Any] = {"video_path": str(video_paths[0]), "thumbnail_path": str(thumbnail_path)}
        if len(video_paths) > 1:
            fields["video_paths"] = [str(p) for p in video_paths]
        return fields

    def _make_room(self, needed: int) -> None:
        while self._delivered:
            try:
                if shutil.disk_usage(self.output_dir).free >= needed + self.keep_free_bytes:
                    return
            except OSError:  # the delivery itself says what is wrong with OUTPUT_DIR
                return
            folder = self._delivered.popleft()
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed %s, an answered job's, to keep room on this worker's disk", folder)


class BucketStorage:
    """Uploads to ``{prefix}/{job_id}/sample_{i}.mp4`` and ``thumbnail.jpg`` and answers presigned GET URLs.

    ``fresh_folders`` (local runs): a job id whose folder the bucket already holds uploads to
    ``{job_id}-2/``, ``-3/``, ..., as LocalStorage does, so running ``--test_input`` again never
    replaces the objects an earlier answer's URLs point at. On RunPod job ids are unique, and a
    retried job replaces its own earlier attempt.
    """

    def __init__(
        self,
        bucket: BucketConfig,
        durable_dir: Path,
        *,
        fresh_folders: bool = False,
        spare_dir: Path | None = None,
        attempts: int = UPLOAD_ATTEMPTS,
        deadline_s: float = UPLOAD_DEADLINE_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self.bucket = bucket
        self.fresh_folders = fresh_folders
        self.deadline_s = deadline_s
        # Where files of a failed upload go: the durable folder, else the spare (e.g. a full volume).
        self.keep_dirs = [durable_dir] + ([spare_dir] if spare_dir and spare_dir != durable_dir else [])
        self.client = _client(bucket, attempts, read_timeout_s)
        # Requests actually sent for the current file (what the error reports).
        self._sends = 0
        self._give_up_at = float("inf")
        self._check_stop: Callable[[], None] | None = None
        # Every request of a delivery (the fresh-folder probes too) counts against its deadline and stop.
        for operation in ("HeadObject", "PutObject"):
            self.client.meta.events.register(f"before-send.s3.{operation}", self._before_send)

    def check(self) -> None:
        """Raise ``ConfigError`` when a setting keeps the bucket from taking any upload (no such bucket,
        an unknown key, a wrong secret), so the worker says so at start instead of after each job's
        video. Anything else (a key allowed to write but not to list, an unreachable service) is only
        logged: the uploads decide, and keep the files if they fail."""
        endpoint = self.bucket.endpoint_url
        try:
            _client(self.bucket, attempts=1).list_objects_v2(Bucket=self.bucket.name, MaxKeys=1)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _WRONG_SETTING:
                raise ConfigError(
                    f"{_WRONG_SETTING[code].format(name=self.bucket.name, endpoint=endpoint)} ({code})"
                ) from None
            logger.warning(
                "bucket %r at %s could not be listed (%s); uploads will tell",
                self.bucket.name,
                endpoint,
                code,
            )
        except (BotoCoreError, OSError) as exc:
            logger.warning(
                "bucket %r at %s could not be checked (%s: %s); uploads will tell",
                self.bucket.name,
                endpoint,
                type(exc).__name__,
                one_line(str(exc), 200),
            )

    def key(self, job_id: str, filename: str) -> str:
        return "/".join(part for part in (self.bucket.prefix, job_id, filename) if part)

    def deliver(
        self,
        job_id: str,
        videos: list[Path],
        thumbnail: Path,
        expires_in: int,
        check_stop: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        uploads = [(path, f"sample_{i}.mp4") for i, path in enumerate(videos)] + [
            (thumbnail, "thumbnail.jpg")
        ]
        self._give_up_at = time.monotonic() + self.deadline_s
        self._check_stop = check_stop
        self._sends = 0
        folder = job_id
        try:
            if self.fresh_folders:
                folder = self._unused_folder(job_id)
            for path, name in uploads:
                self._put(path, self.key(folder, name))
        except (BotoCoreError, ClientError, OSError) as exc:
            tries = f" after {self._sends} attempt{'s' * (self._sends != 1)}" if self._sends else ""
            failure = f"upload to bucket {self.bucket.name!r} failed{tries} ({type(exc).__name__}: {one_line(str(exc))})"
            raise UploadError(
                f"{failure}; {keep_files(job_id, [*videos, thumbnail], self.keep_dirs)}"
            ) from exc
        finally:
            self._check_stop = None
        lifetime = max(1, min(expires_in, MAX_EXPIRES_S))
        urls = [self._presign(self.key(folder, name), lifetime) for _, name in uploads]
        *video_urls, thumbnail_url = urls
        fields: dict[str, Any] = {"video_url": video_urls[0], "thumbnail_url": thumbnail_url}
        if len(video_urls) > 1:
            fields["videos"] = video_urls
        return fields

    def _before_send(self, **_: Any) -> None:
        # Raised here, the error ends the call at once: botocore retries only its own HTTP errors.
        if self._check_stop is not None:
            self._check_stop()  # a stopped job's error passes through botocore to the caller as it is
        if time.monotonic() > self._give_up_at:
            raise UploadDeadlinePassed(seconds=self.deadline_s)
        self._sends += 1

    def _unused_folder(self, job_id: str) -> str:
        """The first of ``_run_names(job_id)`` whose first video is not in the bucket."""
        return next(folder for folder in _run_names(job_id) if not self._holds(folder))

    def _holds(self, folder: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket.name, Key=self.key(folder, "sample_0.mp4"))
        except ClientError:  # not there (404), or a key not allowed to list the bucket (403)
            return False
        return True

    def _put(self, path: Path, key: str) -> None:
        self._sends = 0
        content_type = _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        with path.open("rb") as body:
            self.client.put_object(Bucket=self.bucket.name, Key=key, Body=body, ContentType=content_type)
        # The bucket and key only: a URL with its query string would carry a signature.
        logger.info("uploaded s3://%s/%s (%d bytes)", self.bucket.name, key, path.stat().st_size)

    def _presign(self, key: str, lifetime_s: int) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket.name, "Key": key}, ExpiresIn=lifetime_s
        )


def _client(bucket: BucketConfig, attempts: int, read_timeout_s: float = READ_TIMEOUT_S) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=bucket.endpoint_url,
        aws_access_key_id=bucket.access_key_id,
        aws_secret_access_key=bucket.secret_access_key,
        region_name=region_for(bucket.endpoint_url),
        config=Config(
            signature_version="s3v4",
            # boto3 >= 1.36 adds CRC32 checksum headers that R2 and other S3 look-alikes reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # "legacy": every request gets its retries. Standard mode draws them from a client-wide
            # budget that about a dozen failed uploads spend, after which even one 500 is final.
            retries={"mode": "legacy", "total_max_attempts": attempts},
            connect_timeout=10,
            read_timeout=read_timeout_s,
        ),
    )


def keep_files(
    job_id: str, files: list[Path], folders: list[Path], claimed: dict[Path, Path] | None = None
) -> str:
    """Move each file of a failed delivery into this run's folder (``claim_folder``) of the first of
    ``folders`` that takes it; says where. ``claimed`` maps folders to the run's folder already taken there."""
    claimed = {} if claimed is None else claimed
    held: dict[Path, None] = {}  # folders that took files, in order
    kept_names: list[str] = []
    lost: list[str] = []
    error: OSError | None = None
    for path in files:
        for folder in folders:
            target: Path | None = None
            try:
                if folder not in claimed:
                    claimed[folder] = claim_folder(folder, job_id)
                target = claimed[folder]
                held[move_files([path], target)[0].parent] = None
                kept_names.append(path.name)
                break
            except OSError as exc:  # e.g. a full or read-only volume
                logger.warning("could not keep %s of job %s in %s: %s", path.name, job_id, folder, exc)
                error = exc
                if target is not None:
                    _discard_partial(target / path.name, path)
        else:
            lost.append(path.name)
    where = " and ".join(map(str, held))
    if not lost:
        return f"the video was kept at {where}"
    reason = f"({type(error).__name__}: {one_line(str(error), 200)})"
    if not held:
        return f"keeping the files failed too {reason}; the video is lost"
    not_kept = f"{', '.join(lost)} could not be kept {reason}"
    if any(name.endswith(".mp4") for name in lost):  # say "the video was kept" only of a whole video
        return f"{not_kept}; only {', '.join(kept_names)} kept, at {where}"
    return f"the video was kept at {where}; {not_kept}"


def _discard_partial(target: Path, source: Path) -> None:
    """Remove what a failed move left at ``target`` (a copy cut short across filesystems) while the
    source is still whole, and the folder if that is now empty."""
    try:
        if source.exists():
            target.unlink(missing_ok=True)
        target.parent.rmdir()
    except OSError:
        pass  # nothing there, a folder that holds other files, or a path that is no folder


def region_for(endpoint_url: str) -> str:
    """The signing region: ``auto`` for R2, the region in an AWS host name, else us-east-1."""
    host = (urlsplit(endpoint_url).hostname or "").lower()
    if host.endswith(".r2.cloudflarestorage.com"):
        return "auto"
    match = _AWS_HOST.search(host)
    return match.group("region") if match else "us-east-1"
