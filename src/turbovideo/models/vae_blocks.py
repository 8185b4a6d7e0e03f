"""Building blocks of the Wan2.1 causal 3D VAE (upstream-spec §7.3), named so the state dict matches
``Wan2.1_VAE.pth`` key for key.

Every block takes ``(x, cache)``: the ``FeatureCache`` carries the causal history of each temporal
conv between chunks and says which implementation runs (fast channels-last or upstream-like eager).
Tensors are ``[B, C, T, H, W]``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .vae_cache import Activation, FeatureCache
from .vae_ops import add_bias_, norm_silu_into, rms_norm_last_dim, upsample_nearest2x


class RMSNorm(nn.Module):
    """RMS norm over channels: ``x / max(||x||, 1e-12) * sqrt(C) * gamma`` (no bias, no mean)."""

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))
        self.scale = math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upstream's op sequence on ``[B, C, ...]``."""
        return F.normalize(x, dim=1) * self.scale * self.gamma

    def over_last_dim(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        """The same norm on ``[..., C]`` (channels last)."""
        if fast:
            return rms_norm_last_dim(x, self.gamma.flatten())
        return F.normalize(x, dim=-1) * self.scale * self.gamma.flatten()

    def norm_silu(
        self, x: torch.Tensor, out: torch.Tensor | None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """SiLU(norm(x)), written into ``out`` (fast path) or returned as a new tensor (eager path).

        ``bias`` (fast path only) is the producing conv's bias, added to ``x`` as it is read.
        """
        if out is None:
            return F.silu(self(x))
        return norm_silu_into(x, self.gamma.flatten(), out, bias)


def _channels_to_last(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W]`` as a ``[B, T, H, W, C]`` view (contiguous when x is channels-last 3D)."""
    return x.permute(0, 2, 3, 4, 1)


class CausalConv3d(nn.Conv3d):
    """A conv that is causal in time: output frame t sees input frames up to t, zeros before the clip.

    ``padding`` holds the spatial padding only; the temporal context comes from the cache.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel: tuple[int, int, int],
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        padding = (0, kernel[1] // 2, kernel[2] // 2)
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=padding)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, cache: FeatureCache, activation: Activation | None = None, bias: bool = True
    ) -> torch.Tensor:
        return cache.conv(self, x, activation, bias)


def _conv3x3x3(in_dim: int, out_dim: int) -> CausalConv3d:
    return CausalConv3d(in_dim, out_dim, (3, 3, 3))


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices 1, 4, 5 (SiLU, SiLU, Dropout(0)) hold no weights; they keep upstream's key numbering.
        # The forward fuses each SiLU into the norm before it.
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            _conv3x3x3(in_dim, out_dim),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(0.0),
            _conv3x3x3(out_dim, out_dim),
        )
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        if not cache.fast:  # upstream's op sequence
            skip = x if self.shortcut is None else self.shortcut(x)
            h = conv1(x, cache, norm1.norm_silu)
            h = conv2(h, cache, norm2.norm_silu)
            return h.add_(skip)
        # Each conv bias is added by the pass that reads the conv's output next: conv1's by norm2,
        # conv2's and the shortcut's by the residual add.
        h = conv1(x, cache, norm1.norm_silu, bias=False)
        h = conv2(h, cache, partial(norm2.norm_silu, bias=conv1.bias), bias=False)
        if self.shortcut is None:
            return add_bias_(h, conv2.bias, x)
        return add_bias_(h, conv2.bias, F.conv3d(x, self.shortcut.weight), self.shortcut.bias)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        batch, dim, frames, height, width = x.shape
        # One sequence of H*W tokens per frame; a view when x is channels-last.
        tokens = _channels_to_last(x).reshape(batch * frames, height * width, dim)
        h = self.norm.over_last_dim(tokens, cache.fast)
        qkv = F.linear(h, self.to_qkv.weight.reshape(3 * dim, dim), self.to_qkv.bias)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = F.linear(h, self.proj.weight.reshape(dim, dim), self.proj.bias).add_(tokens)
        out = out.reshape(batch, frames, height, width, dim).permute(0, 4, 1, 2, 3)
        return out.contiguous(memory_format=cache.memory_format)


class Resample(nn.Module):
    """Spatial x2 down/up sampling per frame, with a temporal x2 conv in the 3D modes."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("down"):
            # Zero pad right/bottom by 1: the stride-2 window starts at pixel 0.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            if cache.started(self.time_conv):
                x = _interleave_halves(self.time_conv(x, cache), cache.memory_format)
            else:
                # Upstream's "Rep": the first chunk is not doubled in time, and the conv's stream
                # starts at the second chunk with zeros in front.
                cache.remember(self.time_conv, None)
        x = self._per_frame(x, cache)
        if self.mode == "downsample3d":
            if cache.started(self.time_conv):
                x = self.time_conv(x, cache)
            else:
                # The first chunk (one frame) passes unchanged; its frame is the next chunk's context.
                cache.remember(self.time_conv, x[:, :, -1:])
        return x

    def _per_frame(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        batch, dim, frames, height, width = x.shape
        # Views (no copy) when x is channels-last: frames become a channels-last 2D batch.
        images = x.transpose(1, 2).reshape(batch * frames, dim, height, width)
        if cache.fast:
            resize, conv = self.resample
            images = upsample_nearest2x(images) if self.mode.startswith("up") else resize(images)
            images = add_bias_(F.conv2d(images, conv.weight, None, conv.stride, conv.padding), conv.bias)
        else:
            images = self.resample(images)
        x = images.reshape(batch, frames, *images.shape[1:]).transpose(1, 2)
        return x.contiguous(memory_format=cache.memory_format)


def _interleave_halves(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``[B, 2C, T, ...]`` -> ``[B, C, 2T, ...]``: the first channel half gives even frames, the second odd."""
    batch, channels, frames, height, width = x.shape
    out = torch.empty(
        (batch, channels // 2, 2 * frames, height, width),
        dtype=x.dtype,
        device=x.device,
        memory_format=memory_format,
    )
    halves = x.unflatten(1, (2, channels // 2)).permute(0, 2, 3, 1, 4, 5)
    out.unflatten(2, (frames, 2)).copy_(halves)
    return out


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, out_dim: int) -> nn.ModuleList:
    # Index 1 is the SiLU (fused into the norm), kept for the key numbering.
    return nn.ModuleList([RMSNorm(dim), nn.SiLU(), _conv3x3x3(dim, out_dim)])


def _run(layers: nn.ModuleList, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache)
    return x


def _run_head(head: nn.ModuleList, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    norm, _, conv = head
    return conv(x, cache, norm.norm_silu)


class Encoder(nn.Module):
    """Video ``[B, 3, T, H, W]`` -> ``[B, 2*z_dim, T', H/8, W/8]`` (mean and log-variance)."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temporal_downsample: tuple[bool, ...],
    ) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = _conv3x3x3(3, dims[0])
        layers: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(dim_mult) - 1:
                layers.append(
                    Resample(out_dim, "downsample3d" if temporal_downsample[stage] else "downsample2d")
                )
        self.downsamples = nn.ModuleList(layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], z_dim * 2)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return _run_head(self.head, x, cache)


class Decoder(nn.Module):
    """Latent ``[B, z_dim, T, h, w]`` -> video ``[B, 3, T', 8h, 8w]`` (T' = 1 for the first chunk, else 4T)."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temporal_upsample: tuple[bool, ...],
    ) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = _conv3x3x3(z_dim, dims[0])
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if stage > 0:
                in_dim //= 2  # the previous stage's upsample conv halves the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[stage] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return _run_head(self.head, x, cache)
