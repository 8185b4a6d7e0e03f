"""The GPU facts that kernel launches depend on: which instructions exist and how much shared memory."""

import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class GpuLimits:
    """Compute capability (e.g. 90) and shared memory per program in bytes."""

    capability: int
    shared_bytes: int

    @property
    def hopper(self) -> bool:
        """Warpgroup MMA and bulk tensor copies (TMA): sm_90 and later."""
        return self.capability >= 90


@functools.cache
def gpu_limits(device: torch.device) -> GpuLimits | None:
    """``device``'s limits (227 KB of shared memory on an H100, 163 KB on an A100, 99 KB on Ada and RTX
    Ampere); None off CUDA, where the kernels run in Triton's interpreter."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return GpuLimits(10 * major + minor, shared)


# Programs a persistent kernel launches off CUDA (the interpreter): a few, so each walks several tiles.
INTERPRETER_PROGRAMS = 3


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: one persistent program each."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count
