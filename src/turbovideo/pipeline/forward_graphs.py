"""DiT forwards replayed as CUDA graphs, one capture per model and input shape.

The host takes about as long to launch a 1.3B forward's ~1,000 kernels (int8) as an H200 takes to run them,
so in stretches of short kernels the GPU waits on Python. A shape's first forward runs eagerly (it
compiles and tunes kernels, which a capture must not do), the second is captured (kernels/cuda_graph.py,
cut around SpargeAttn's launches) and replayed, and later ones replay. A capture reads the weights
where they were: any moved weight drops that model's graphs. A request's text keys (``WanDiT.text_keys``,
~200 short launches made once a request) replay the same way.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from turbovideo.kernels.cuda_graph import SegmentedGraph
from turbovideo.pipeline.device_slots import canonical_device

log = logging.getLogger(__name__)

# x, t, context, y; the context may be a tuple of tensors and None (the DiT's TextKeys)
Inputs = tuple[torch.Tensor | tuple | None, ...]


@dataclass
class _Capture:
    graph: SegmentedGraph
    inputs: Inputs  # the tensors the graph reads: each call's inputs are copied in
    output: Any  # tensors in the graphs' pool: overwritten by the next replay


@dataclass
class _ModelGraphs:
    """One model's graphs, and where its weights were when they were captured."""

    weight_slots: list[tuple[dict, str]]
    weights: tuple[int, ...] = ()
    captures: dict[tuple, _Capture] = field(default_factory=dict)
    seen: set[tuple] = field(default_factory=set)  # shapes run eagerly once
    failed: set[tuple] = field(default_factory=set)  # shapes whose capture failed: they run eagerly


class ForwardGraphs:
    """``graphs(model, x, t, context, y)`` returns ``model(x, t, context, y)``, through CUDA graphs from
    the second call with the same shapes on; ``graphs(model, *inputs, method="text_keys")`` the same for
    ``model.text_keys(*inputs)``. All graphs share one memory pool, so they must run one at a time (as
    requests' steps do); ``clear()`` frees it. A model's graphs go with the model."""

    def __init__(self) -> None:
        self._pool: tuple[int, int] | None = None
        self._models: weakref.WeakKeyDictionary[nn.Module, _ModelGraphs] = weakref.WeakKeyDictionary()
        self.pool_bytes = 0  # what the pool holds (measured as the allocator's growth at each capture)

    def __call__(
        self, model: nn.Module, *inputs: torch.Tensor | tuple | None, method: str = "forward"
    ) -> Any:
        graphs = self._models.get(model)
        if graphs is None:
            graphs = self._models[model] = _ModelGraphs(_weight_slots(model))
        weights = tuple(tensors[name].data_ptr() for tensors, name in graphs.weight_slots)
        if weights != graphs.weights:
            graphs = self._models[model] = _ModelGraphs(graphs.weight_slots, weights)
        # A forward depends on the attention settings; the text keys do not.
        settings = (model.attention_backend, model.sla_topk) if method == "forward" else ()
        key = (method, *settings, *map(_signature, _leaves(inputs)))
        run = model if method == "forward" else getattr(model, method)  # model() runs its hooks
        capture = graphs.captures.get(key)
        if capture is None:
            if key not in graphs.seen or key in graphs.failed:
                graphs.seen.add(key)
                return run(*inputs)
            capture = self._capture(graphs, key, run, inputs)
            if capture is None:
                return run(*inputs)
        for buffer, value in zip(_leaves(capture.inputs), _leaves(inputs), strict=True):
            if buffer is not None:
                buffer.copy_(value)
        capture.graph.replay()
        return _clone(capture.output)

    def captured(self, model: nn.Module, method: str = "forward") -> int:
        """How many input shapes of ``model``'s ``method`` replay as graphs."""
        graphs = self._models.get(model)
        return 0 if graphs is None else sum(key[0] == method for key in graphs.captures)

    def clear(self) -> None:
        """Drop every graph and free their memory pool."""
        self._models.clear()
        self._pool = None
        self.pool_bytes = 0

    def _capture(
        self, graphs: _ModelGraphs, key: tuple, run: Callable[..., Any], inputs: Inputs
    ) -> _Capture | None:
        if self._pool is None or not any(other.captures for other in self._models.values()):
            # The allocator keeps a pool only while a graph captured into it lives: once every graph is
            # gone (their models freed, or their weights moved), its handle cannot be captured into again.
            self._pool = torch.cuda.graph_pool_handle()
            self.pool_bytes = 0
        static = tuple(map(_clone, inputs))
        graph = SegmentedGraph(self._pool)
        before = torch.cuda.memory_reserved()
        try:
            output = graph.capture(lambda: run(*static))
        except RuntimeError as exc:  # run eagerly from now on: slower, never wrong
            log.warning("a DiT %s could not be captured as a CUDA graph; it runs eagerly: %s", key[0], exc)
            graphs.failed.add(key)
            return None
        self.pool_bytes += max(0, torch.cuda.memory_reserved() - before)
        capture = graphs.captures[key] = _Capture(graph, static, output)
        log.info("DiT %s of %s: captured in %d CUDA graphs", key[0], tuple(inputs[0].shape), graph.segments)
        return capture


_ON_DEVICE: dict[torch.device, ForwardGraphs] = {}


def graphs_on(device: torch.device | str) -> ForwardGraphs:
    """The ForwardGraphs of ``device``, shared by every pipeline there: one pool, which each plan counts."""
    return _ON_DEVICE.setdefault(canonical_device(device), ForwardGraphs())


def _leaves(inputs: Inputs) -> list[torch.Tensor | None]:
    return [leaf for value in inputs for leaf in (value if isinstance(value, tuple) else (value,))]


def _clone(value: torch.Tensor | tuple | None) -> torch.Tensor | tuple | None:
    if isinstance(value, tuple):
        items = map(_clone, value)
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # a NamedTuple or not
    return None if value is None else value.clone()


def _signature(value: torch.Tensor | None) -> tuple | None:
    return None if value is None else (tuple(value.shape), value.dtype, value.device)


def _weight_slots(model: nn.Module) -> list[tuple[dict, str]]:
    """Where to look up each weight: moving a module (``.to()``, pipeline.device_slots.DeviceSlot) assigns
    new tensors or data there. Reading them at each call takes 0.15 ms for the 1.3B's 1,185 tensors
    (2 ms walking the modules; on our 2-core CI machine)."""
    return [
        (tensors, name)
        for module in model.modules()
        for tensors in (module._parameters, module._buffers)
        for name, tensor in tensors.items()
        if tensor is not None
    ]
