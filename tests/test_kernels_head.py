"""The fused DiT head (kernels/head.py) against the PyTorch head: LN, modulation and the fp32 linear.

Without a GPU the kernel runs in Triton's interpreter (conftest.py), on a GPU at the model's widths.
"""

import pytest
import torch
from turbovideo.kernels.head import head_projection
from turbovideo.kernels.rounding import INTERPRETED

from turbovideo.models import dit as dit_module
from turbovideo.models.dit import Head
from turbovideo.models.dit_configs import DiTConfig

DEVICE = "cpu" if INTERPRETED else "cuda"
# (dim, samples, tokens, per-sample modulation): an odd token count, a width that is not a multiple of
# the kernel's column step, one modulation row shared by two samples; on a GPU also 1.3B's width.
CASES = [(256, 2, 300, True), (200, 2, 70, False), (384, 1, 130, True)]
if not INTERPRETED:
    CASES.append((1536, 1, 4000, True))


def _head(dim: int, out_features: int = 64) -> Head:
    config = DiTConfig("head-test", "head test", "t2v", dim, dim, 2, 2, 16, text_dim=32)
    head = Head(config, torch.bfloat16)
    if out_features != 64:
        head.head = torch.nn.Linear(dim, out_features, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(dim)
    with torch.no_grad():
        for p, std in ((head.head.weight, 0.05), (head.head.bias, 0.1), (head.modulation, 0.1)):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return head.to(DEVICE)


@pytest.mark.parametrize(("dim", "batch", "tokens", "per_sample"), CASES)
def test_fused_head_matches_the_pytorch_head(dim, batch, tokens, per_sample, monkeypatch):
    head = _head(dim)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(batch, tokens, dim, generator=g) * 3 + 0.5).to(torch.bfloat16).to(DEVICE)
    e = (torch.randn(batch if per_sample else 1, dim, generator=g) * 0.2).to(DEVICE)
    with torch.no_grad():
        monkeypatch.setattr(dit_module, "use_fused_kernels", lambda x: False)
        expected = head(x, e.expand(batch, dim))
        monkeypatch.setattr(dit_module, "use_fused_kernels", lambda x: True)
        out = head(x, e.expand(batch, dim))
    assert out.dtype == torch.float32 and out.shape == (batch, tokens, 64)
    # fp32 rounding, and LN statistics summed in another order: a normalized value within an fp32 ulp of
    # a bf16 rounding boundary rounds the other way (one bf16 step of one of a row's terms; ~2 % of the
    # rows at 1.3B's width). A wrong modulation or bias: ~1e-1.
    assert ((out - expected).norm() / expected.norm()).item() < 1e-4
    assert (out - expected).abs().max().item() < 1e-2 * expected.abs().max().item()


def test_fused_head_masks_an_output_width_that_is_not_a_power_of_two():
    head = _head(128, out_features=48)
    x = torch.randn(1, 90, 128).to(torch.bfloat16).to(DEVICE)
    shift, scale = (torch.randn(2, 1, 128) * 0.1).to(DEVICE).unbind(0)
    out = head_projection(x, shift, scale, head.head.weight, head.head.bias)
    h = torch.nn.functional.layer_norm(x.float(), (128,), eps=1e-6).to(torch.bfloat16).float()
    expected = torch.nn.functional.linear(
        h * (1 + scale) + shift, head.head.weight.float(), head.head.bias.float()
    )
    assert out.shape == (1, 90, 48)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-4


def test_fused_head_rejects_mismatched_weights():
    x = torch.zeros(1, 8, 64, dtype=torch.bfloat16, device=DEVICE)
    shift = torch.zeros(1, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="bf16 weight"):
        head_projection(
            x, shift, shift, torch.zeros(64, 32, dtype=torch.bfloat16, device=DEVICE), torch.zeros(64)
        )
    with pytest.raises(ValueError, match="bf16 weight"):
        head_projection(x, shift, shift, torch.zeros(64, 64, device=DEVICE), torch.zeros(64, device=DEVICE))
