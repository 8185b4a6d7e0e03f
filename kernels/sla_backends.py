"""Offers the Triton SLA and SageSLA kernels to the attention registry (models/attention.py).

"sla" on a CUDA device runs the Triton kernels (the PyTorch reference keeps CPU); "sagesla" runs only
where SpargeAttn is installed and built for the GPU.
"""

from dataclasses import dataclass

import torch
from torch import nn

from turbovideo.models.attention import SAGESLA_NOT_INSTALLED, register_attention

from . import sagesla
from .sla import SLA_BLOCKS, sla_attention

# Above the PyTorch reference (priority 0) wherever both can run.
KERNEL_PRIORITY = 10


@dataclass(frozen=True)
class TritonSLA:
    """SLA (spec §4.1) in Triton; any CUDA GPU Triton supports."""

    name: str = "sla-triton"
    block_q: int = SLA_BLOCKS[0]
    block_k: int = SLA_BLOCKS[1]

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, proj_l: nn.Linear, topk: float
    ) -> torch.Tensor:
        return sla_attention(q, k, v, proj_l.weight, proj_l.bias, topk, self.block_q, self.block_k)


class SageSLA:
    """SLA with SpargeAttn's 8-bit sparse kernel (spec §4.3); block sizes follow the current GPU's arch.

    Writes the int8 o projection's input itself when asked (``int8_output``, models/attention.py), and
    where V goes in fp8 takes its per-channel ranges from the caller (``v_amax``)."""

    name = "sagesla"
    writes_int8 = True

    @property
    def block_q(self) -> int:
        return self._blocks()[0]

    @property
    def block_k(self) -> int:
        return self._blocks()[1]

    @property
    def takes_v_amax(self) -> bool:
        return sagesla.fp8_v(self._arch())

    @staticmethod
    def _blocks() -> tuple[int, int]:
        return sagesla.selection_blocks(SageSLA._arch())

    @staticmethod
    def _arch() -> str:
        return sagesla.cuda_arch(torch.device("cuda", torch.cuda.current_device()))

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        proj_l: nn.Linear,
        topk: float,
        int8_output: bool = False,
        v_amax: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return sagesla.sagesla_attention(q, k, v, proj_l.weight, proj_l.bias, topk, int8_output, v_amax)


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _sagesla_unavailable_message() -> str:
    if sagesla.sparge_modules() is None:
        return SAGESLA_NOT_INSTALLED
    archs = ", ".join(sagesla.wheel_archs()) or "(none listed in its build)"
    return (
        f"attention=sagesla needs a CUDA GPU of arch {archs} for the installed SpargeAttn; use attention=sla"
    )


register_attention("sla", TritonSLA(), _on_cuda, priority=KERNEL_PRIORITY)
register_attention(
    "sagesla",
    SageSLA(),
    sagesla.is_available,
    priority=KERNEL_PRIORITY,
    unavailable_message=_sagesla_unavailable_message(),
    head_dims=sagesla.HEAD_DIMS,
)
