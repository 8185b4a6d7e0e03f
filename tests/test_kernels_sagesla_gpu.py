"""SageSLA on a GPU with SpargeAttn installed (the image); skipped elsewhere."""

import pytest
import torch
from turbovideo.kernels import sagesla

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and sagesla.is_available(torch.device("cuda"))),
    reason="needs a CUDA GPU with SpargeAttn (spas_sage_attn) installed",
)


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1000, 2, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    proj = torch.nn.Linear(128, 128, device="cuda", dtype=torch.bfloat16)
    return q, k, v, proj.weight.detach(), proj.bias.detach()


def test_sagesla_runs_on_the_default_stream():
    out = sagesla.sagesla_attention(*_inputs(), topk=0.5)
    assert out.shape == (1, 1000, 2, 128) and torch.isfinite(out).all()


def test_sagesla_refuses_other_streams_instead_of_racing_them():
    inputs = _inputs()
    with (
        torch.cuda.stream(torch.cuda.Stream()),
        pytest.raises(RuntimeError, match="default CUDA stream only"),
    ):
        sagesla.sagesla_attention(*inputs, topk=0.5)
