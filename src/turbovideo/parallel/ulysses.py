"""Ulysses sequence parallelism for the Wan DiT: one forward spread over the ranks of a process group.

Every rank holds the whole model. The token sequence is cut into one contiguous slice per rank, and
everything that works token by token (linears, norms, modulation, cross-attention, the head) runs on
the local slice only. Self-attention needs every token, so an all-to-all before it trades the
sequence split for a head split (each rank then sees the full sequence for H/P heads, and any
attention backend runs unchanged per head), and a second all-to-all after it trades back.

A sequence that does not divide by the rank count is padded at its end. Padded tokens are sliced off
before attention, so they never act as keys (a padded key would change every softmax row), and come
back as zeros after it; their outputs are dropped at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from turbovideo.models.attention import AttentionBackend
from turbovideo.models.layers import unpatchify

__all__ = ["UlyssesAttention", "check_head_split", "sharded_forward", "valid_degrees"]


def valid_degrees(num_heads: int, max_degree: int) -> list[int]:
    """The rank counts from 1 to ``max_degree`` that split ``num_heads`` evenly."""
    return [degree for degree in range(1, max_degree + 1) if num_heads % degree == 0]


def check_head_split(label: str, num_heads: int, world_size: int) -> None:
    """Raise ValueError (one sentence) unless ``world_size`` ranks can each take the same number of heads."""
    if num_heads % world_size == 0:
        return
    options = [str(d) for d in valid_degrees(num_heads, world_size) if d > 1] or ["1"]
    listed = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"
    raise ValueError(
        f"{label} has {num_heads} attention heads, which {world_size} GPUs cannot split evenly; "
        f"use {listed} GPU{'s' if options != ['1'] else ''}"
    )


class UlyssesAttention:
    """An attention backend that runs ``inner`` on the full sequence for this rank's share of the heads.

    Takes and returns this rank's token slice [B, L/P, H, D] (padded length); ``length`` is the true
    sequence length of the forward it serves.
    """

    def __init__(self, inner: AttentionBackend, group: dist.ProcessGroup, length: int) -> None:
        self.inner = inner
        self.group = group
        self.length = length
        # Reported as the wrapped implementation: which kernel ran is what callers want to know.
        self.name = inner.name
        self.block_q = inner.block_q
        self.block_k = inner.block_k

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, proj_l: nn.Linear, topk: float
    ) -> torch.Tensor:
        world = dist.get_world_size(self.group)
        qkv = _sequence_to_heads((q, k, v), self.group, world)
        q, k, v = (part[:, : self.length].contiguous() for part in qkv)
        out = self.inner(q, k, v, proj_l=proj_l, topk=topk)
        if qkv.shape[2] > self.length:
            out = F.pad(out, (0, 0, 0, 0, 0, qkv.shape[2] - self.length))
        return _heads_to_sequence(out, self.group, world)


def _sequence_to_heads(parts: tuple[torch.Tensor, ...], group: dist.ProcessGroup, world: int) -> torch.Tensor:
    """n tensors [B, Lloc, H, D] (this rank's tokens) -> [n, B, world*Lloc, H/world, D] (this rank's heads).

    One all-to-all for all n tensors: chunk j of the send buffer holds head group j and goes to rank j;
    chunk i of the receive buffer holds rank i's tokens, i.e. sequence slice i.
    """
    batch, local_len, heads, head_dim = parts[0].shape
    send = parts[0].new_empty(world, len(parts), batch, local_len, heads // world, head_dim)
    for index, part in enumerate(parts):
        send[:, index].copy_(part.reshape(batch, local_len, world, -1, head_dim).permute(2, 0, 1, 3, 4))
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    full = send.new_empty(len(parts), batch, world, local_len, heads // world, head_dim)
    full.copy_(received.permute(1, 2, 0, 3, 4, 5))
    return full.flatten(2, 3)


def _heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    """[B, world*Lloc, H/world, D] (this rank's heads) -> [B, Lloc, H, D] (this rank's tokens)."""
    batch, padded_len, local_heads, head_dim = x.shape
    send = x.reshape(batch, world, padded_len // world, local_heads, head_dim).transpose(0, 1).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # Chunk j of what arrived is head group j of this rank's tokens.
    return received.permute(1, 2, 0, 3, 4).reshape(batch, padded_len // world, world * local_heads, head_dim)


def local_rows(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of ``x`` along ``dim``, zero-padded at the end to a multiple of ``world``."""
    length = x.shape[dim]
    local_len = -(-length // world)
    pad = local_len * world - length
    if pad:
        widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
        x = F.pad(x, widths)
    # Contiguous: the fused kernels take only contiguous tensors (a no-op for batch 1).
    return x.narrow(dim, rank * local_len, local_len).contiguous()


def gather_rows(x: torch.Tensor, dim: int, length: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's slice of ``x`` concatenated along ``dim`` and cut to the true ``length``."""
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=dim).narrow(dim, 0, length)


@contextlib.contextmanager
def _attention_over(model: nn.Module, group: dist.ProcessGroup, length: int) -> Iterator[None]:
    """Route every block's self-attention through the all-to-all for one forward, then restore it."""
    attentions = model.self_attentions()
    backends = [attention.backend for attention in attentions]
    for attention, backend in zip(attentions, backends, strict=True):
        attention.backend = UlyssesAttention(backend, group, length)
    try:
        yield
    finally:
        for attention, backend in zip(attentions, backends, strict=True):
            attention.backend = backend


def sharded_forward(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    y: torch.Tensor | None,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """``model(x, t, context, y)`` computed jointly by every rank of ``group``; each rank gets the full output.

    Every rank must call it with the same inputs and an identical model.
    """
    config = model.config
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_head_split(config.label, config.num_heads, world)
    tokens, inputs = model.embed(x, t, context, y)
    length = tokens.shape[1]
    local_rope = tuple(local_rows(table, 0, rank, world) for table in inputs.rope)
    local_inputs = dataclasses.replace(inputs, rope=local_rope)
    # A copy of this rank's rows (for batch 1 a slice is a view): the full-length stream is then freed
    # instead of staying on every GPU through the blocks, where the memory plan counts only a share.
    local = local_rows(tokens, 1, rank, world).clone()
    del tokens
    with _attention_over(model, group, length):
        tokens = model.run_blocks(local, local_inputs)
    # The head works token by token, so it runs on the slice; gathering its 64 channels is cheaper
    # than gathering the model-width stream.
    out = gather_rows(model.head(tokens, inputs.e), 1, length, group)
    return unpatchify(out, inputs.grid, config.patch_size)
