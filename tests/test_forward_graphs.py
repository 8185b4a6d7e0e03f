"""pipeline/forward_graphs.py's bookkeeping on the CPU: which call runs eagerly, which captures, what a
replay reads and returns, and when graphs are dropped. A CPU has no CUDA graphs, so a stand-in records
the captured function and reruns it on its static inputs at each replay, writing into the tensors the
capture returned, as a graph writes into its pool (tests/test_cuda_graph.py runs the real ones on a GPU)."""

import logging

import pytest
import torch

import turbovideo.pipeline.forward_graphs as forward_graphs
from turbovideo.models import DIT_CONFIGS, build_dit
from turbovideo.pipeline.forward_graphs import ForwardGraphs


class _StandInGraph:
    """SegmentedGraph's interface: ``capture`` runs fn once for its outputs' shapes, ``replay`` reruns it
    and copies the results into those outputs."""

    fail = False  # class-wide: make every capture raise, as a capture of an uncapturable launch does

    def __init__(self, pool: object) -> None:
        self.segments = 1
        self._fn = None
        self._output = None

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self._fn, self._output = fn, fn()
        return self._output

    def replay(self) -> None:
        _copy_into(self._output, self._fn())


def _copy_into(target, value) -> None:
    if isinstance(target, tuple):
        for t, v in zip(target, value, strict=True):
            _copy_into(t, v)
    elif target is not None:
        target.copy_(value)


@pytest.fixture
def graphs(monkeypatch):
    monkeypatch.setattr(forward_graphs, "SegmentedGraph", _StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 0))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    monkeypatch.setattr(_StandInGraph, "fail", False)
    return ForwardGraphs()


def _inputs(seed: int, rows: int = 48) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 8, 12, generator=g).bfloat16()
    t = torch.tensor([937.0 - seed]).bfloat16()
    context = torch.randn(1, rows, DIT_CONFIGS["tiny-t2v"].text_dim, generator=g).bfloat16()
    return x, t, context, None


@pytest.fixture(scope="module")
def model():
    return build_dit("tiny-t2v", device="cpu")


@torch.inference_mode()
def test_the_first_call_runs_eagerly_the_second_captures_later_ones_replay_their_own_inputs(graphs, model):
    results = [graphs(model, *_inputs(seed)) for seed in range(4)]
    assert graphs.captured(model) == 1
    for seed, result in enumerate(results):
        assert torch.equal(result, model(*_inputs(seed)))
    assert not torch.equal(results[2], results[3])  # each replay returned its own copy, not the pool's


@torch.inference_mode()
def test_text_keys_replay_and_feed_the_forwards_that_take_them(graphs, model):
    for seed in range(3):
        x, t, context, y = _inputs(seed)
        keys = graphs(model, context, method="text_keys")
        expected = model.text_keys(context)
        assert all(torch.equal(a, b) for a, b in zip(keys[:2], expected[:2], strict=True))
        assert torch.equal(graphs(model, x, t, keys, y), model(x, t, expected, y))
    assert graphs.captured(model, "text_keys") == 1 and graphs.captured(model) == 1


@torch.inference_mode()
def test_attention_settings_capture_the_forward_again_but_not_the_text_keys(graphs, model):
    x, t, context, y = _inputs(0)
    try:
        for topk in (0.1, 0.1, 0.2, 0.2):
            model.set_attention("sla", topk)
            keys = graphs(model, context, method="text_keys")
            assert torch.equal(graphs(model, x, t, keys, y), model(x, t, model.text_keys(context), y))
    finally:
        model.set_attention("auto", 0.1)
    assert graphs.captured(model) == 2 and graphs.captured(model, "text_keys") == 1


@torch.inference_mode()
def test_a_shape_captures_once_per_shape(graphs, model):
    for rows in (48, 48, 112, 112, 48):
        graphs(model, *_inputs(rows, rows))
    assert graphs.captured(model) == 2


@torch.inference_mode()
def test_moved_weights_drop_the_models_graphs(graphs, model):
    for seed in range(2):
        graphs(model, *_inputs(seed))
    assert graphs.captured(model) == 1
    weight = model.blocks[0].ffn[0].weight
    kept = weight.data
    try:
        weight.data = kept.clone()  # new memory, as an offload and reload gives: the graph read the old
        assert torch.equal(graphs(model, *_inputs(5)), model(*_inputs(5)))
        assert graphs.captured(model) == 0  # dropped; this shape runs eagerly once again
    finally:
        weight.data = kept


@torch.inference_mode()
def test_a_failed_capture_runs_eagerly_from_then_on_and_says_so(graphs, model, monkeypatch, caplog):
    monkeypatch.setattr(_StandInGraph, "fail", True)
    with caplog.at_level(logging.WARNING, logger="turbovideo.pipeline.forward_graphs"):
        results = [graphs(model, *_inputs(seed)) for seed in range(3)]
    assert graphs.captured(model) == 0
    assert caplog.text.count("could not be captured as a CUDA graph; it runs eagerly") == 1  # tried once
    for seed, result in enumerate(results):
        assert torch.equal(result, model(*_inputs(seed)))


@torch.inference_mode()
def test_clear_drops_every_graph(graphs, model):
    for seed in range(2):
        graphs(model, *_inputs(seed))
    graphs.clear()
    assert graphs.captured(model) == 0 and graphs.pool_bytes == 0
