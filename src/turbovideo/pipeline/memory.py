"""Which modules stay on the GPU, and moving the others through pinned host memory.

The decision is a pure function of the free memory, the modules' byte sizes and an activation
estimate for the request, made before any work starts (never by catching out-of-memory errors).
Modules that do not all fit are offloaded while idle, in a fixed order of how cheap that is: the
text encoder first (idle after encoding), then the DiT experts (the inactive I2V expert, the DiT
during decode), the small VAE last. A request that fits no placement is refused before it starts.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from turbovideo.pipeline.host_memory import GIB

# Kept free for the CUDA context, allocator fragmentation and kernels' workspaces.
SAFETY_FRACTION = 0.05
SAFETY_MIN_BYTES = GIB // 2

# Text encoding of 512 tokens needs little beyond the weights: up to 0.3 GiB measured (H200), the
# first time with cuBLAS's workspace.
TEXT_ACTIVATION_BYTES = GIB // 2
# torch's pinned-memory allocator rounds every block up to a power of two (ATen/core/CachingHostAllocator.h;
# measured on an H200 machine, torch 2.11: a pinned 600 MiB tensor took 1,026 MiB of MemAvailable, 1,100 MiB
# took 2,078), so a copy per tensor took 1.3-1.5x the weights. Host copies are cut instead from blocks of
# 1 GiB (or the power of two above a larger tensor), packed largest tensor first, and each block is
# allocated at the power of two above what it holds (a page at least).
PIN_BLOCK_BYTES = 1 << 30
PAGE_BYTES = 4096
_PIN_ALIGN = 512  # where each copy starts: aligned for every dtype and for DMA
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


def vae_activation_bytes(num_frames: int, height: int, width: int) -> int:
    """The VAE's encode or decode of one sample: its working set plus the fp32 video it reads or returns."""
    return height * width * (VAE_BYTES_PER_PIXEL + num_frames * 3 * 4)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in _tensors(module))


@dataclass(frozen=True)
class PinnedLayout:
    """Where host copies go: tensor i at byte ``places[i][1]`` of block ``places[i][0]``; ``blocks``
    are the byte sizes to allocate."""

    blocks: tuple[int, ...]
    places: tuple[tuple[int, int], ...]


def pack_pinned(sizes: Sequence[int]) -> PinnedLayout:
    """Lay out host copies of tensors of these byte sizes in pinned blocks (see PIN_BLOCK_BYTES)."""
    capacity: list[int] = []
    used: list[int] = []
    places = [(0, 0)] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        need = -(-sizes[i] // _PIN_ALIGN) * _PIN_ALIGN
        block = next((b for b, room in enumerate(capacity) if used[b] + need <= room), None)
        if block is None:
            block = len(capacity)
            capacity.append(max(PIN_BLOCK_BYTES, _power_of_two(need)))
            used.append(0)
        places[i] = (block, used[block])
        used[block] += need
    return PinnedLayout(tuple(_power_of_two(max(n, PAGE_BYTES)) for n in used), tuple(places))


def pinned_bytes(tensor_bytes: Iterable[int]) -> int:
    """Host memory that pinned copies of tensors of these sizes take, as ``pack_pinned`` lays them out."""
    return sum(pack_pinned(list(tensor_bytes)).blocks)


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


class DeviceSlot:
    """Moves one module's weights between the GPU and a pinned host copy.

    The host copy is made once (at load, or the first time the module leaves the GPU) and kept,
    so later offloads only drop the device tensors instead of copying weights back. The slot
    assumes it is the only thing moving the module.
    """

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = canonical_device(device)
        self.nbytes = module_bytes(module)
        # What its pinned host copy takes once made (on a GPU only; on the CPU the weights stay put).
        self.host_bytes = pinned_bytes(t.numel() * t.element_size() for _, t in _tensors(module))
        self._host: dict[tuple[nn.Module, str], torch.Tensor] | None = None
        self._on_device = all(t.device == self.device for _, t in _tensors(module))
        _LIVE_SLOTS.add(self)

    @property
    def on_device(self) -> bool:
        return self._on_device

    @property
    def has_host_copy(self) -> bool:
        return self._host is not None

    @torch.inference_mode(False)
    def pin(self) -> None:
        """Make the pinned host copy now (at load) rather than on the first offload."""
        if self.device.type != "cpu":
            self._ensure_host_copy()

    # Moves run outside inference mode so the weights stay ordinary tensors wherever they are moved.
    @torch.inference_mode(False)
    def to_device(self) -> None:
        if self._on_device:
            return
        # From the pinned copy if there is one (asynchronous), else from wherever the weights were loaded.
        for key, tensor in _tensors(self.module):
            _assign(key, tensor.to(self.device, non_blocking=True))
        self._on_device = True

    @torch.inference_mode(False)
    def to_host(self) -> None:
        if not self._on_device or self.device.type == "cpu":
            return
        self._ensure_host_copy()
        assert self._host is not None
        for key, tensor in self._host.items():
            _assign(key, tensor)
        self._on_device = False

    def _ensure_host_copy(self) -> None:
        if self._host is not None:
            return
        pairs = list(_tensors(self.module))
        copies = _host_copies([tensor for _, tensor in pairs], pin=torch.cuda.is_available())
        self._host = {key: copy for (key, _), copy in zip(pairs, copies, strict=True)}
        if not self._on_device:
            # The module lives on the host: run from the pinned copy and let the original go.
            for key, tensor in self._host.items():
                _assign(key, tensor)


_LIVE_SLOTS: weakref.WeakSet[DeviceSlot] = weakref.WeakSet()


def slots_on(device: torch.device) -> list[DeviceSlot]:
    """Every live slot whose weights are on ``device`` now (those of every loaded pipeline)."""
    device = canonical_device(device)
    return [slot for slot in list(_LIVE_SLOTS) if slot.device == device and slot.on_device]


def held_host_bytes() -> int:
    """Host memory the pinned copies made so far take (every loaded pipeline's)."""
    return sum(
        slot.host_bytes for slot in list(_LIVE_SLOTS) if slot.has_host_copy and slot.device.type != "cpu"
    )


def canonical_device(device: str | torch.device) -> torch.device:
    """``cuda`` -> ``cuda:N`` (the current device): tensors report their index, so comparisons need it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def slot_for(module: nn.Module, device: torch.device) -> DeviceSlot:
    """The module's one slot for ``device``: pipelines sharing a module (the umT5 and VAE of one
    checkpoint folder) share its slot, so they agree on where its weights are."""
    slot = getattr(module, "_device_slot", None)
    if slot is None or slot.device != canonical_device(device):
        slot = DeviceSlot(module, device)
        module._device_slot = slot
    return slot


def _host_copies(tensors: Sequence[torch.Tensor], pin: bool) -> list[torch.Tensor]:
    """Host copies of ``tensors``, cut from the blocks ``pack_pinned`` lays out (pinned if ``pin``), each
    with its original's strides where those are dense (the VAE keeps its conv weights channels-last)."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    layout = pack_pinned(sizes)
    blocks = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in layout.blocks]
    copies = []
    for tensor, size, (block, offset) in zip(tensors, sizes, layout.places, strict=True):
        strides = torch.empty_like(tensor, device="meta").stride()  # the original's, if dense
        copy = blocks[block][offset : offset + size].view(tensor.dtype).as_strided(tensor.shape, strides)
        copy.copy_(tensor)
        copies.append(copy)
    return copies


def _tensors(module: nn.Module) -> Iterator[tuple[tuple[nn.Module, str], torch.Tensor]]:
    for owner in module.modules():
        for name, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is not None:
                yield (owner, name), tensor


def _assign(key: tuple[nn.Module, str], tensor: torch.Tensor) -> None:
    owner, name = key
    if name in owner._parameters:
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor
