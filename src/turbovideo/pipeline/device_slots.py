"""Moving a module's weights between the GPU and a pinned host copy, and what those copies take.

Every slot of the process is known (``slots_on``, ``held_host_bytes``), so that a plan can count the
memory other models hold and the worker can tell RunPod's memory check what the host copies take.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# torch's pinned-memory allocator rounds every block up to a power of two (ATen/core/CachingHostAllocator.h;
# measured on an H200 machine, torch 2.11: a pinned 600 MiB tensor took 1,026 MiB of MemAvailable, 1,100 MiB
# took 2,078), so a copy per tensor took 1.3-1.5x the weights. Host copies are cut instead from blocks of
# 1 GiB (or the power of two above a larger tensor), packed largest tensor first, and each block is
# allocated at the power of two above what it holds (a page at least).
PIN_BLOCK_BYTES = 1 << 30
PAGE_BYTES = 4096
_PIN_ALIGN = 512  # where each copy starts: aligned for every dtype and for DMA


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
