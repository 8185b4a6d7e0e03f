"""Starting the worker, and what it says when it cannot start.

A worker that exits on a bad setting is restarted by RunPod into the same wall: every attempt pays
for the container start (and perhaps a download) and the user sees silent restarts. So a failed
start is turned into one sentence that says what to change, and the worker stays up answering
every job with ``E_STARTUP: <sentence>``. Only what a fresh worker may not meet (a broken CUDA
context, a Hub or network failure that outlasted the download's own retries, a cached checkpoint
damaged since its download and removed here) also asks RunPod to replace the worker: the
replacement starts again, resuming any partial download.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from turbovideo.errors import one_line
from turbovideo.models.checkpoint import CheckpointError
from turbovideo.parallel.errors import ParallelError
from turbovideo.pipeline.device_slots import held_host_bytes
from turbovideo.pipeline.host_memory import GIB, HostMemory, HostMemoryError, gib_text, read_host_memory
from turbovideo.worker.checkpoints import CheckpointDownloadError, offline_setting, verify_cached
from turbovideo.worker.config import (
    ConfigError,
    WorkerConfig,
    in_job_loop,
    load_config,
    system_checks_run,
    unreadable_gpu_check_numbers,
)
from turbovideo.worker.logs import RedactSecrets, configure_logging, secret_values

logger = logging.getLogger("turbovideo.worker")

# RunPod's SDK takes both: the served handler is a coroutine (so jobs can be stopped), a failed start's is not.
Handler = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]


class NoCudaError(RuntimeError):
    """Real models on RunPod, and torch sees no usable GPU: a CPU endpoint, or a host driver older than
    the image's CUDA."""

    def __init__(self) -> None:
        cuda = torch.version.cuda or "12.8"  # the CUDA this torch was built for (the image's: 12.8)
        super().__init__(
            "no usable CUDA GPU on this worker (torch.cuda.is_available() is False): the models in MODELS need a "
            f"GPU endpoint that allows only CUDA {cuda} or newer (an older host driver hides the GPU from this "
            "image); the worker asks to be replaced"
        )


class MemoryCheckError(RuntimeError):
    """Once the models are loaded, less memory is available than RunPod's memory fitness check needs: it
    would stop the worker before its first job. The message names the numbers and what to change."""


def check_memory_fitness(min_gib: float, host: HostMemory | None, held: int = 0) -> None:
    """RunPod's memory fitness check, made here first on the number it reads (MemAvailable), so that a
    worker it would stop answers why instead. ``min_gib``: ``WorkerConfig.memory_check_gib`` (0: the
    check does not run); ``held``: what the models' pinned host copies take, for the message."""
    if host is None or not min_gib or host.available >= min_gib * GIB:
        return
    copies = f" (the pinned copies of their idle weights take {held / GIB:.1f} GiB)" if held else ""
    raise MemoryCheckError(
        f"RunPod's memory check would stop this worker before its first job: with the models loaded "
        f"{gib_text(host.available)} GiB of memory is available{copies} and it needs {min_gib:.10g} GiB "
        "(RUNPOD_MIN_MEMORY_GB); deploy on a GPU type with more RAM, serve fewer MODELS, lower "
        "RUNPOD_MIN_MEMORY_GB, or set RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true"
    )


@dataclass(frozen=True)
class StartupFailure:
    message: str  # one sentence: what is wrong and what to change
    refresh: bool = False  # a new worker (maybe on another host) could succeed


def create_handler(env: Mapping[str, str] | None = None, sdk_config: dict[str, Any] | None = None) -> Handler:
    """Load everything the worker serves and return its job handler (a failed-start one if loading failed).

    ``sdk_config``: the dict the runpod SDK is started with. A job answered with ``refresh_worker`` (a
    suspect GPU, a broken multi-GPU group) then also sets its ``refresh_worker``, so that the SDK takes
    no further job here: the process ends once the answer is posted and RunPod starts a fresh worker,
    instead of this one failing every queued job at once.
    """
    env = os.environ if env is None else env
    replace_worker = (
        (lambda: sdk_config.__setitem__("refresh_worker", True)) if sdk_config is not None else _stay
    )
    secrets = secret_values(env)
    configure_logging(secrets)
    with _sigterm_unwinds():
        return _start(env, secrets, replace_worker)


def _start(env: Mapping[str, str], secrets: list[str], replace_worker: Callable[[], None]) -> Handler:
    config: WorkerConfig | None = None
    try:
        config = load_config(env)
        # Imported here so that a broken install (a model module or library that does not import) is a failed
        # start too.
        from turbovideo.worker.service import VideoService

        real = [spec.name for spec in config.models if not spec.is_random]
        if real and not torch.cuda.is_available():
            if config.on_runpod:
                raise NoCudaError()
            # Off RunPod (a laptop, a CI box) this may be on purpose; it is never quick.
            logger.warning(
                "no usable CUDA GPU here: %s will run on the CPU, where a job takes hours; MODELS=tiny runs "
                "the whole path in seconds",
                ", ".join(real),
            )
        service = VideoService.from_config(config)
        check_memory_fitness(config.memory_check_gib, read_host_memory(), held_host_bytes())
    except Exception as exc:  # any failed start is answered to jobs, not crash-looped
        failure = _heal_or_describe(exc, config)
        # The sentence goes to every client: no secret a library quoted in an error may ride along.
        failure = replace(failure, message=RedactSecrets(secrets).redact(failure.message))
        logger.error(
            "the worker could not start: %s",
            failure.message,
            exc_info=not isinstance(
                exc, (ConfigError, CheckpointDownloadError, MemoryCheckError, HostMemoryError)
            ),
        )
        _skip_system_checks(env)
        return failed_start_handler(failure, replace_worker)
    service.replace_worker = replace_worker
    logger.info("worker ready: serving %s", ", ".join(service.pipelines))
    return service.handle_async


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the worker starts, SIGTERM (``docker stop``, RunPod scaling a starting worker down) raises
    SystemExit instead of ending the process on the spot, so that cleanup runs: a download's lock on the
    volume is released, and the next worker need not wait STALE_AFTER_S for it to go stale. The runpod
    SDK installs its own handler once the start is done."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set it
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _stay() -> None:
    """Outside the SDK's job loop (tests, a Python caller) there is no worker to replace."""


def _skip_system_checks(env: Mapping[str, str]) -> None:
    """Keep a worker whose start failed alive through the runpod SDK's system fitness checks, which run
    after ``create_handler`` and stop the worker (os._exit) when one fails: too little free memory (what
    a half-done load still holds), too little free disk (what a download filled). It takes jobs only to
    answer ``E_STARTUP``; stopped, it would be restarted into the same failure with no job ever told why.
    The SDK reads the variable when the checks are about to run, i.e. after this. Its GPU check it imports
    in any case, and that stops the worker with a traceback on a setting it cannot read: such a setting
    (named by the E_STARTUP answer) is dropped here, so the SDK takes its default."""
    for name in unreadable_gpu_check_numbers(env):
        os.environ.pop(name, None)
    if system_checks_run(env):
        os.environ["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] = "true"
        logger.warning(
            "RunPod's system fitness checks are skipped: this worker only answers jobs with E_STARTUP"
        )


def check_test_input(argv: list[str], env: Mapping[str, str]) -> None:
    """Exit with one line for a local job the SDK would only read after the models load (minutes on a
    GPU), and then refuse with a traceback (not JSON), quietly swap for test_input.json (``{}``, ``[]``),
    or not find at all (``python handler.py`` run in a folder without test_input.json)."""
    from runpod.serverless import parser  # the SDK's own flags, read as it reads them

    args, _ = parser.parse_known_args(argv)
    if args.rp_serve_api:  # the SDK serves the API then, even with --test_input (which it ignores)
        _check_port(args.rp_api_host, args.rp_api_port)
        if args.rp_api_concurrency != 1:  # uvicorn needs an import string for workers; the SDK passes an app
            sys.exit(
                f"--rp_api_concurrency {args.rp_api_concurrency}: the runpod SDK's local API serves one request "
                "at a time (it stops at start otherwise); leave the flag out"
            )
    if args.test_input is not None:
        _check_job(args.test_input, "--test_input")
    elif _runs_test_input_json(args.rp_serve_api, env):
        try:
            text = Path("test_input.json").read_text(encoding="utf-8")
        except FileNotFoundError:
            sys.exit(
                f"no test_input.json in {Path.cwd()}, and no --test_input: run from a folder that has one, or "
                """give the job: --test_input '{"input": {"prompt": "a fox"}}'"""
            )
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"test_input.json cannot be read ({e})")
        _check_job(text, "test_input.json")


def _check_port(host: str, port: int) -> None:
    """Exit with one line when the local API could not listen there (a port another server holds, a host
    that is not this machine's): the SDK's server only tries once every model has loaded, minutes on a GPU.
    Bound as uvicorn's server (asyncio) binds: every address the host names, of its own family (``::``
    and ``::1`` are IPv6; ``""`` is every interface)."""
    where = f"--rp_serve_api cannot listen on {host}:{port}"
    if not 0 <= port <= 65535:
        sys.exit(f"{where}: --rp_api_port must be between 0 and 65535")
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        sys.exit(f"{where}: --rp_api_host {host!r} does not resolve ({e.strerror or e})")
    with contextlib.ExitStack() as held:
        for family, kind, proto, _, address in dict.fromkeys(found):
            try:
                sock = held.enter_context(socket.socket(family, kind, proto))
            except OSError:  # a family this machine lacks: asyncio skips it too
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except OSError as e:
                advice = "; another server holds that port: stop it or pick another --rp_api_port"
                sys.exit(f"{where} ({e.strerror or e}){advice if e.errno == errno.EADDRINUSE else ''}")


def _runs_test_input_json(serve_api: bool, env: Mapping[str, str]) -> bool:
    """Whether the SDK runs test_input.json: not serving an HTTP API and not in RunPod's job loop."""
    realtime = env.get("RUNPOD_REALTIME_PORT", "0") != "0"
    return not (serve_api or realtime or in_job_loop(env))


def _check_job(text: str, source: str) -> None:
    try:
        job = json.loads(text)
    except ValueError as e:
        sys.exit(f"{source} is not valid JSON ({e})")
    if not isinstance(job, dict) or job.get("input") is None:  # the SDK's own test: null is none
        sys.exit(f'{source} must be a JSON object with an "input" field: {{"input": {{"prompt": "a fox"}}}}')


def _heal_or_describe(exc: BaseException, config: WorkerConfig | None) -> StartupFailure:
    """``describe_startup_error``, after checking a cached file that failed to load against the sha256
    it was verified with at download. A damaged one is removed and a replacement worker downloads it
    again, with nobody having to reach the volume (offline, someone must replace it)."""
    if not (isinstance(exc, CheckpointError) and exc.path and config is not None):
        return describe_startup_error(exc)
    error = one_line(str(exc), 1000)
    intact = verify_cached(config.cache_dir, exc.path, discard=not config.offline)
    if intact is None:
        return describe_startup_error(exc)
    if intact and _read_failed(exc):
        return StartupFailure(
            f"{error}; the file still has the sha256 it was downloaded with, so reading it failed on the "
            "volume (an I/O error): the worker asks to be replaced",
            refresh=True,
        )
    if intact:
        return StartupFailure(
            f"{error}; the file still has the sha256 it was downloaded with, so downloading it again would "
            "not help: check that this worker version supports the model"
        )
    if config.offline:
        return StartupFailure(
            f"{error}; the file no longer matches the sha256 it was verified with at download: replace it "
            f"(offline mode, {offline_setting()}, forbids downloading it again)"
        )
    return StartupFailure(
        f"{error}; the file no longer matches the sha256 it was verified with at download, so it was "
        "removed and the worker asks to be replaced (the replacement downloads it again)",
        refresh=True,
    )


def _read_failed(exc: BaseException) -> bool:
    """Whether the file system failed (EIO, ESTALE, a timeout) under the load, not the bytes."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, OSError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_startup_error(exc: BaseException) -> StartupFailure:
    """One actionable sentence for a failed start."""
    if isinstance(exc, CheckpointDownloadError) and exc.transient:
        return StartupFailure(f"{one_line(str(exc), 1000)}; the worker asks to be replaced", refresh=True)
    if isinstance(exc, NoCudaError):  # a new worker may land on a host with a newer driver
        return StartupFailure(str(exc), refresh=True)
    if isinstance(exc, HostMemoryError):  # at load: the idle weights' pinned copies do not fit in host memory
        return StartupFailure(
            f"{one_line(exc.summary, 1000)}; deploy on a GPU type with more RAM (or more GPU memory, which keeps "
            "more of the model there), serve fewer MODELS, or set CHECKPOINT_VARIANT=quant (int8 DiT files, about "
            "half the size)"
        )
    if isinstance(exc, (ConfigError, CheckpointDownloadError, MemoryCheckError)):
        return StartupFailure(one_line(str(exc), 1000))
    if isinstance(exc, CheckpointError) and exc.path is None:  # readable bytes that are not this model's
        return StartupFailure(
            f"{one_line(str(exc), 1000)}; downloading the file again would bring the same bytes: check that "
            "this worker version supports the model and that CACHE_DIR holds its published files"
        )
    if isinstance(exc, CheckpointError):
        return StartupFailure(
            f"{one_line(str(exc), 1000)}; delete that file so the next start downloads it again"
        )
    if isinstance(exc, ParallelError) and "out of memory" in str(exc).lower():
        # A follower holds every served DiT on its GPU: a fresh worker runs out the same way.
        return StartupFailure(
            f"the models do not fit in the memory of every GPU ({one_line(str(exc), 300)}); set "
            "CHECKPOINT_VARIANT=quant, serve fewer MODELS, set SP_DEGREE=1, or deploy on GPUs with more memory"
        )
    if isinstance(exc, ParallelError):
        return StartupFailure(
            f"the multi-GPU group did not start ({one_line(str(exc), 300)}); the worker asks to be replaced",
            refresh=True,
        )
    if isinstance(exc, torch.OutOfMemoryError):
        return StartupFailure(
            "the models do not fit in GPU memory; set CHECKPOINT_VARIANT=quant, serve fewer MODELS, "
            "or deploy on a GPU with more memory"
        )
    text = str(exc)
    if "cuda" in text.lower():
        return StartupFailure(
            f"CUDA is unusable on this worker ({one_line(text, 200)}); the worker asks to be replaced",
            refresh=True,
        )
    return StartupFailure(
        f"the worker could not start ({type(exc).__name__}: {one_line(text, 200)}); the worker log has the traceback"
    )


def failed_start_handler(failure: StartupFailure, replace_worker: Callable[[], None] = _stay) -> Handler:
    def answer(job: dict[str, Any]) -> dict[str, Any]:
        response: dict[str, Any] = {"error": f"E_STARTUP: {failure.message}"}
        if failure.refresh:
            response["refresh_worker"] = True
            replace_worker()
        return response

    return answer
