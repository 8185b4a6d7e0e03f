"""The causal feature cache of the Wan2.1 VAE: what each temporal conv remembers between chunks.

Upstream encodes frame 0 alone and then 4 frames at a time (decode: one latent frame at a time),
and every temporal conv keeps the last input frames it saw so that chunked processing equals
one causal pass over the whole clip. For an ordinary conv (kernel 3, stride 1) the upstream rule
("keep the last 2 input frames, prepend the older cache's last frame when the chunk has one
frame, pad the missing front frames with zeros") is exactly: the conv runs on the stream
``[0, 0, x_0, x_1, ...]`` and keeps its last ``kernel - stride`` frames. The resample convs only
differ in how the stream starts (see ``Resample`` in vae_blocks.py).

Two implementations of the same rule, chosen by ``fast``:

* fast: one channels-last buffer ``[history, chunk]`` per call; the producer (norm + SiLU) writes
  the chunk straight into it, the spatial padding is done by the conv itself, and only the
  ``kernel - stride`` history frames are copied.
* eager (``fast=False``): upstream's way, contiguous NCDHW tensors, clone + cat + pad copies. It
  exists as the benchmark baseline and as a second implementation the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .vae_ops import add_bias_

# Writes the activation of ``x`` into ``out`` (fast path) or returns it (eager path, out=None).
Activation = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class FeatureCache:
    """Per-conv history for one encode or decode call (upstream's ``feat_cache`` list)."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self.memory_format = torch.channels_last_3d if fast else torch.contiguous_format
        self._history: dict[nn.Module, torch.Tensor | None] = {}

    def started(self, conv: nn.Module) -> bool:
        """Whether ``conv`` has seen a chunk (its slot is no longer empty)."""
        return conv in self._history

    def remember(self, conv: nn.Module, frames: torch.Tensor | None) -> None:
        """Set the slot of ``conv`` by hand: ``None`` marks it as started with no history (zeros)."""
        self._history[conv] = None if frames is None else frames.clone()

    def conv(
        self, conv: nn.Conv3d, x: torch.Tensor, activation: Activation | None = None, bias: bool = True
    ) -> torch.Tensor:
        """Run the causal ``conv`` on ``activation(x)`` preceded by the remembered frames.

        ``bias=False`` (fast path only) leaves the bias for the caller to fuse into the next pass.
        """
        if self.fast:
            return self._conv_fast(conv, x, activation, bias)
        return self._conv_eager(conv, x, activation)

    def _conv_fast(
        self, conv: nn.Conv3d, x: torch.Tensor, activation: Activation | None, bias: bool
    ) -> torch.Tensor:
        keep = _history_frames(conv)
        batch, _, frames, height, width = x.shape
        buffer = torch.empty(
            (batch, conv.in_channels, keep + frames, height, width),
            dtype=x.dtype,
            device=x.device,
            memory_format=torch.channels_last_3d,
        )
        history = self._history.get(conv)
        if history is None:
            buffer[:, :, :keep].zero_()
        else:
            buffer[:, :, :keep].copy_(history)
        chunk = buffer[:, :, keep:]
        if activation is None:
            chunk.copy_(x)
        else:
            activation(x, chunk)
        # Clone: a view would keep the whole buffer alive until the next chunk.
        self._history[conv] = buffer[:, :, frames:].clone()
        out = F.conv3d(buffer, conv.weight, None, conv.stride, (0, *conv.padding[1:]))
        return add_bias_(out, conv.bias) if bias else out

    def _conv_eager(self, conv: nn.Conv3d, x: torch.Tensor, activation: Activation | None) -> torch.Tensor:
        keep = _history_frames(conv)
        x = x if activation is None else activation(x, None)
        history = self._history.get(conv)
        new_history = x[:, :, -keep:].clone()
        if history is not None and new_history.shape[2] < keep:
            new_history = torch.cat([history[:, :, -1:], new_history], dim=2)
        front = keep
        if history is not None:
            x = torch.cat([history, x], dim=2)
            front -= history.shape[2]
        pad_h, pad_w = conv.padding[1:]
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h, front, 0))
        self._history[conv] = new_history
        return F.conv3d(x, conv.weight, conv.bias, conv.stride)


def _history_frames(conv: nn.Conv3d) -> int:
    """Input frames a causal conv needs from before the chunk: kernel minus stride (2, or 1 when strided)."""
    return conv.kernel_size[0] - conv.stride[0]
