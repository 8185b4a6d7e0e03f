"""Worker settings read from the environment, once, at start.

Every variable the README documents is checked here, so a typo in the endpoint's settings becomes one
``ConfigError`` sentence instead of a surprise in the middle of a job. A few are read where they act,
with the same rules: CACHE_DIR and the Hub's (checkpoints.py, hub_transfer.py), TRITON_CACHE_DIR and
TORCHINDUCTOR_CACHE_DIR (compile_cache.py), RUNPOD_POD_ID (locking.py names a lock's owner by it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from turbovideo.catalog import ALIASES, MODELS, ModelSpec, prefer_quantized, resolve_models
from turbovideo.worker.checkpoints import RUNPOD_VOLUME, default_cache_dir, hub_offline
from turbovideo.worker.hub_transfer import hub_setting_problem
from turbovideo.worker.logs import secret_values

VARIANTS = ("auto", "bf16", "quant")
_BUCKET_VARS = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "BUCKET_NAME")
# The runpod SDK's levels. It reads RUNPOD_LOG_LEVEL when imported and raises on any other value (WARNING,
# an empty one), which stopped the worker with a traceback before it could answer a job.
SDK_LOG_LEVELS = ("NOTSET", "TRACE", "DEBUG", "INFO", "WARN", "ERROR")


class ConfigError(ValueError):
    """A worker variable is missing or invalid; the message names the variable and the fix."""


@dataclass(frozen=True)
class BucketConfig:
    """An S3-compatible bucket (Cloudflare R2, AWS S3, MinIO, ...) that finished videos go to."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    name: str
    prefix: str = ""


@dataclass(frozen=True)
class WorkerConfig:
    models: tuple[ModelSpec, ...]
    variant: str  # one of VARIANTS
    hf_token: str | None
    cache_dir: Path
    offline: bool
    bucket: BucketConfig | None
    output_dir: Path
    durable_dir: Path  # where videos are kept when an upload fails
    on_runpod: bool
    report_progress: bool
    sp_degree: int | None = None  # GPUs one request spreads over; None: every visible GPU
    warm_up: bool | None = None  # one throwaway generation per model at start; None: on a GPU
    disk_check_percent: float = 0.0  # free % of / that RunPod's disk fitness check needs (0: it does not run)
    # available GiB that RunPod's memory fitness check needs (0: it does not run)
    memory_check_gib: float = 0.0
    secrets: tuple[str, ...] = ()  # values no log line may show (logs.secret_values)
    # Videos kept without a bucket land on the worker's own disk, which nobody reaches once a job is
    # answered (on RunPod, OUTPUT_DIR not on the network volume).
    outputs_on_worker_disk: bool = False


def is_on_runpod(env: Mapping[str, str]) -> bool:
    return bool(env.get("RUNPOD_POD_ID")) or in_job_loop(env)


def load_config(env: Mapping[str, str] | None = None) -> WorkerConfig:
    """Read and check every worker variable; raises ``ConfigError`` naming the variable to fix."""
    env = os.environ if env is None else env
    if problem := hub_setting_problem(env):
        raise ConfigError(problem)
    _check_sdk_log_level(env.get("RUNPOD_LOG_LEVEL", ""))
    _check_system_check_numbers(env)
    on_runpod = is_on_runpod(env)
    cache_dir = default_cache_dir(env)
    _nearest_folder("CACHE_DIR", cache_dir)  # may be read-only (a pre-seeded cache), never a file
    bucket = _bucket(env)
    output_dir = Path(env.get("OUTPUT_DIR", "").strip() or "outputs").expanduser()
    durable_dir = _durable_dir(cache_dir, output_dir)
    # Videos go there without a bucket; with one, it keeps what a failed upload left when no network
    # volume does (a spare to the volume otherwise, which need not hold up the start).
    if bucket is None or durable_dir == output_dir:
        _check_output_dir(output_dir, for_uploads=bucket is not None)
    return WorkerConfig(
        models=_served_models(env.get("MODELS", "").strip(), on_runpod),
        variant=_variant(env.get("CHECKPOINT_VARIANT", "auto")),
        hf_token=_hf_token(env.get("HF_TOKEN", "")),
        cache_dir=cache_dir,
        offline=hub_offline(env),
        bucket=bucket,
        output_dir=output_dir,
        durable_dir=durable_dir,
        on_runpod=on_runpod,
        report_progress=bool(env.get("RUNPOD_WEBHOOK_POST_OUTPUT")),
        sp_degree=_sp_degree(env.get("SP_DEGREE", "")),
        warm_up=_warm_up_choice(env.get("WARMUP", "")),
        disk_check_percent=_disk_check_percent(env),
        memory_check_gib=_memory_check_gib(env),
        secrets=tuple(secret_values(env)),
        outputs_on_worker_disk=on_runpod and bucket is None and not on_network_volume(output_dir),
    )


def in_job_loop(env: Mapping[str, str]) -> bool:
    """Whether the runpod SDK runs RunPod's job loop (production: RUNPOD_WEBHOOK_GET_JOB set, even empty,
    as the SDK tells), where its fitness checks run once the start is done."""
    return env.get("RUNPOD_WEBHOOK_GET_JOB") is not None


def system_checks_run(env: Mapping[str, str]) -> bool:
    """Whether the runpod SDK runs its system fitness checks (free memory, free disk, network) once the
    start is done: only in production (RUNPOD_WEBHOOK_GET_JOB set), unless RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true.
    A failed check stops the worker (os._exit) before it takes a job."""
    return in_job_loop(env) and env.get("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "").lower() != "true"


# What the runpod SDK reads with float() or int() when it imports its system fitness checks, i.e. after
# the start and only when they run (system_checks_run): any other value then stopped the worker with a
# traceback, the models loaded and no job answered. Defaults as in the SDK.
_SYSTEM_CHECK_NUMBERS: dict[str, tuple[type, str]] = {
    "RUNPOD_MIN_MEMORY_GB": (float, "4.0"),
    "RUNPOD_MIN_DISK_PERCENT": (float, "10.0"),
    "RUNPOD_NETWORK_CHECK_TIMEOUT": (int, "5"),
    "RUNPOD_GPU_BENCHMARK_TIMEOUT": (int, "2"),
}
# The same for its GPU check, which it imports in every job loop (in_job_loop), whatever
# RUNPOD_SKIP_AUTO_SYSTEM_CHECKS or RUNPOD_SKIP_GPU_CHECK say, and on hosts without a GPU too.
_GPU_CHECK_NUMBERS: dict[str, tuple[type, str]] = {
    "RUNPOD_GPU_TEST_TIMEOUT": (int, "30"),
    "RUNPOD_GPU_MAX_ERROR_MESSAGES": (int, "10"),
}


def _system_check_number(env: Mapping[str, str], name: str) -> float:
    """``name`` as the SDK's fitness checks read it; 0 when they do not run."""
    if name in _GPU_CHECK_NUMBERS:
        kind, default = _GPU_CHECK_NUMBERS[name]
        read, off = in_job_loop(env), ""
    else:
        kind, default = _SYSTEM_CHECK_NUMBERS[name]
        read, off = (
            system_checks_run(env),
            " (RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true turns the SDK's system checks off)",
        )
    if not read:
        return 0.0
    value = env.get(name, default)
    try:
        number = kind(value)
    except ValueError:
        what = "a number" if kind is float else "a whole number"
        raise ConfigError(
            f"{name}={value!r} is not valid: the runpod SDK reads it as {what} (default {default}); fix or "
            f"unset it{off}"
        ) from None
    return max(0.0, number)


def _check_system_check_numbers(env: Mapping[str, str]) -> None:
    for name in [*_SYSTEM_CHECK_NUMBERS, *_GPU_CHECK_NUMBERS]:
        _system_check_number(env, name)


def unreadable_gpu_check_numbers(env: Mapping[str, str]) -> list[str]:
    """The GPU check settings the SDK could not read in its job loop (see ``_GPU_CHECK_NUMBERS``): it
    would stop with a traceback there even after a failed start, which must go on to answer jobs."""
    unreadable = []
    for name in _GPU_CHECK_NUMBERS:
        try:
            _system_check_number(env, name)
        except ConfigError:
            unreadable.append(name)
    return unreadable


def _disk_check_percent(env: Mapping[str, str]) -> float:
    """The free share of / that the runpod SDK's disk fitness check requires once the start is done (0: the
    check does not run); RUNPOD_MIN_DISK_PERCENT (default 10) sets the share, as in the SDK."""
    return _system_check_number(env, "RUNPOD_MIN_DISK_PERCENT")


def _memory_check_gib(env: Mapping[str, str]) -> float:
    """The GiB of available memory (MemAvailable, whatever the container's own limit) that the runpod
    SDK's memory fitness check requires once the start is done (0: the check does not run);
    RUNPOD_MIN_MEMORY_GB (default 4; the SDK's "GB" are GiB) sets it."""
    return _system_check_number(env, "RUNPOD_MIN_MEMORY_GB")


def sdk_log_level(env: Mapping[str, str]) -> str:
    """RUNPOD_LOG_LEVEL as the SDK takes it: trimmed, and INFO when unset, empty or invalid (``load_config``
    refuses an invalid one). Not the SDK's own default, DEBUG, which logs every answer, presigned URLs included."""
    level = env.get("RUNPOD_LOG_LEVEL", "").strip().upper()
    return level if level in SDK_LOG_LEVELS else "INFO"


def _check_sdk_log_level(value: str) -> None:
    if value.strip() and value.strip().upper() not in SDK_LOG_LEVELS:
        raise ConfigError(
            f"RUNPOD_LOG_LEVEL={value!r} is not valid; use one of {', '.join(SDK_LOG_LEVELS)} (the runpod SDK's "
            "names: WARN, not WARNING), or leave it unset for INFO"
        )


def _check_output_dir(path: Path, for_uploads: bool) -> None:
    """OUTPUT_DIR must be a directory the worker can create or write: otherwise every job would fail
    after its work (``for_uploads``: every failed upload would lose its video). A folder made in the
    nearest existing one and removed at once tells (root passes every permission check, not /proc's)."""
    why = " (it keeps the videos whose upload failed: there is no network volume)" if for_uploads else ""
    existing = _nearest_folder("OUTPUT_DIR", path, why)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".turbovideo-check-", dir=existing))
    except OSError as e:
        raise ConfigError(
            f"OUTPUT_DIR={str(path)!r} is not writable ({existing}: {e.strerror}); point it at a writable "
            f"directory{why}"
        ) from None


def _nearest_folder(name: str, path: Path, why: str = "") -> Path:
    """The nearest of ``path`` and its parents that exists: a ``ConfigError`` naming ``name`` unless it
    is a folder (a file or a broken link on the way keeps ``path`` from ever becoming a directory)."""
    try:
        for existing in (path, *path.parents):
            if existing.is_symlink() and not existing.exists():
                raise ConfigError(
                    f"{name}={str(path)!r} cannot be a directory: {existing} is a broken link{why}"
                )
            if existing.exists():
                break
        is_dir = existing.is_dir()
    except OSError as e:
        raise ConfigError(
            f"{name}={str(path)!r} cannot be checked ({e.strerror}); point it at a writable directory{why}"
        ) from None
    if not is_dir:
        raise ConfigError(f"{name}={str(path)!r} cannot be a directory: {existing} is a file{why}")
    return existing


def _durable_dir(cache_dir: Path, output_dir: Path) -> Path:
    """Where videos whose upload failed are kept: on the network volume when one is mounted (next to
    the cache if the cache is on it; a cache baked into the image is not), else in OUTPUT_DIR."""
    if not RUNPOD_VOLUME.is_dir():
        return output_dir
    return (cache_dir if on_network_volume(cache_dir) else RUNPOD_VOLUME / "turbovideo") / "outputs"


def on_network_volume(path: Path) -> bool:
    """Whether ``path`` lies on a mounted network volume (which outlives the worker)."""
    return RUNPOD_VOLUME.is_dir() and path.resolve().is_relative_to(RUNPOD_VOLUME.resolve())


def use_quantized(variant: str, gpu_memory_bytes: int | None) -> bool:
    """The checkpoint variant to load: ``auto`` follows GPU memory (``None``: no GPU)."""
    if variant == "auto":
        return prefer_quantized(gpu_memory_bytes)
    return variant == "quant"


def _served_models(value: str, on_runpod: bool) -> tuple[ModelSpec, ...]:
    known = ", ".join([*MODELS, *ALIASES])
    if not value:
        if on_runpod:
            raise ConfigError(
                f"MODELS is not set; set it in the endpoint's environment to one or more of {known} "
                "(comma-separated), e.g. MODELS=TurboWan2.1-T2V-1.3B-480P"
            )
        value = "tiny"  # a fresh checkout runs end to end on the CPU with random weights
    try:
        return tuple(resolve_models(value))
    except ValueError as exc:
        raise ConfigError(f"MODELS={value!r} is not valid: {exc}") from None


def _variant(value: str) -> str:
    variant = value.strip().lower() or "auto"
    if variant not in VARIANTS:
        raise ConfigError(f"CHECKPOINT_VARIANT={value!r} is not valid; use one of {', '.join(VARIANTS)}")
    return variant


def _hf_token(value: str) -> str | None:
    return _credential("HF_TOKEN", value, "the token alone (hf_...)") or None


def _credential(name: str, value: str, what: str) -> str:
    """``value`` stripped. Pasted secrets often carry a newline or space; inside an HTTP header any such
    character fails every request with an error that quotes the secret. Never echo the value."""
    text = value.strip()
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise ConfigError(
            f"{name} contains spaces or characters other than printable ASCII; set it to {what}"
        )
    return text


def _sp_degree(value: str) -> int | None:
    text = value.strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:  # isdigit alone takes "²"
        raise ConfigError(
            f"SP_DEGREE={value!r} is not valid; use the number of GPUs one request spreads over "
            "(1 turns multi-GPU off), or leave it unset to use every visible GPU"
        )
    return int(text)


def _warm_up_choice(value: str) -> bool | None:
    choice = value.strip().lower()
    if choice in ("", "auto"):
        return None
    if choice in ("1", "true", "yes", "on"):
        return True
    if choice in ("0", "false", "no", "off"):
        return False
    raise ConfigError(
        f"WARMUP={value!r} is not valid; use auto (warm up when a GPU is present), 1 (always) or 0 (never)"
    )


def _bucket(env: Mapping[str, str]) -> BucketConfig | None:
    present = [name for name in _BUCKET_VARS if env.get(name, "").strip()]  # " " is as good as unset
    if not present:
        return None
    missing = [name for name in _BUCKET_VARS if name not in present]
    if missing:
        raise ConfigError(
            f"{', '.join(present)} set but {', '.join(missing)} missing; set all of "
            f"{', '.join(_BUCKET_VARS)} to upload videos, or none of them to keep videos in OUTPUT_DIR"
        )
    endpoint_url = env["BUCKET_ENDPOINT_URL"].strip()
    if "@" in endpoint_url.partition("://")[2].split("/", 1)[0]:  # not echoed: it holds a password
        raise ConfigError(
            "BUCKET_ENDPOINT_URL holds a user name or password (user:password@host); give the endpoint alone, "
            "the credentials go in BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY"
        )
    if not _is_endpoint_url(endpoint_url):
        raise ConfigError(
            f"BUCKET_ENDPOINT_URL={endpoint_url!r} is not an http(s) URL of a host (with a numeric port, if any, "
            "and no query); use the bucket service's endpoint with its scheme, e.g. "
            "https://<account id>.r2.cloudflarestorage.com"
        )
    name = env["BUCKET_NAME"].strip()
    # What botocore sends (a name or an access-point ARN); anything else fails every upload after the
    # work. Imported here: only a worker with a bucket loads botocore.
    from botocore.handlers import VALID_BUCKET, VALID_S3_ARN

    if not (VALID_BUCKET.search(name) or VALID_S3_ARN.search(name)):
        raise ConfigError(
            f"BUCKET_NAME={name!r} is not a bucket name (letters, digits, '.', '-', '_'); set it to the bucket "
            "alone, e.g. videos, and put a folder inside it in BUCKET_PREFIX"
        )
    prefix = env.get("BUCKET_PREFIX", "").strip("/ ")
    if {".", ".."} & set(prefix.split("/")):
        raise ConfigError(
            f"BUCKET_PREFIX={prefix!r} has a '.' or '..' folder, which browsers and HTTP clients collapse, so "
            "the links would name other objects; use plain folder names, e.g. renders/2026"
        )
    return BucketConfig(
        endpoint_url=_without_bucket_path(endpoint_url, name),
        access_key_id=_credential("BUCKET_ACCESS_KEY_ID", env["BUCKET_ACCESS_KEY_ID"], "the key ID alone"),
        secret_access_key=_credential(
            "BUCKET_SECRET_ACCESS_KEY", env["BUCKET_SECRET_ACCESS_KEY"], "the secret alone"
        ),
        name=name,
        prefix=prefix,
    )


def _without_bucket_path(endpoint_url: str, name: str) -> str:
    """The endpoint without a trailing ``/<BUCKET_NAME>``: Cloudflare's dashboard shows a bucket's "S3 API"
    URL so, and botocore would add the name again, filing every video under a folder named after the bucket.
    Any other path is kept (a service behind a proxy's path), except at R2 and AWS, where a path's first
    folder always names a bucket: there the videos would go to that other bucket."""
    parsed = urlparse(endpoint_url)
    path = parsed.path.strip("/")
    if path == name:
        return parsed._replace(path="").geturl()
    host = (parsed.hostname or "").lower()
    if path and host.endswith((".r2.cloudflarestorage.com", ".amazonaws.com", ".amazonaws.com.cn")):
        other = path.split("/")[0]
        raise ConfigError(
            f"BUCKET_ENDPOINT_URL={endpoint_url!r} has a path (/{path}) that is not BUCKET_NAME, so the videos "
            f"would go to bucket {other!r}; give the endpoint alone, e.g. https://<account id>.r2.cloudflarestorage.com, "
            "the bucket in BUCKET_NAME and a folder inside it in BUCKET_PREFIX"
        )
    return endpoint_url


def _is_endpoint_url(url: str) -> bool:
    """Whether botocore takes ``url`` as a custom endpoint. It refuses a bad host only when the client is
    made (a traceback at start), and a port that is no number or a query only at the first upload."""
    from botocore.utils import is_valid_uri  # only a worker with a bucket loads botocore

    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 (raises ValueError for a port that is no number)
    except ValueError:  # also an unclosed [ in the host
        return False
    return (
        parsed.scheme in ("http", "https")
        and bool(parsed.netloc)
        and not parsed.query
        and bool(is_valid_uri(url))
    )
