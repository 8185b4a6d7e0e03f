"""One process per GPU, driven by the worker process: start, replicate the DiTs, run forwards, fail loudly.

The process that serves jobs is rank 0 (the leader). ``SequenceParallelGroup.start`` spawns one
follower process per other GPU and joins them in a process group; ``replicate`` copies a loaded DiT
to every follower (weights broadcast from rank 0, so followers read no files) and returns a
``ParallelDiT`` that the pipeline calls like the model itself. Each forward is announced to the
followers over a pipe and then computed jointly (ulysses.py).

Commands travel over pipes rather than collectives because followers idle between jobs for as long
as the endpoint is quiet, and a collective left waiting that long would hit the group's timeout.

Any failure in the group (a follower that raises or dies, a collective that errors or outlasts the
timeout) breaks the group for good: the forward raises ``ParallelError`` with the follower's own
message when there is one, and the worker asks RunPod for a fresh worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn

from turbovideo.errors import one_line
from turbovideo.models.dit import DIT_CONFIGS, DiTConfig, WanDiT

from .errors import ParallelError
from .ulysses import check_head_split, sharded_forward

__all__ = [
    "MULTICAST_OFF",
    "ParallelDiT",
    "SequenceParallelGroup",
    "choose_degree",
]

logger = logging.getLogger("turbovideo.parallel")

# NVLink multicast (NVLS) can put a host's shared GPUs out of service; keep it off in every process.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
DEFAULT_TIMEOUT_S = 600.0
# How long a failing group is given to deliver the follower's own error message.
_ERROR_GRACE_S = 5.0
_POLL_S = 0.001


def choose_degree(requested: int | None, available: int, heads: Sequence[tuple[str, int]]) -> int:
    """How many ranks one request spreads over: ``requested`` if given, else as many of ``available``
    as split every served model's heads.

    ``heads`` lists (label, head count) of the served models. A ``requested`` count that is not
    available or that some model cannot split raises ValueError (one sentence); the automatic
    choice never does.
    """
    available = max(available, 1)
    if requested is not None:
        if not 1 <= requested <= available:
            raise ValueError(
                f"SP_DEGREE={requested} asks for more GPUs than the {available} visible; set the endpoint's "
                f"GPUs per worker to {requested}, or SP_DEGREE to at most {available} (unset: all of them)"
            )
        for label, count in heads:
            check_head_split(label, count, requested)
        return requested
    degree = next(d for d in range(available, 0, -1) if all(count % d == 0 for _, count in heads))
    if degree < available:
        label, count = next((label, count) for label, count in heads if count % available)
        logger.warning(
            "%s has %d attention heads, which %d GPUs cannot split evenly; using %d of them",
            label,
            count,
            available,
            degree,
        )
    return degree


def visible_ranks(requested: int | None) -> int:
    """The GPUs a request could spread over; without CUDA, the ``requested`` CPU processes (gloo)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else (requested or 1)


def configure_environment() -> None:
    """NVLink multicast off; NCCL errors abort the communicators without killing the process (the
    default kills it), so that the leader can answer the job and ask to be replaced."""
    os.environ.update(MULTICAST_OFF)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


class SequenceParallelGroup:
    """The leader's handle on the process group: followers, their pipes, and whether the group still works."""

    def __init__(
        self,
        world_size: int,
        device: torch.device,
        processes: list[multiprocessing.process.BaseProcess],
        pipes: list[Connection],
        timeout_s: float,
    ) -> None:
        self.world_size = world_size
        self.device = device
        self.timeout_s = timeout_s
        self._processes = processes
        self._pipes = pipes
        self._replicas = 0
        self._failure: str | None = None

    @classmethod
    def start(
        cls,
        world_size: int,
        *,
        backend: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        initializer: Callable[[], None] | None = None,
    ) -> SequenceParallelGroup:
        """Spawn ``world_size - 1`` followers and join them as rank 0; raises ParallelError if any fails to start.

        ``backend`` is "nccl" (rank r on cuda:r, the default with CUDA) or "gloo" (CPU). ``initializer``
        (picklable) runs first thing in every follower, e.g. to set up logging.
        """
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl" and torch.cuda.device_count() < world_size:
            raise ValueError(f"{world_size} GPUs requested but {torch.cuda.device_count()} are visible")
        configure_environment()  # inherited by the spawned followers, and set again in them
        device = _rank_device(backend, 0)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = multiprocessing.get_context("spawn")
        processes, pipes = [], []
        for rank in range(1, world_size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_follower_main,
                args=(rank, world_size, init_method, backend, timeout_s, theirs, initializer),
                name=f"turbovideo-rank{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            processes.append(process)
            pipes.append(ours)
        group = cls(world_size, device, processes, pipes, timeout_s)
        try:
            group._await_ready()
            if device.type == "cuda":
                torch.cuda.set_device(device)
            group._join(lambda: _join_group(backend, init_method, 0, world_size, timeout_s, device))
        except BaseException as exc:
            raise group._fail(exc) from exc
        logger.info("sequence-parallel group of %d ranks up (%s)", world_size, backend)
        return group

    @property
    def broken(self) -> bool:
        return self._failure is not None

    @torch.no_grad()
    def replicate(self, model: WanDiT) -> ParallelDiT:
        """Give every follower a copy of ``model`` (same config, dtype, layout and weights); wrap it for use."""
        config = model.config
        check_head_split(config.label, config.num_heads, self.world_size)
        key = self._replicas
        self._replicas += 1
        dtype = model.patch_embedding.weight.dtype
        tensors = _all_tensors(model)
        layout = [(tensor.shape, tensor.dtype) for tensor in tensors]
        self._send(("replicate", key, config.name, dtype, model.quantized, len(model.blocks), layout))
        try:
            for tensor in tensors:
                dist.broadcast(tensor.detach().to(self.device).contiguous(), src=0)
            self._finish()
        except BaseException as exc:
            raise self._fail(exc) from exc
        return ParallelDiT(model, self, key)

    @torch.inference_mode()
    def forward(
        self,
        key: int,
        model: WanDiT,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run one forward of replica ``key`` (``model`` on this rank) across the group."""
        x, t, context = (tensor.contiguous() for tensor in (x, t, context))
        y = None if y is None else y.contiguous()
        present = [tensor for tensor in (x, t, context, y) if tensor is not None]
        specs = [(tensor.shape, tensor.dtype) for tensor in present]
        self._send(("forward", key, model.attention_backend, model.sla_topk, specs))
        try:
            for tensor in present:
                dist.broadcast(tensor, src=0)
            out = sharded_forward(model, x, t, context, y, dist.group.WORLD)
            self._finish()
        except BaseException as exc:
            raise self._fail(exc) from exc
        return out

    def close(self) -> None:
        """Stop the followers and leave the process group; the group cannot be used afterwards."""
        if not self.broken:
            with contextlib.suppress(ParallelError):
                self._send(("close",))
        # Every rank leaves the group at the same time (tearing down a communicator may wait for peers).
        if dist.is_initialized():
            dist.destroy_process_group()
        for process in self._processes:
            process.join(timeout=30 if not self.broken else 0)
        self._stop_followers()
        self._failure = self._failure or "the multi-GPU group was closed"

    # ----------------------------------------------------------------- failure handling

    def _send(self, message: tuple) -> None:
        if self._failure is not None:
            raise ParallelError(f"the multi-GPU group failed earlier: {self._failure}")
        try:
            for pipe in self._pipes:
                pipe.send(message)
        except (OSError, EOFError) as exc:
            raise self._fail(exc) from exc

    def _await_ready(self) -> None:
        """Wait until every follower has started (each says "ready"), failing at its first error or death."""
        waiting = set(range(1, self.world_size))
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            self._check_followers(waiting)
            if time.monotonic() > deadline:
                raise TimeoutError(f"GPU ranks {sorted(waiting)} did not start within {self.timeout_s:g} s")
            wait([*self._pipes, *(p.sentinel for p in self._processes)], timeout=0.1)

    def _join(self, init: Callable[[], None]) -> None:
        """Run ``init`` (joining the process group, which blocks until every rank joins or the timeout)
        while watching the followers: one that dies after saying "ready" fails the start at once.

        The abandoned join gives up at the group's timeout. A failed start is final for the process:
        torch.distributed's group naming has moved on, so no later group here could meet fresh followers."""
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                init()
            except BaseException as exc:  # handed to the calling thread
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name="turbovideo-join", daemon=True).start()
        while not done.wait(0.1):
            self._check_followers()
        if failure:
            raise failure[0]

    def _finish(self) -> None:
        """Wait for this rank's queued GPU work, watching the followers; gloo collectives are already done."""
        if self.device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record()
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            self._check_followers()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the GPUs did not finish within {self.timeout_s:g} s")
            time.sleep(_POLL_S)

    def _check_followers(self, starting: set[int] | None = None) -> None:
        """Raise ParallelError for a follower that reported an error or died; ranks that say "ready" leave ``starting``."""
        for rank, (process, pipe) in enumerate(zip(self._processes, self._pipes, strict=True), start=1):
            try:
                while pipe.poll():
                    kind, *detail = pipe.recv()
                    if kind == "error":
                        raise ParallelError(f"GPU rank {rank} failed: {detail[0]}")
                    if starting is not None:
                        starting.discard(rank)
            except (EOFError, OSError):
                pass  # the process is gone; its exit code says more than the closed pipe
            if not process.is_alive():
                raise ParallelError(f"GPU rank {rank} exited unexpectedly (exit code {process.exitcode})")

    def _fail(self, exc: BaseException) -> ParallelError:
        """Mark the group broken and describe why, preferring a follower's own report to this rank's symptom."""
        reason = str(exc) if isinstance(exc, ParallelError) else None
        deadline = time.monotonic() + _ERROR_GRACE_S
        while reason is None and time.monotonic() < deadline:
            try:
                self._check_followers()
            except ParallelError as follower:
                reason = str(follower)
                break
            time.sleep(0.05)
        if reason is None:
            reason = f"the multi-GPU group failed on rank 0 ({type(exc).__name__}: {one_line(str(exc), 300)})"
        self._failure = reason
        logger.error("%s", reason)
        self._stop_followers()
        if dist.is_initialized():
            # A collective waiting for a dead rank would otherwise spin on this GPU for good.
            with contextlib.suppress(Exception):
                c10d._abort_process_group()
        return ParallelError(reason)

    def _stop_followers(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)


class ParallelDiT(nn.Module):
    """A DiT whose forward runs on every GPU of the group; otherwise it behaves like the wrapped model."""

    def __init__(self, model: WanDiT, group: SequenceParallelGroup, key: int) -> None:
        super().__init__()
        self.model = model
        self.group = group
        self.key = key

    @property
    def config(self) -> DiTConfig:
        return self.model.config

    @property
    def quantized(self) -> bool:
        return self.model.quantized

    @property
    def attention_backend(self) -> str:
        return self.model.attention_backend

    @property
    def sla_topk(self) -> float:
        return self.model.sla_topk

    def set_attention(self, name: str = "auto", topk: float | None = None) -> None:
        self.model.set_attention(name, topk)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.group.forward(self.key, self.model, x, t, context, y)


def _rank_device(backend: str, rank: int) -> torch.device:
    """Rank r computes on cuda:r with NCCL; on the CPU with gloo."""
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _join_group(
    backend: str, init_method: str, rank: int, world_size: int, timeout_s: float, device: torch.device
) -> None:
    """Join the process group as ``rank`` (blocks until every rank has joined, or the timeout)."""
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


# --------------------------------------------------------------------- follower side


def _follower_main(
    rank: int,
    world_size: int,
    init_method: str,
    backend: str,
    timeout_s: float,
    pipe: Connection,
    initializer: Callable[[], None] | None,
) -> None:
    """A follower's whole life: start, then obey the leader's commands until "close" or the leader's end."""
    configure_environment()
    try:
        if initializer is not None:
            initializer()
        device = _rank_device(backend, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        pipe.send(("ready",))
        _join_group(backend, init_method, rank, world_size, timeout_s, device)
        _serve(pipe, device)
        dist.destroy_process_group()
    except EOFError:
        os._exit(0)  # the leader is gone; nothing is left to report to
    except BaseException as exc:
        logger.error("GPU rank %d failed:\n%s", rank, traceback.format_exc())
        try:
            pipe.send(("error", f"{type(exc).__name__}: {one_line(str(exc), 500)}"))
        finally:
            # At once: peers blocked in a collective with this rank see the closed connection and fail.
            os._exit(1)


def _serve(pipe: Connection, device: torch.device) -> None:
    replicas: dict[int, WanDiT] = {}
    while True:
        command, *args = pipe.recv()
        if command == "close":
            return
        if command == "replicate":
            key, name, dtype, quantized, num_blocks, layout = args
            replicas[key] = _receive_replica(name, dtype, quantized, num_blocks, layout, device)
        elif command == "forward":
            key, attention, topk, specs = args
            model = replicas[key]
            model.set_attention(attention, topk)
            tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
            for tensor in tensors:
                dist.broadcast(tensor, src=0)
            x, t, context, *condition = tensors
            with torch.inference_mode():
                sharded_forward(model, x, t, context, condition[0] if condition else None, dist.group.WORLD)
        else:
            raise ValueError(f"unknown command {command!r} from the leader")


def _receive_replica(
    name: str, dtype: torch.dtype, quantized: bool, num_blocks: int, layout: list, device: torch.device
) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(DIT_CONFIGS[name], dtype, quantized)
    model.blocks = model.blocks[:num_blocks]
    model = model.to_empty(device=device).eval().requires_grad_(False)
    tensors = _all_tensors(model)
    if [(tensor.shape, tensor.dtype) for tensor in tensors] != layout:
        # Receiving anyway would pour weights into the wrong tensors (or wait forever for more).
        raise ValueError(f"the {name} replica's tensors do not match rank 0's model")
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
    return model


def _all_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer, in the same order on every rank (non-persistent buffers included)."""
    return [*model.parameters(), *model.buffers()]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
