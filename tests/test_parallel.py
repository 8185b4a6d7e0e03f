"""Ulysses sequence parallelism on the CPU: 2 gloo ranks must reproduce one process, failures must surface.

The same launcher the worker uses starts the group (this test process is rank 0); fp32 weights and
inputs, so any difference beyond fp32 rounding is a bug in the sharding.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from turbovideo.models import build_dit
from turbovideo.models.attention import DenseAttention, register_attention
from turbovideo.parallel import (
    ParallelError,
    SequenceParallelGroup,
    UlyssesAttention,
    check_head_split,
    choose_degree,
)
from turbovideo.parallel.launcher import _free_port
from turbovideo.parallel.ulysses import local_rows

TIMEOUT_S = 60.0
# fp32 everywhere; the sharded run differs only in how matmuls over fewer rows are blocked.
TOLERANCE = 1e-5


@pytest.fixture(scope="class")
def group():
    # One default process group per process: each group here is closed before the next one starts.
    group = SequenceParallelGroup.start(2, backend="gloo", timeout_s=TIMEOUT_S)
    yield group
    group.close()


def _inputs(model, latent: tuple[int, int, int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    x = torch.randn(1, 16, *latent, generator=generator)
    t = torch.tensor([[700.0]])
    context = torch.randn(1, 512, config.text_dim, generator=generator)
    y = torch.randn(1, config.cond_dim, *latent, generator=generator) if config.task == "i2v" else None
    return x, t, context, y


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class TestTwoRanks:
    @pytest.mark.parametrize(
        ("name", "latent", "attention", "topk"),
        [
            ("tiny-t2v", (2, 6, 8), "dense", None),  # 24 tokens: 12 per rank
            ("tiny-t2v", (3, 6, 10), "dense", None),  # 45 tokens: the last rank holds one padded token
            ("tiny-i2v", (3, 6, 10), "dense", None),
            # 297 tokens, 5 key blocks of 64 of which SLA keeps 2: a padded key would change the selection.
            ("tiny-t2v", (3, 18, 22), "sla", 0.5),
        ],
    )
    def test_match_one_process(self, group, name, latent, attention, topk):
        model = build_dit(name, dtype=torch.float32, attention=attention, seed=3)
        model.set_attention(attention, topk)
        inputs = _inputs(model, latent, seed=4)
        with torch.inference_mode():
            expected = model(*inputs)
        parallel = group.replicate(model)
        assert parallel.attention_backend == model.attention_backend
        out = parallel(*inputs)
        assert out.shape == expected.shape
        assert _relative(out, expected) < TOLERANCE
        # The model itself is left as it was: its backend is restored after the sharded forward.
        assert type(model.blocks[0].self_attn.attn_op.local_attn.backend) is not UlyssesAttention


def _check_ulysses_attention(rank: int, port: int) -> None:
    """Each rank: its slice through UlyssesAttention equals the same rows of one full attention."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 45, 4, 8, generator=generator) for _ in range(3))
        dense = DenseAttention()
        expected = dense(q, k, v, proj_l=None, topk=1.0)
        attention = UlyssesAttention(dense, dist.group.WORLD, 45)
        q_l, k_l, v_l = (local_rows(part, 1, rank, 2) for part in (q, k, v))
        out = attention(q_l, k_l, v_l, proj_l=None, topk=1.0)
        valid = min(45 - rank * 23, 23)
        torch.testing.assert_close(out[:, :valid], local_rows(expected, 1, rank, 2)[:, :valid])
        assert not out[:, valid:].any()  # the padded row comes back as zeros
    finally:
        dist.destroy_process_group()


def test_ulysses_attention_splits_several_heads_per_rank():
    # 4 heads on 2 ranks (2 per rank), batch 2 and an uneven length: the all-to-all layout in full.
    port = _free_port()
    peer = mp.get_context("spawn").Process(target=_check_ulysses_attention, args=(1, port))
    peer.start()
    _check_ulysses_attention(0, port)
    peer.join(timeout=TIMEOUT_S)
    assert peer.exitcode == 0


class _Exploding:
    name = "dense"
    block_q = None
    block_k = None

    def __call__(self, q, k, v, *, proj_l, topk):
        raise RuntimeError("injected attention failure")


def _break_attention_here() -> None:
    register_attention("dense", _Exploding(), priority=100)


def _fail_to_start() -> None:
    raise RuntimeError("injected start failure")


def test_a_follower_that_raises_fails_the_job_quickly():
    broken = SequenceParallelGroup.start(
        2, backend="gloo", timeout_s=TIMEOUT_S, initializer=_break_attention_here
    )
    try:
        model = build_dit("tiny-t2v", dtype=torch.float32, attention="dense", seed=3)
        parallel = broken.replicate(model)
        started = time.monotonic()
        with pytest.raises(
            ParallelError, match="GPU rank 1 failed: RuntimeError: injected attention failure"
        ):
            parallel(*_inputs(model, (2, 6, 8), seed=4))
        assert time.monotonic() - started < TIMEOUT_S / 2
        assert broken.broken
        # Later jobs fail at once with the same reason instead of touching the dead group.
        with pytest.raises(
            ParallelError, match="failed earlier: GPU rank 1 failed: RuntimeError: injected attention failure"
        ):
            parallel(*_inputs(model, (2, 6, 8), seed=4))
    finally:
        broken.close()


def test_a_follower_that_dies_fails_the_job():
    dying = SequenceParallelGroup.start(2, backend="gloo", timeout_s=TIMEOUT_S)
    try:
        model = build_dit("tiny-t2v", dtype=torch.float32, attention="dense", seed=3)
        parallel = dying.replicate(model)
        dying._processes[0].kill()
        with pytest.raises(ParallelError, match=r"GPU rank 1 exited unexpectedly \(exit code -9\)"):
            parallel(*_inputs(model, (2, 6, 8), seed=4))
    finally:
        dying.close()


def test_a_model_the_followers_cannot_rebuild_is_refused():
    group = SequenceParallelGroup.start(2, backend="gloo", timeout_s=TIMEOUT_S)
    try:
        # Fewer blocks than its config (a benchmark's --blocks) is a model the followers rebuild.
        model = build_dit("tiny-t2v", dtype=torch.float32, attention="dense", seed=3)
        model.blocks = model.blocks[:1]
        inputs = _inputs(model, (2, 6, 8), seed=4)
        with torch.inference_mode():
            expected = model(*inputs)
        assert _relative(group.replicate(model)(*inputs), expected) < TOLERANCE
        model = build_dit("tiny-t2v", dtype=torch.float32, attention="dense", seed=3)
        model.head.head = torch.nn.Linear(64, 32)  # not what a tiny-t2v is made of
        with pytest.raises(ParallelError, match="tiny-t2v replica's tensors do not match rank 0's model"):
            group.replicate(model)
    finally:
        group.close()


def test_a_follower_that_cannot_start_fails_the_start():
    with pytest.raises(ParallelError, match="GPU rank 1 failed: RuntimeError: injected start failure"):
        SequenceParallelGroup.start(2, backend="gloo", timeout_s=TIMEOUT_S, initializer=_fail_to_start)


_DIES_WHILE_JOINING = """
import os, sys, threading, time
from turbovideo.parallel import ParallelError, SequenceParallelGroup


def die_after_saying_ready():  # as a follower whose NCCL setup kills it while it joins the group
    threading.Timer(0.05, os._exit, (7,)).start()


if __name__ == "__main__":
    started = time.monotonic()
    try:
        SequenceParallelGroup.start(2, backend="gloo", timeout_s=60, initializer=die_after_saying_ready)
    except ParallelError as exc:
        print(f"{time.monotonic() - started:.1f} s: {exc}", flush=True)
        os._exit(0)  # not waiting for the abandoned join, which gives up at the group's timeout
    sys.exit("the start did not fail")
"""


def test_a_follower_that_dies_while_joining_fails_the_start_at_once(tmp_path):
    # In a process of its own: a failed join is final for a process (torch.distributed's group
    # naming has moved on, so no later group there could meet fresh followers), as for a worker.
    script = tmp_path / "dies_while_joining.py"
    script.write_text(_DIES_WHILE_JOINING)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds, message = done.stdout.strip().split(" s: ", 1)
    assert "GPU rank 1 exited unexpectedly (exit code 7)" in message
    assert float(seconds) < 15  # not the group's 60 s


def test_head_counts_that_do_not_split_are_refused_in_one_sentence():
    with pytest.raises(ValueError) as refused:
        check_head_split("Wan2.1-1.3B", 12, 8)
    assert str(refused.value) == (
        "Wan2.1-1.3B has 12 attention heads, which 8 GPUs cannot split evenly; use 2, 3, 4 or 6 GPUs"
    )
    with pytest.raises(ValueError, match="which 3 GPUs cannot split evenly; use 2 GPUs$"):
        check_head_split("Wan2.1-14B", 40, 3)
    check_head_split("Wan2.1-14B", 40, 8)


def test_degree_follows_the_gpus_and_the_served_models():
    one_3b, big = ("Wan2.1-1.3B", 12), ("Wan2.1-14B", 40)
    assert choose_degree(None, 8, [big]) == 8
    assert choose_degree(None, 8, [one_3b]) == 6  # the most GPUs that split 12 heads
    assert choose_degree(None, 8, [one_3b, big]) == 4
    assert choose_degree(None, 0, [big]) == 1
    assert choose_degree(1, 8, [big]) == 1
    with pytest.raises(ValueError, match="12 attention heads, which 8 GPUs cannot split evenly"):
        choose_degree(8, 8, [one_3b])
    with pytest.raises(ValueError, match="SP_DEGREE=9 asks for more GPUs than the 8 visible"):
        choose_degree(9, 8, [big])
    # A 2-GPU Hub preset on an endpoint left at one GPU per worker: said "use 1 to 1", not what to change.
    with pytest.raises(
        ValueError, match="set the endpoint's GPUs per worker to 2, or SP_DEGREE to at most 1"
    ):
        choose_degree(2, 1, [big])
