"""Gluon's Hopper API, as the warp-specialized kernels (int8_gemm_ws, sla_ws) use it, behind one guard.

Where Triton has no Gluon, ``gluon`` is None: those modules then define no kernels, ``available()`` is
False, and their callers run the Triton kernels.
"""

import functools

import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # Triton before Gluon: the names exist, unused
    gluon = gl = TensorDescriptor = fence_async_shared = mbarrier = tma = None
    warpgroup_mma = warpgroup_mma_wait = tma_load = tma_store = smem_reinterpret = None
else:  # Triton 3.6's names for the bulk tensor copies; later releases renamed them
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # A shared-memory buffer seen as another dtype, shape and layout: (buffer, dtype, shape, layout).
    smem_reinterpret = getattr(gl.shared_memory_descriptor, "reinterpret", None)
    smem_reinterpret = smem_reinterpret or gl.shared_memory_descriptor._reinterpret

__all__ = [
    "TensorDescriptor",
    "available",
    "fence_async_shared",
    "gl",
    "gluon",
    "mbarrier",
    "smem_reinterpret",
    "tma",
    "tma_load",
    "tma_store",
    "warpgroup_mma",
    "warpgroup_mma_wait",
]


@functools.cache  # asked at every int8 linear's and SLA call's launch
def available() -> bool:
    """Gluon with the API these kernels are written for: Triton 3.6 (checked on an H100 and H200) and later."""
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    return gluon is not None and version >= (3, 6)
