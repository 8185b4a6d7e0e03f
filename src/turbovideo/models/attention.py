"""Self-attention backends, chosen by name, and the modules that hold SLA's ``proj_l``.

A backend is a callable ``(q, k, v, *, proj_l, topk) -> o`` on [B, L, H, D] tensors with a ``name``
(the implementation, e.g. "sla-reference") and the SLA block sizes it selects with (``block_q``,
``block_k``; None for dense). Public names are "sagesla", "sla" and "dense"; "auto" picks the best
available. Fast kernels register themselves with ``register_attention`` from PLUGIN_MODULE, imported
at the first selection; the model code never changes when one is added. A backend with
``writes_int8`` True also takes ``int8_output=True`` and then returns its output as the int8 o
projection reads it: (int8 [B, L, H * D], fp32 scales per 128x128 tile of the [B * L, H * D] view).
One with ``takes_v_amax`` True also takes ``v_amax``, fp32 [B, H * D]: each sample's largest |v| of
each channel, which an int8 v projection writes as it goes (``Int8Linear(column_amax=)``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..catalog import ATTENTION_CHOICES, DEFAULT_SLA_TOPK
from ..errors import InputError
from .int8 import Activation, QuantizedActivation
from .sla_reference import sla_reference

logger = logging.getLogger("turbovideo")

# What "auto" tries, best first: SageSLA where SpargeAttn is installed for the GPU (upstream's default
# attention), else SLA (Triton on CUDA, the PyTorch reference elsewhere). SageSLA's 8-bit formats cost
# accuracy (~4e-2 vs ~3e-3 relative, performance.md); scripts/bench_kernels.py measures both.
AUTO_ORDER = ("sagesla", "sla", "dense")
SAGESLA_NOT_INSTALLED = (
    "attention=sagesla needs SpargeAttn (spas_sage_attn), which is not installed; use attention=sla"
)
# Registers the Triton SLA and SageSLA backends when imported (kernels/sla_backends.py).
PLUGIN_MODULE = "turbovideo.kernels.sla_backends"


class AttentionBackend(Protocol):
    name: str
    block_q: int | None
    block_k: int | None

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, proj_l: nn.Linear, topk: float
    ) -> torch.Tensor: ...


class DenseAttention:
    """Full softmax attention through PyTorch SDPA; ignores ``proj_l`` and ``topk``."""

    name = "dense"
    block_q = None
    block_k = None

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, proj_l: nn.Linear, topk: float
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)


@dataclass(frozen=True)
class SLAReference:
    """SLA in plain PyTorch (sla_reference.py); correct on any device, slow on large inputs."""

    block_q: int = 128
    block_k: int = 64
    name: str = "sla-reference"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, proj_l: nn.Linear, topk: float
    ) -> torch.Tensor:
        return sla_reference(q, k, v, proj_l=proj_l, topk=topk, block_q=self.block_q, block_k=self.block_k)


@dataclass
class _Candidate:
    make: Callable[[], AttentionBackend]
    available: Callable[[torch.device], bool]
    priority: int
    head_dims: tuple[int, ...] | None  # None: any head dim

    def runs(self, device: torch.device, head_dim: int | None) -> bool:
        fits = head_dim is None or self.head_dims is None or head_dim in self.head_dims
        return fits and self.available(device)


_REGISTRY: dict[str, list[_Candidate]] = {}
_UNAVAILABLE = {"sagesla": SAGESLA_NOT_INSTALLED}
_plugins_loaded = False


def register_attention(
    name: str,
    factory_or_impl: AttentionBackend | Callable[[], AttentionBackend],
    available: Callable[[torch.device], bool] = lambda device: True,
    *,
    priority: int = 0,
    unavailable_message: str | None = None,
    head_dims: tuple[int, ...] | None = None,
) -> None:
    """Offer an implementation under the public ``name``; the available one with the highest priority wins.

    ``factory_or_impl`` is either a backend (an object with a ``name``) or a no-argument factory, called
    only when selected so that heavy imports stay lazy. ``available(device)`` says whether it runs there;
    ``head_dims`` limits it to models with those attention head dims (e.g. SpargeAttn's 64 and 128).
    """
    if name not in ATTENTION_CHOICES or name == "auto":
        raise ValueError(f"attention backends register under one of sagesla, sla, dense, not {name!r}")
    is_impl = hasattr(factory_or_impl, "name") and not isinstance(factory_or_impl, type)
    make = (lambda: factory_or_impl) if is_impl else factory_or_impl
    _REGISTRY.setdefault(name, []).append(_Candidate(make, available, priority, head_dims))
    _REGISTRY[name].sort(key=lambda c: -c.priority)
    if unavailable_message:
        _UNAVAILABLE[name] = unavailable_message


def select_attention(
    requested: str, device: torch.device | str, head_dim: int | None = None
) -> AttentionBackend:
    """The backend for ``requested`` ("auto", "sagesla", "sla", "dense", or an implementation name) on
    ``device``, for a model whose attention heads are ``head_dim`` wide (None: any)."""
    _load_plugins()
    device = torch.device(device)
    if requested == "auto":
        for name in AUTO_ORDER:
            backend = _first_available(name, device, head_dim)
            if backend is not None:
                return backend
        raise InputError("no attention backend is available on " + str(device))
    if requested in ATTENTION_CHOICES:
        backend = _first_available(requested, device, head_dim)
        if backend is None:
            if _first_available(requested, device, None) is not None:
                raise InputError(
                    f"attention={requested} does not support this model's head dim {head_dim}; use attention=sla"
                )
            raise InputError(
                _UNAVAILABLE.get(requested, f"attention={requested} is not available on {device}")
            )
        return backend
    for candidates in _REGISTRY.values():
        for candidate in candidates:
            if candidate.runs(device, head_dim) and (backend := candidate.make()).name == requested:
                return backend
    raise InputError(f"unknown attention {requested!r}; use one of {', '.join(ATTENTION_CHOICES)}")


def _first_available(name: str, device: torch.device, head_dim: int | None) -> AttentionBackend | None:
    for candidate in _REGISTRY.get(name, []):
        if candidate.runs(device, head_dim):
            return candidate.make()
    return None


def _load_plugins() -> None:
    """Import the kernel backends' registration module once (lazily: it pulls in Triton)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    try:
        importlib.import_module(PLUGIN_MODULE)
    except ImportError as exc:
        logger.warning("%s could not be imported (%s); using the reference attention", PLUGIN_MODULE, exc)


register_attention("dense", DenseAttention())
register_attention("sla", SLAReference())


class LocalAttention(nn.Module):
    """Runs the selected backend; owns SLA's ``proj_l`` (Linear head_dim -> head_dim, shared by heads).

    ``proj_l`` exists whatever the backend, so published files load with strict key matching.
    """

    def __init__(self, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=dtype)
        self.backend: AttentionBackend = DenseAttention()
        self.topk = DEFAULT_SLA_TOPK

    @property
    def takes_v_amax(self) -> bool:
        """Whether the backend reads v's per-channel amax (``forward``'s ``v_amax``)."""
        return getattr(self.backend, "takes_v_amax", False)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        int8_output: bool = False,
        v_amax: torch.Tensor | None = None,
    ) -> Activation:
        """[B, L, H, D]; given ``int8_output``, the int8 o projection's input instead where the backend
        writes it (``writes_int8``). ``v_amax`` goes to a backend that ``takes_v_amax``."""
        options = {"v_amax": v_amax} if v_amax is not None and self.takes_v_amax else {}
        if int8_output and getattr(self.backend, "writes_int8", False):
            out = self.backend(q, k, v, proj_l=self.proj_l, topk=self.topk, int8_output=True, **options)
            return QuantizedActivation(*out)
        return self.backend(q, k, v, proj_l=self.proj_l, topk=self.topk, **options)


class AttentionOp(nn.Module):
    """Exists only to reproduce upstream's key path ``self_attn.attn_op.local_attn.proj_l``: callers run
    its ``local_attn``."""

    def __init__(self, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.local_attn = LocalAttention(head_dim, dtype)
