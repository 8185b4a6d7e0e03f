"""CUDA graphs cut around launches a capture cannot record, and the DiT forwards replayed through them."""

import pytest
import torch
from turbovideo.kernels.cuda_graph import SegmentedGraph, outside_graph

from turbovideo.models import DIT_CONFIGS, build_dit
from turbovideo.pipeline.forward_graphs import ForwardGraphs

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_outside_a_capture_the_launch_runs_at_once():
    ran = []
    outside_graph(ran.append, 1)
    assert ran == [1]


@gpu
def test_replay_makes_the_cut_launches_between_the_graphs_in_order():
    x = torch.zeros(4, device="cuda")
    out = torch.zeros_like(x)  # not empty_like: reused memory would fail "not out.any()" below

    def fn() -> torch.Tensor:
        doubled = x * 2
        # Reads the first graph's output, feeds the second graph.
        outside_graph(lambda a, b: torch.add(a, 1, out=b), doubled, out)
        return out * 3

    graph = SegmentedGraph(torch.cuda.graph_pool_handle())
    result = graph.capture(fn)
    assert graph.segments == 2 and not out.any()  # recorded, not run
    for values in ([1.0, 2.0, 3.0, 4.0], [-5.0, 0.5, 7.0, 0.0]):
        x.copy_(torch.tensor(values))
        graph.replay()
        assert torch.equal(result, (x * 2 + 1) * 3)


@gpu
def test_the_recorded_launch_does_not_keep_its_tensors_from_the_pool():
    mib = 64

    def fn() -> torch.Tensor:
        scratch = torch.ones(mib << 18, device="cuda")  # 64 MiB of fp32
        outside_graph(lambda a: a.mul_(2), scratch)
        total = scratch.sum()
        del scratch  # free again once the second graph has read it, as in an eager run
        return total + torch.ones(mib << 18, device="cuda").sum()  # may take its memory

    fn()
    before = torch.cuda.memory_reserved()
    graph = SegmentedGraph(torch.cuda.graph_pool_handle())
    result = graph.capture(fn)
    grown = torch.cuda.memory_reserved() - before
    graph.replay()
    assert result.item() == 3 * (mib << 18)
    assert grown < 1.5 * (mib << 20)  # one 64 MiB buffer, not two


def _dit_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, 16, 3, 8, 12, device="cuda", generator=g).bfloat16()
    t = torch.tensor([937.0], device="cuda").bfloat16()
    context = torch.randn(1, 48, DIT_CONFIGS["tiny-t2v"].text_dim, device="cuda", generator=g).bfloat16()
    return x, t, context, None


@gpu
def test_forward_graphs_replay_the_forward_and_drop_the_graphs_when_the_weights_move():
    model = build_dit("tiny-t2v", device="cuda")
    graphs = ForwardGraphs()
    first = _dit_inputs(0)
    with torch.no_grad():
        expected = model(*first)
        torch.testing.assert_close(graphs(model, *first), expected, rtol=1e-3, atol=1e-3)
        assert graphs.captured(model) == 0  # the first call of a shape runs eagerly
        torch.testing.assert_close(graphs(model, *first), expected, rtol=1e-3, atol=1e-3)
        assert graphs.captured(model) == 1 and graphs.pool_bytes > 0
        second = _dit_inputs(1)
        torch.testing.assert_close(graphs(model, *second), model(*second), rtol=1e-3, atol=1e-3)
        held = list(model.state_dict().values())  # the old memory stays taken: the move gets new addresses
        model.to("cpu").to("cuda")  # a replay would read the old addresses
        del held
        torch.testing.assert_close(graphs(model, *second), model(*second), rtol=1e-3, atol=1e-3)
        assert graphs.captured(model) == 0
        # Every graph of the pool is gone: the next capture takes a new pool (the old one's handle is dead).
        torch.testing.assert_close(graphs(model, *second), model(*second), rtol=1e-3, atol=1e-3)
        assert graphs.captured(model) == 1


@gpu
def test_forward_graphs_replay_a_prompts_text_keys_and_the_forwards_that_take_them():
    model = build_dit("tiny-t2v", device="cuda", quantized=True)
    graphs = ForwardGraphs()
    with torch.no_grad():
        calls = []
        for seed in (0, 0, 1, 2):  # eager, captured, replayed with other inputs
            x, t, context, y = _dit_inputs(seed)
            keys = graphs(model, context, method="text_keys")
            expected = model.text_keys(context)
            assert all(torch.equal(a, b) for a, b in zip(keys[:2], expected[:2], strict=True))
            calls.append((graphs(model, x, t, keys, y), model(x, t, expected, y)))
    assert graphs.captured(model) == 1 and graphs.captured(model, "text_keys") == 1
    for replayed, eager in calls:
        torch.testing.assert_close(replayed, eager, rtol=1e-3, atol=1e-3)


class _RecordingGraph:
    """SegmentedGraph's stand-in off CUDA: runs fn at capture (keeping neither fn nor its model, as the
    real one keeps only the recorded work) and keeps the pool it was given."""

    pools: list = []

    def __init__(self, pool) -> None:
        self.pools.append(pool)
        self.segments = 1

    def capture(self, fn):
        return fn()

    def replay(self) -> None:
        pass


def test_a_capture_after_every_graph_is_gone_takes_a_new_pool(monkeypatch):
    # The allocator refuses to capture into a pool none of whose graphs lives (a dead handle).
    handles = iter(range(1, 100))
    monkeypatch.setattr("turbovideo.pipeline.forward_graphs.SegmentedGraph", _RecordingGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (next(handles), 0))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(_RecordingGraph, "pools", [])
    graphs = ForwardGraphs()

    def captured(model: torch.nn.Linear) -> None:
        with torch.no_grad():
            for _ in range(2):  # eager, then captured (a plain module: no attention settings to key on)
                graphs(model, torch.ones(2, 4), method="__call__")

    first, second, third = (torch.nn.Linear(4, 4) for _ in range(3))
    captured(first)
    captured(second)
    assert _RecordingGraph.pools == [(1, 0), (1, 0)]  # shared while one of its graphs lives
    del first, second
    captured(third)
    assert _RecordingGraph.pools[-1] == (2, 0)
    third.weight.data = third.weight.data.clone()  # its graphs are dropped at the next call
    captured(third)
    assert _RecordingGraph.pools[-1] == (3, 0)
