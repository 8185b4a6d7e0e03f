"""CUDA graphs of code that makes launches a graph cannot record.

A DiT forward is ~1,000 launches (1.3B int8) whose Python costs the host about as long as the GPU takes to run
them (1.3B on an H200), so in stretches of short kernels the GPU waits; replaying a graph costs the
host a few microseconds. SpargeAttn's kernels launch on the legacy default stream, which a capture
cannot record, so ``SegmentedGraph`` records a function as a list of graphs cut at each
``outside_graph(launch, *args)`` call; replay runs the graphs and, between them, those launches as
Python calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_capture = threading.local()  # .graph: the SegmentedGraph recording on this thread, if any


def outside_graph(launch: Callable[..., None], *args: Any) -> None:
    """Call ``launch(*args)`` now, or, while a SegmentedGraph records, at each of its replays (between
    the work recorded before and after this call).

    The recorded call keeps its tensor arguments as views that do not own their memory, so the pool
    may hand it on once the caller lets them go, as it would in an eager run: a replay runs nothing
    between the work that wrote them and this call, and what it writes is read by tensors the caller
    still holds. (Holding them instead kept every block's SpargeAttn buffers: 8 GB at 1.3B 480p.)
    """
    graph = getattr(_capture, "graph", None)
    if graph is None:
        launch(*args)
    else:
        views = tuple(_unowned(a) if isinstance(a, torch.Tensor) else a for a in args)
        graph._cut(lambda: launch(*views))


def _unowned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a view of its memory that does not keep it allocated (as torch's own CUDA graph
    trees make them)."""
    storage = tensor.untyped_storage()
    memory = torch._C._construct_storage_from_data_pointer(
        storage.data_ptr(), tensor.device, storage.nbytes()
    )
    return tensor.new_empty(0).set_(memory, tensor.storage_offset(), tensor.shape, tensor.stride())


class SegmentedGraph:
    """``capture(fn)`` records fn's GPU work without running it; ``replay()`` runs it, on the current
    stream (the default stream where fn makes ``outside_graph`` launches that need it). fn must have
    run once already: a Triton autotuner's first call would record its trial runs.

    Tensors fn allocates live in ``pool`` (``torch.cuda.graph_pool_handle()``); graphs sharing a pool
    must not run concurrently, and what one returns is overwritten by the next one's replay.
    """

    def __init__(self, pool: tuple[int, int]) -> None:
        self._pool = pool
        self._steps: list[Callable[[], None]] = []
        self._graph: torch.cuda.CUDAGraph | None = None
        self.segments = 0  # how many graphs the capture was cut into

    def capture(self, fn: Callable[[], T]) -> T:
        torch.cuda.synchronize()  # nothing in flight may free memory into the pool meanwhile
        with torch.cuda.stream(torch.cuda.Stream()):  # a capture cannot use the default stream
            self._begin()
            _capture.graph = self
            try:
                out = fn()
            except BaseException:
                _capture.graph = None
                self._abandon()
                raise
            _capture.graph = None
            self._end()
        return out  # recorded, not run: nothing on the capture stream for the caller to wait for

    def replay(self) -> None:
        for step in self._steps:
            step()

    def _begin(self) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self._pool)

    def _end(self) -> None:
        assert self._graph is not None
        self._graph.capture_end()
        self._steps.append(self._graph.replay)
        self._graph = None
        self.segments += 1

    def _cut(self, launch: Callable[[], None]) -> None:
        self._end()
        self._steps.append(launch)
        self._begin()

    def _abandon(self) -> None:
        """End a failed capture so the stream is usable again; what it recorded is dropped."""
        graph, self._graph, self._steps, self.segments = self._graph, None, [], 0
        if graph is not None:
            try:
                graph.capture_end()
            except RuntimeError:  # the capture was already invalidated; ending it is all that was left
                pass
