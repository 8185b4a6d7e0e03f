"""One job, start to finish: validate, generate, deliver, answer, and map every failure to a code.

``VideoService.handle`` never raises. Whatever goes wrong becomes ``{"error": "<CODE>: <one line>"}``
(RunPod shows a raised exception to the client as a JSON traceback, and a non-string error as a
500); the traceback of an unexpected failure goes to the worker log only. A failure a fresh worker
would not meet (a GPU out of memory or with a lost CUDA context, a broken multi-GPU group, a disk
that could not take the video) also asks RunPod to replace the worker (``refresh_worker``).
RunPod calls ``handle_async``, which runs ``handle`` on the worker's one GPU thread so that a job
RunPod stops (cancelled, or past its execution timeout) stops at its next step instead of running to
the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

# One synchronous post (SDK 1.12, which pyproject pins), so that one thread can send them in order.
from runpod.serverless.modules.rp_progress import _thread_target as post_progress

from turbovideo.catalog import ALIASES, MAX_SEED, ModelSpec
from turbovideo.errors import InputError, one_line
from turbovideo.models import DIT_CONFIGS
from turbovideo.parallel import ParallelError, SequenceParallelGroup, choose_degree, visible_ranks
from turbovideo.pipeline import GenerationRequest, GenerationResult, ProgressEvent, VideoPipeline
from turbovideo.pipeline.video import EncodeError
from turbovideo.worker.checkpoints import check_room, disk_check_reserve, ensure_checkpoints
from turbovideo.worker.compile_cache import configure_compile_cache
from turbovideo.worker.config import ConfigError, WorkerConfig, use_quantized
from turbovideo.worker.inputs import load_image
from turbovideo.worker.logs import RedactSecrets, configure_logging
from turbovideo.worker.schema import MAX_EXPIRES_S, VideoRequest, VideoResponse, parse_request
from turbovideo.worker.storage import BucketStorage, LocalStorage, Storage, UploadError, safe_job_id

logger = logging.getLogger(__name__)

# RunPod refuses results over 10 MB on /run (20 MB on /runsync); leave room for the other fields.
MAX_BASE64_BYTES = 9_000_000
# Free space kept on a worker's own disk that holds videos without a bucket (LocalStorage.keep_free_bytes):
# room for the next job's scratch files, and for RunPod's disk check should the worker start again.
WORKER_DISK_RESERVE_BYTES = 2 << 30
# Every job and the start-up warm-up run on this one thread. One job at a time: the pipelines (memory
# plan, attention settings, the multi-GPU group) are not shared, and RunPod's HTTP API server hands
# over requests concurrently. One thread: cuDNN's tuned convolution plans and other GPU library state
# live per thread, and a fresh thread paid 1.3 s to tune the VAE decode again (H200, 1.3B: 3.0 s
# against 1.6 s a request).
_GPU_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turbovideo-gpu")
_CUDA_BROKEN = (
    "cuda error",
    "illegal memory access",
    "device-side assert",
    "cublas_status",
    "cudnn_status",
    # The driver's words for the other faults that break the context, as a Triton kernel's launch reports
    # them ("Triton Error [CUDA]: misaligned address"): a launch also returns an earlier kernel's fault.
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "hardware stack error",
    "invalid program counter",
    "uncorrectable ecc error",
    "launch timed out",
)


class ModelError(LookupError):
    """The request names a model this worker does not serve (answered as ``E_MODEL``)."""


class JobStopped(Exception):
    """RunPod stopped the job: its client cancelled it, or it ran past its execution timeout."""


def _stop_check(stop: threading.Event, message: str) -> Callable[..., None]:
    """A check that raises ``JobStopped(message)`` once ``stop`` is set; it takes and ignores any
    arguments, so it also serves as a pipeline progress callback (called between steps)."""

    def check(*_: Any) -> None:
        if stop.is_set():
            raise JobStopped(message)

    return check


class VideoService:
    """The loaded pipelines (one per served model, in ``MODELS`` order) and where videos go."""

    def __init__(
        self,
        pipelines: dict[str, VideoPipeline],
        storage: Storage,
        *,
        report_progress: bool = False,
        outputs_on_worker_disk: bool = False,
        secrets: Sequence[str] = (),
    ) -> None:
        self.pipelines = pipelines
        self.storage = storage
        self.report_progress = report_progress
        # Answers with paths only then name files nobody can fetch: each such answer says how to get them.
        self.outputs_on_worker_disk = outputs_on_worker_disk
        # What reaches the client passes the log's filter too: a library's error may quote a key.
        self._redact = RedactSecrets(list(secrets)).redact
        # Called once a job's answer asks RunPod for a fresh worker (startup.create_handler wires it).
        self.replace_worker: Callable[[], None] = lambda: None

    @classmethod
    def from_config(cls, config: WorkerConfig) -> VideoService:
        """Fetch checkpoints and load every served model now, so warm requests pay nothing."""
        storage = _storage(config)  # a wrong bucket setting fails the start before any download
        configure_compile_cache(config.cache_dir)
        degree = _sequence_parallel_degree(config)  # a degree that cannot be fails before any download
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        quantized = use_quantized(config.variant, gpu_bytes)
        # Idle weights the host could not hold in pinned memory fail the start now, not after the download.
        VideoPipeline.check_host_room(config.models, quantized=quantized)
        wanted = [f for spec in config.models for f in spec.files(quantized)]  # all models at once
        keep_free = disk_check_reserve(config.cache_dir, config.disk_check_percent)
        check_room(
            wanted, config.cache_dir, token=config.hf_token, offline=config.offline, keep_free=keep_free
        )
        pipelines = {}
        for spec in config.models:
            checkpoint_dir = ensure_checkpoints(
                spec,
                quantized,
                config.cache_dir,
                token=config.hf_token,
                offline=config.offline,
                progress=logger.info,
            )
            pipelines[spec.name] = VideoPipeline.load(spec, checkpoint_dir, quantized=quantized)
            variant = "" if spec.is_random else f" ({'quant' if quantized else 'bf16'} checkpoints)"
            logger.info("loaded %s%s", spec.name, variant)
        _spread_over_gpus(pipelines.values(), degree, config.secrets)
        if config.warm_up or (config.warm_up is None and torch.cuda.is_available()):
            for pipeline in pipelines.values():
                _warm_up_on_gpu_thread(pipeline)
        return cls(
            pipelines,
            storage,
            report_progress=config.report_progress,
            outputs_on_worker_disk=config.outputs_on_worker_disk,
            secrets=config.secrets,
        )

    async def handle_async(self, job: dict[str, Any]) -> dict[str, Any]:
        """The RunPod handler: ``handle`` on the worker's GPU thread, so that RunPod can stop the job.

        RunPod stops a job by cancelling this coroutine (SDK >= 1.10; a synchronous handler would
        run on the SDK's event loop and could not hear it). The job then stops at its next step,
        decoded chunk or muxed sample, and the coroutine returns only once the thread has let go of
        the GPU, so the next job never runs beside it. No answer is sent for a stopped job.
        """
        stop = threading.Event()
        work = asyncio.get_running_loop().run_in_executor(_GPU_THREAD, self.handle, job, stop)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            job_id = safe_job_id(job.get("id") if isinstance(job, dict) else None)
            logger.info("job %s: stopped by RunPod; stopping at its next step", job_id)
            while not work.done():
                with contextlib.suppress(asyncio.CancelledError):  # asked again: still wait for the thread
                    await asyncio.shield(work)
            raise

    def handle(self, job: dict[str, Any], stop: threading.Event | None = None) -> dict[str, Any]:
        """A response dict, or ``{"error": ...}``; never raises. Once ``stop`` is set, the job ends
        at its next step with ``E_STOPPED``."""
        job_id = safe_job_id(job.get("id") if isinstance(job, dict) else None)
        try:
            return self._run(job, job_id, stop or threading.Event())
        except Exception as exc:  # every failure becomes a coded answer; the worker keeps serving
            answer = error_response(exc, job_id)
            answer["error"] = self._redact(answer["error"])
            if answer.get("refresh_worker"):  # stopped jobs too, whose answer RunPod never gets
                self.replace_worker()
            return answer

    def _run(self, job: Any, job_id: str, stop: threading.Event) -> dict[str, Any]:
        check_stop = _stop_check(stop, "the job was stopped (cancelled, or past its execution timeout)")
        check_stop()  # stopped while it waited for the GPU thread
        started = time.perf_counter()
        request, spec, generation = self._prepare(job, check_stop)
        fetched = time.perf_counter()
        logger.info(
            "job %s: %s, %d frames, %d step(s), seed %d",
            job_id,
            spec.name,
            generation.num_frames,
            generation.num_steps,
            generation.seed,
        )
        sender = _ProgressSender(job, stop) if self.report_progress else None

        def progress(event: ProgressEvent) -> None:  # the pipeline reports between steps: stop there
            check_stop()
            if sender is not None:
                sender(event)

        try:
            with tempfile.TemporaryDirectory(prefix=f"turbovideo-{job_id}-") as scratch:
                result = self.pipelines[spec.name].generate(generation, Path(scratch), progress=progress)
                check_stop()
                delivering = time.perf_counter()
                delivered, warnings = self._deliver(job_id, result, request, check_stop)
        finally:
            if sender is not None:
                sender.close()  # the last update lands before the answer (sent during the upload)
        finished = time.perf_counter()
        timings = {
            "input": fetched - started,
            **{stage: seconds for stage, seconds in result.timings.items() if stage != "total"},
            "upload": finished - delivering,
            "total": finished - started,
        }
        logger.info("job %s: done in %.1f s", job_id, timings["total"])
        return _response(spec, result, delivered, [*result.warnings, *warnings], timings)

    def _prepare(
        self, job: Any, check_stop: Callable[[], None]
    ) -> tuple[VideoRequest, ModelSpec, GenerationRequest]:
        """The job's request, its model and what the pipeline runs, all checked; the image fetched last."""
        request = parse_request(job.get("input") if isinstance(job, dict) else None)
        spec = self._choose_model(request)
        pipeline = self.pipelines[spec.name]
        # All but the image's own size is checked before a download; the real image is checked after.
        stand_in = Image.new("RGB", (1, 1)) if request.image is not None else None
        pipeline.validate(_generation_request(request, spec, stand_in))
        image = load_image(request.image) if request.image is not None else None
        check_stop()
        generation = _generation_request(request, spec, image)
        pipeline.validate(generation)
        return request, spec, generation

    def _choose_model(self, request: VideoRequest) -> ModelSpec:
        """The named model, or the first served one for the task; an alias (``tiny``) names its
        models, chosen among by task like the command line does."""
        served = ", ".join(self.pipelines)
        names = ALIASES.get(request.model, (request.model,)) if request.model else tuple(self.pipelines)
        candidates = [self.pipelines[name].spec for name in names if name in self.pipelines]
        if request.model is not None and not candidates:
            raise ModelError(f"model {request.model!r} is not served by this worker; served: {served}")
        if request.model in self.pipelines:
            return candidates[0]
        task = request.task or ("i2v" if request.image is not None else "t2v")
        for spec in candidates:
            if spec.task == task:
                return spec
        raise ModelError(f"no model for task {task!r} is served by this worker; served: {served}")

    def _deliver(
        self,
        job_id: str,
        result: GenerationResult,
        request: VideoRequest,
        check_stop: Callable[[], None],
    ) -> tuple[dict[str, Any], list[str]]:
        """The response fields naming the files (URLs or paths, plus base64 where asked and it fits)
        and warnings. The files always reach the storage first; base64 is an extra, so when a failed
        upload leaves the base64 as the only copy the client gets, the job still succeeds."""
        warnings: list[str] = []
        # Read before delivery moves the files.
        encoded = _encode(result, warnings) if request.return_base64 else {}
        try:
            delivered = self.storage.deliver(
                job_id, result.videos, result.thumbnail, request.expires_in, check_stop=check_stop
            )
        except UploadError as exc:
            if not encoded:
                raise
            return encoded, [*warnings, self._redact(str(exc))]
        if self.outputs_on_worker_disk and not encoded:
            warnings.append(
                "the video is only on this worker's own disk (video_path), which nobody can reach once the job "
                "has ended: set BUCKET_* on the endpoint to get URLs, or ask for return_base64"
            )
        if "video_url" in delivered and request.expires_in > MAX_EXPIRES_S:  # an app may keep the URLs
            warnings.append(
                f"expires_in {request.expires_in} s was cut to {MAX_EXPIRES_S} s (7 days), "
                "the longest a presigned URL lives"
            )
        return {**delivered, **encoded}, warnings


class _ProgressSender:
    """Posts one job's progress strings to RunPod in order, from one thread; an update not yet sent is
    replaced by a newer one (``/status`` shows only the latest). The SDK's ``progress_update`` posts each
    from a thread of its own, and those race: "mux 1/2" landed after "mux 2/2", and a late post after
    the job's result. Once the job is stopped nothing more is posted (RunPod has ended the job), and a
    post already under way is not waited for."""

    def __init__(self, job: dict[str, Any], stop: threading.Event) -> None:
        self._job = job
        self._stop = stop
        self._pending: str | None = None
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="job-progress", daemon=True)
        self._thread.start()

    def __call__(self, event: ProgressEvent) -> None:
        with self._wake:
            self._pending = f"{event.stage} {event.step}/{event.total}"
            self._wake.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is pending, then stop; waits at most ``timeout_s`` for a slow post, and not at all
        once the job is stopped."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        give_up_at = time.monotonic() + timeout_s
        while self._thread.is_alive() and not self._stop.is_set() and time.monotonic() < give_up_at:
            self._thread.join(0.05)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                text, self._pending = self._pending, None
            if text is None or self._stop.is_set():
                return
            try:
                post_progress(self._job, text)
            except Exception as exc:  # progress is a courtesy; the job goes on
                logger.warning("progress update %r not sent (%s)", text, type(exc).__name__)


def _encode(result: GenerationResult, warnings: list[str]) -> dict[str, Any]:
    """The files as base64 response fields, or none (and a warning) past RunPod's payload limit."""
    files = [*result.videos, result.thumbnail]
    sizes = [4 * ((path.stat().st_size + 2) // 3) for path in files]
    # With several samples the first is sent twice: as video_base64 and as videos_base64[0].
    size = sum(sizes) + (sizes[0] if len(result.videos) > 1 else 0)
    if size > MAX_BASE64_BYTES:
        warnings.append(
            f"return_base64 skipped: the files would answer {size / 1e6:.1f} MB, over the "
            f"{MAX_BASE64_BYTES / 1e6:g} MB response limit"
        )
        return {}
    *videos, thumbnail = [base64.b64encode(path.read_bytes()).decode("ascii") for path in files]
    fields: dict[str, Any] = {"video_base64": videos[0], "thumbnail_base64": thumbnail}
    if len(videos) > 1:
        fields["videos_base64"] = videos
    return fields


def _storage(config: WorkerConfig) -> Storage:
    """Where the videos go: the bucket (checked now: no such bucket, a wrong key or secret fail the
    start), else OUTPUT_DIR."""
    if config.bucket is not None:
        bucket = BucketStorage(
            config.bucket, config.durable_dir, fresh_folders=not config.on_runpod, spare_dir=config.output_dir
        )
        bucket.check()
        return bucket
    if config.on_runpod:
        logger.warning("no BUCKET_* configured: videos stay on this worker in %s", config.output_dir)
    return LocalStorage(
        config.output_dir,
        spare_dir=config.durable_dir,
        keep_free_bytes=WORKER_DISK_RESERVE_BYTES if config.outputs_on_worker_disk else 0,
    )


def _sequence_parallel_degree(config: WorkerConfig) -> int:
    """The GPUs one request's DiT work spreads over: SP_DEGREE, else as many of the visible ones as split
    every served model's heads. An SP_DEGREE the GPUs or the heads cannot take is a ``ConfigError``."""
    dits = [DIT_CONFIGS[spec.dit_config] for spec in config.models]
    try:
        return choose_degree(
            config.sp_degree, visible_ranks(config.sp_degree), [(d.label, d.num_heads) for d in dits]
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _spread_over_gpus(pipelines: Iterable[VideoPipeline], degree: int, secrets: Sequence[str]) -> None:
    """With several GPUs, every request's DiT work runs on all ``degree`` of them (turbovideo.parallel);
    the followers log through the same redacting handler."""
    if degree < 2:
        return
    group = SequenceParallelGroup.start(
        degree, initializer=functools.partial(configure_logging, list(secrets))
    )
    for pipeline in pipelines:
        pipeline.run_experts_with(group.replicate, shards=degree)


def _warm_up_on_gpu_thread(pipeline: VideoPipeline) -> None:
    """``_warm_up`` on the GPU thread. Interrupted while waiting for it (Ctrl-C), the start asks it to
    stop at its next step: the interpreter's exit waits for the GPU thread, which would otherwise
    finish the whole warm-up first."""
    stop = threading.Event()
    try:
        _GPU_THREAD.submit(_warm_up, pipeline, _stop_check(stop, "the start was interrupted")).result()
    except BaseException:
        stop.set()
        raise


def _warm_up(pipeline: VideoPipeline, progress: Callable[[ProgressEvent], None]) -> None:
    """One throwaway generation, so the first job runs at warm speed. A failure is logged, not fatal:
    the jobs then answer for whatever is wrong (E_OOM, E_CUDA) as they would without a warm-up. Only a
    broken multi-GPU group fails the start: no job could run, and the start's answer says what to change."""
    name = pipeline.spec.name
    try:
        seconds = pipeline.warm_up(progress=progress)
    except ParallelError:
        raise
    except JobStopped:
        logger.info("warm-up of %s stopped: the start was interrupted", name)
        return
    except Exception as exc:
        logger.warning(
            "warm-up of %s failed (%s: %s); its first job pays for loading kernels instead",
            name,
            type(exc).__name__,
            one_line(str(exc), 300),
        )
        return
    logger.info("warmed up %s in %.1f s", name, seconds)


def _response(
    spec: ModelSpec,
    result: GenerationResult,
    delivered: dict[str, Any],
    warnings: list[str],
    timings: dict[str, float],
) -> dict[str, Any]:
    return VideoResponse(
        **delivered,
        seed=result.seed,
        width=result.width,
        height=result.height,
        num_frames=result.num_frames,
        fps=result.fps,
        duration_s=result.duration_s,
        model=spec.name,
        attention_backend=result.attention_backend,
        timings={stage: round(seconds, 3) for stage, seconds in timings.items()},
        warnings=warnings or None,
    ).model_dump(exclude_none=True)


def _generation_request(
    request: VideoRequest, spec: ModelSpec, image: Image.Image | None
) -> GenerationRequest:
    seed = request.seed if request.seed is not None and request.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
    return GenerationRequest(
        prompt=request.prompt,
        task=request.task or spec.task,
        image=image,
        resolution=request.resolution,
        aspect_ratio=request.aspect_ratio,
        adaptive_resolution=request.adaptive_resolution,
        num_frames=request.num_frames,
        num_steps=request.num_steps,
        sigma_max=request.sigma_max,
        seed=seed,
        num_samples=request.num_samples,
        attention=request.attention,
        sla_topk=request.sla_topk,
        ode=request.ode,
        boundary=request.boundary,
        fps=request.fps,
    )


def error_response(exc: BaseException, job_id: str) -> dict[str, Any]:
    """``{"error": "<CODE>: <one line>"}`` for a failed job, plus ``refresh_worker`` where a fresh worker
    would not fail the same way (its GPU, its process group or its disk is suspect)."""
    refresh = False
    if isinstance(exc, InputError):
        code, message = "E_INPUT", str(exc)
    elif isinstance(exc, JobStopped):
        code, message = "E_STOPPED", str(exc)
    elif isinstance(exc, ModelError):
        code, message = "E_MODEL", str(exc)
    elif isinstance(exc, UploadError):
        code, message = "E_UPLOAD", str(exc)
    elif is_out_of_memory(exc):
        code, refresh = "E_OOM", True
        message = (
            "the GPU ran out of memory; ask for fewer frames, samples or a lower resolution "
            "(this worker is being replaced)"
        )
    elif isinstance(exc, ParallelError):
        code, refresh = "E_CUDA", True
        message = f"the multi-GPU group failed ({one_line(str(exc), 300)}); this worker is being replaced, retry the job"
    elif isinstance(exc, EncodeError):  # this worker's disk: a fresh worker brings a fresh one
        code, refresh = "E_INTERNAL", True
        message = f"{exc}; this worker is being replaced, retry the job"
    elif is_cuda_broken(exc):
        code, refresh = "E_CUDA", True
        message = f"the GPU failed ({one_line(str(exc), 200)}); this worker is being replaced, retry the job"
    else:
        code, message = (
            "E_INTERNAL",
            f"unexpected {type(exc).__name__}; the worker log has the details (job {job_id})",
        )
    answer: dict[str, Any] = {"error": f"{code}: {one_line(message, 1000)}"}
    if refresh:
        answer["refresh_worker"] = True
        if torch.cuda.is_available():
            # A broken CUDA context fails this call as well: the answer (and its refresh_worker) still goes.
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    if code in ("E_INPUT", "E_MODEL", "E_STOPPED"):
        logger.info("job %s: %s", job_id, answer["error"])
    else:
        logger.error("job %s: %s", job_id, answer["error"], exc_info=code != "E_UPLOAD")
    return answer


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or ("out of memory" in text and "cuda" in text)


def is_cuda_broken(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _CUDA_BROKEN)
