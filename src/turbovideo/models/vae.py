"""The Wan2.1 causal 3D VAE (upstream-spec §7): 8x spatial, 4x temporal compression, 16 latent channels.

``encode`` turns a video in [-1, 1] into the normalised latent the DiT works on and ``decode`` turns
it back. Both run chunk by chunk with a causal feature cache exactly like upstream (frame 0 alone,
then 4 frames per chunk; decode one latent frame at a time), so memory stays bounded by one chunk
at full resolution whatever the clip length.

Latent normalisation uses upstream's constants in the VAE's dtype: ``mean`` and ``std`` are rounded
to that dtype and ``inv = 1 / std`` is computed in it, so in bf16 (the default, as upstream)
``encode`` gives ``(mu - mean) * inv`` and ``decode`` starts from ``z / inv + mean`` bit-for-bit like
upstream; in fp32 the same formulas use the unrounded constants (what diffusers and original Wan do).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import StateDict, load_into, read_state_dict
from .random_init import materialize
from .vae_blocks import Decoder, Encoder
from .vae_cache import FeatureCache

LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4
# Random weights: the last decoder conv is scaled so that decoded values stay mostly inside [-1, 1]
# (its input is unit-RMS after the norm; unscaled, about 1 % of values would leave the range).
_RANDOM_HEAD_SCALE = 0.25


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)


VAE_CONFIGS: dict[str, VAEConfig] = {
    "wan2.1-vae": VAEConfig(base_dim=96),
    "tiny": VAEConfig(base_dim=8),
}


def latent_frames(num_frames: int) -> int:
    """Latent frames for a clip of ``num_frames`` (4k+1) pixel frames: 1 + (F-1)//4."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least 1 frame, got {num_frames}")
    return 1 + (num_frames - 1) // TEMPORAL_FACTOR


def latent_shape(num_frames: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of the latent of a ``num_frames`` clip of ``width`` x ``height``."""
    return (
        VAE_CONFIGS["wan2.1-vae"].z_dim,
        latent_frames(num_frames),
        height // SPATIAL_FACTOR,
        width // SPATIAL_FACTOR,
    )


def pixel_frames(num_latent_frames: int) -> int:
    """Pixel frames decoded from ``num_latent_frames`` latent frames: 1 + 4(T-1)."""
    if num_latent_frames < 1:
        raise ValueError(f"a latent needs at least 1 frame, got {num_latent_frames}")
    return 1 + TEMPORAL_FACTOR * (num_latent_frames - 1)


class WanVAE(nn.Module):
    """Wan2.1 VAE with upstream's state-dict layout (``Wan2.1_VAE.pth``, 194 tensors).

    ``fast`` selects the channels-last implementation with fused norm + SiLU and copy-light cache;
    ``fast=False`` runs upstream's op sequence (contiguous NCDHW, cat/pad cache) as a baseline.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        z_dim = config.z_dim
        self.encoder = Encoder(
            config.base_dim, z_dim, config.dim_mult, config.num_res_blocks, config.temporal_downsample
        )
        self.conv1 = nn.Conv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)
        self.decoder = Decoder(
            config.base_dim,
            z_dim,
            config.dim_mult,
            config.num_res_blocks,
            tuple(reversed(config.temporal_downsample)),
        )
        self._fast = True

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @property
    def fast(self) -> bool:
        return self._fast

    @fast.setter
    def fast(self, value: bool) -> None:
        """Switch implementation; conv weights follow the activations' memory format."""
        self._fast = value
        formats = {
            5: torch.channels_last_3d if value else torch.contiguous_format,
            4: torch.channels_last if value else torch.contiguous_format,
        }
        with torch.no_grad():
            for param in self.parameters():
                if param.dim() in formats:
                    param.data = param.data.contiguous(memory_format=formats[param.dim()])

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[B, 3, F, H, W]`` in [-1, 1] (F = 4k+1, H and W multiples of 8) -> normalised latent
        ``[B, 16, 1 + (F-1)//4, H/8, W/8]`` in ``self.dtype``."""
        _check_video(video)
        with _cudnn_autotuned():
            return self._encode(video)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        x = video.to(device=self.device, dtype=self.dtype)
        cache = FeatureCache(self.fast)
        num_frames = x.shape[2]
        starts = [0, *range(1, num_frames, TEMPORAL_FACTOR)]
        ends = [*starts[1:], num_frames]
        h = torch.cat([self.encoder(x[:, :, s:e], cache) for s, e in zip(starts, ends, strict=True)], dim=2)
        # Only the first z_dim output channels (the mean) of the 1x1x1 conv are needed.
        z_dim = self.config.z_dim
        mu = F.conv3d(h, self.conv1.weight[:z_dim], self.conv1.bias[:z_dim])
        return normalize_latent(mu)

    @torch.no_grad()
    def decode(
        self,
        latent: torch.Tensor,
        progress: Callable[[int, int], None] | None = None,
        on_frames: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Normalised latent ``[B, 16, T, h, w]`` -> video ``[B, 3, 1 + 4(T-1), 8h, 8w]``, float32, about
        [-1, 1] (not clamped). ``progress(done, total)`` is called after each latent frame, and
        ``on_frames(frames)`` with its new pixel frames ``[B, 3, n, 8h, 8w]`` (a view of the output),
        so a caller can encode them while the next ones decode."""
        _check_latent(latent, self.config.z_dim)
        with _cudnn_autotuned():
            return self._decode(latent, progress, on_frames)

    def _decode(
        self,
        latent: torch.Tensor,
        progress: Callable[[int, int], None] | None,
        on_frames: Callable[[torch.Tensor], None] | None,
    ) -> torch.Tensor:
        batch, _, num_latent, height, width = latent.shape
        x = self.conv2(denormalize_latent(latent.to(device=self.device, dtype=self.dtype)))
        video = torch.empty(
            (batch, 3, pixel_frames(num_latent), height * SPATIAL_FACTOR, width * SPATIAL_FACTOR),
            dtype=torch.float32,
            device=self.device,
        )
        cache = FeatureCache(self.fast)
        start = 0
        for i in range(num_latent):
            frames = self.decoder(x[:, :, i : i + 1], cache)
            video[:, :, start : start + frames.shape[2]] = frames
            if on_frames is not None:
                on_frames(video[:, :, start : start + frames.shape[2]])
            start += frames.shape[2]
            if progress is not None:
                progress(i + 1, num_latent)
        return video


@contextlib.contextmanager
def _cudnn_autotuned() -> Iterator[None]:
    """cuDNN's benchmark mode for the VAE's convs: its default heuristic picks kernels that make a
    480p decode ~15 % slower on an H100. The search runs once per conv shape and process.

    PyTorch caches a conv's algorithm whichever mode chose it, so the VAE's shapes must not meet
    cuDNN outside this mode first.
    """
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def normalize_latent(mu: torch.Tensor) -> torch.Tensor:
    """The VAE mean ``[B, 16, ...]`` -> the DiT's latent: ``(mu - mean) * inv`` in mu's dtype."""
    mean, inv = _latent_constants(mu)
    return (mu - mean) * inv


def denormalize_latent(z: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize_latent``; divides by the rounded inverse like upstream (not ``* std``)."""
    mean, inv = _latent_constants(z)
    return z / inv + mean


def _latent_constants(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def constant(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)

    return constant(LATENT_MEAN), 1.0 / constant(LATENT_STD)


def _check_video(video: torch.Tensor) -> None:
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"the VAE encodes videos shaped [B, 3, F, H, W], got {list(video.shape)}")
    num_frames, height, width = video.shape[2:]
    if (num_frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"the VAE encodes 4k+1 frames (1, 5, 9, ..., 81), got {num_frames}")
    if height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
        raise ValueError(f"video height and width must be multiples of 8, got {height}x{width}")


def _check_latent(latent: torch.Tensor, z_dim: int) -> torch.Size:
    if latent.dim() != 5 or latent.shape[1] != z_dim or latent.shape[2] < 1:
        raise ValueError(f"the VAE decodes latents shaped [B, {z_dim}, T, h, w], got {list(latent.shape)}")
    return latent.shape


def vae_dtype(device: torch.device | str) -> torch.dtype:
    """The VAE's dtype on ``device``: bf16 on a GPU, as upstream; float32 on the CPU, where PyTorch's
    bf16 3D convolutions take a slow path unless the CPU has AVX512-BF16 or AMX (AVX2, torch 2.13:
    190 ms against 5-8 ms in float32 for one of the tiny VAE's convs; a tiny job decoded for 40 s)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def build_vae(
    name: str = "wan2.1-vae",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> WanVAE:
    """A VAE of the named config with seeded random weights (``device="meta"``: no memory)."""
    with torch.device("meta"):
        vae = WanVAE(_config(name)).to(dtype=dtype)
    materialize(vae, device, seed)
    if vae.device.type != "meta":
        head = vae.decoder.head[2]
        with torch.no_grad():
            head.weight.mul_(_RANDOM_HEAD_SCALE)
            head.bias.mul_(_RANDOM_HEAD_SCALE)
    vae.fast = True
    return vae.eval()


def load_vae(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    name: str = "wan2.1-vae",
) -> WanVAE:
    """Load ``Wan2.1_VAE.pth`` (upstream's plain state dict, 194 fp32 tensors), cast to ``dtype``.

    ``name`` picks the config the file must fit (``tiny`` for test files in the same format).
    """
    path = Path(path)
    with torch.device("meta"):
        vae = WanVAE(_config(name)).to(dtype=dtype)
    state = read_state_dict(path)
    describe = functools.partial(_describe, conv1=tuple(vae.state_dict()["decoder.conv1.weight"].shape))
    load_into(vae, state, source=path.name, expected="the Wan2.1 VAE (Wan2.1_VAE.pth)", describe=describe)
    vae.to(device)
    vae.fast = True
    return vae.eval()


def _config(name: str) -> VAEConfig:
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE config {name!r}; known: {', '.join(VAE_CONFIGS)}")
    return VAE_CONFIGS[name]


def _describe(state: StateDict, conv1: tuple[int, ...]) -> str | None:
    """What a file that does not fit the VAE holds instead, for the error message. A file with this VAE's
    ``decoder.conv1`` (shape ``conv1``) is this VAE with keys amiss, which the key lists say."""
    if "patch_embedding.weight" in state:
        return "a Wan DiT checkpoint (it has patch_embedding.weight)"
    if "token_embedding.weight" in state:
        return "the umT5 text encoder (it has token_embedding.weight)"
    if "encoder.conv_in.weight" in state:
        return "a diffusers-format AutoencoderKLWan; use the original Wan2.1_VAE.pth"
    if "decoder.conv1.weight" in state and tuple(state["decoder.conv1.weight"].shape) != conv1:
        shape = list(state["decoder.conv1.weight"].shape)
        return f"a different Wan VAE (decoder.conv1.weight is {shape}; Wan2.2_VAE.pth is not supported)"
    return None
