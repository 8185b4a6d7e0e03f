"""Which modules stay on the GPU (device_slots.py moves the others through pinned host memory).

The decision is a pure function of the free memory, the modules' byte sizes and an activation
estimate for the request, made before any work starts (never by catching out-of-memory errors).
Modules that do not all fit are offloaded while idle, in a fixed order of how cheap that is: the
text encoder first (idle after encoding), then the DiT experts (the inactive I2V expert, the DiT
during decode), the small VAE last. A request that fits no placement is refused before it starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from turbovideo.pipeline.host_memory import GIB

# Kept free for the CUDA context, allocator fragmentation and kernels' workspaces.
SAFETY_FRACTION = 0.05
SAFETY_MIN_BYTES = GIB // 2

# Text encoding of 512 tokens needs little beyond the weights: up to 0.3 GiB measured (H200), the
# first time with cuBLAS's workspace.
TEXT_ACTIVATION_BYTES = GIB // 2
# The VAE's working set per pixel of a frame, beyond the video it returns: 8.8-8.9 KB measured in our
# 480p and 720p decodes (H200), plus 1.1 KB for cuDNN's algorithm search the first time a size runs.
VAE_BYTES_PER_PIXEL = 11 * 1024


@dataclass(frozen=True)
class Stage:
    """One phase of a request: the modules it runs and the activation memory it needs on top."""

    name: str
    active: tuple[str, ...]
    activation_bytes: int


@dataclass(frozen=True)
class Placement:
    """``resident`` modules stay on the GPU; ``swapped`` ones are there only while a stage runs them.
    ``stage_bytes`` is each stage's estimated GPU memory, ``peak_bytes`` the largest."""

    resident: frozenset[str]
    swapped: frozenset[str]
    peak_bytes: int
    fits: bool
    stage_bytes: Mapping[str, int] = field(default_factory=dict)


def plan(
    budget_bytes: int, sizes: Mapping[str, int], stages: Sequence[Stage], offload_order: Sequence[str]
) -> Placement:
    """Keep as much resident as fits, offloading modules in ``offload_order`` until every stage fits.

    If even the most offloaded placement is too big, that placement is returned with ``fits=False``.
    """
    swapped: set[str] = set()
    candidates = [name for name in offload_order if name in sizes]
    while True:
        resident = frozenset(sizes) - swapped
        per_stage = {stage.name: _stage_bytes(stage, resident, sizes) for stage in stages}
        peak = max(per_stage.values())
        if peak <= budget_bytes or not candidates:
            return Placement(resident, frozenset(swapped), peak, peak <= budget_bytes, per_stage)
        swapped.add(candidates.pop(0))


def _stage_bytes(stage: Stage, resident: frozenset[str], sizes: Mapping[str, int]) -> int:
    visiting = [name for name in stage.active if name not in resident]
    return (
        sum(sizes[name] for name in resident) + sum(sizes[name] for name in visiting) + stage.activation_bytes
    )


def usable_bytes(free_bytes: int) -> int:
    """Memory a plan may use out of ``free_bytes``, after the safety margin (none when that is all)."""
    return max(0, free_bytes - max(int(free_bytes * SAFETY_FRACTION), SAFETY_MIN_BYTES))


def dit_activation_bytes(batch: int, tokens: int, dim: int, ffn_dim: int, latent_elements: int) -> int:
    """Peak DiT working set: a block's tensors at its widest point (the FFN's hidden activations), as
    4 x dim + 2 x ffn_dim bf16 values a token (measured on an H200: 42.6-44.5 KB a token at the 1.3B
    width, 90.0-90.3 KB at 14B; this gives 48.1 and 96.3; SageSLA's int8/fp8 copies of q, k and v
    and its block table stay below the FFN's peak), plus the float64 sampler state, noise and fp32
    velocity."""
    block = batch * tokens * (4 * dim + 2 * ffn_dim) * 2
    sampler = latent_elements * (8 + 4 + 4 + 2)
    return block + sampler


def text_keys_bytes(batch: int, layers: int, keys: int, dim: int) -> int:
    """The DiT's cross-attention keys and values of a prompt, every block's, held through the denoising
    (models/dit.TextKeys): bf16 [layers, batch, keys, dim] twice (1.3B, 64 keys: 11.8 MB a sample)."""
    return 2 * layers * batch * keys * dim * 2


def vae_activation_bytes(num_frames: int, height: int, width: int) -> int:
    """The VAE's encode or decode of one sample: its working set plus the fp32 video it reads or returns."""
    return height * width * (VAE_BYTES_PER_PIXEL + num_frames * 3 * 4)
