"""The VAE's kernels (norm + SiLU, bias/residual add, 2x upsampling) against PyTorch, and a whole
decode through them. Without a GPU the kernels run in Triton's interpreter (conftest.py)."""

import pytest
import torch
import torch.nn.functional as F
from turbovideo.kernels.channel_norm import add_bias_, rms_norm_silu
from turbovideo.kernels.rounding import INTERPRETED
from turbovideo.kernels.upsample import upsample_nearest2x

from turbovideo.models import vae_ops
from turbovideo.models.vae import build_vae

DEVICE = "cpu" if INTERPRETED else "cuda"


def _channels_last(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(shape, device=DEVICE) * scale + 0.3
    return x.to(dtype).contiguous(memory_format=torch.channels_last_3d)


def _norm_silu_ref(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x = x.double()
    if bias is not None:
        x = x + bias.double().view(1, -1, 1, 1, 1)
    y = F.normalize(x, dim=1) * x.shape[1] ** 0.5 * gamma.double().view(1, -1, 1, 1, 1)
    return F.silu(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [24, 96])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rms_norm_silu_writes_into_a_frame_slice(dtype, channels: int, with_bias: bool) -> None:
    x = _channels_last((2, channels, 3, 5, 7), dtype, scale=2.0)
    gamma = torch.rand(channels, device=DEVICE, dtype=dtype) + 0.5
    bias = torch.randn(channels, device=DEVICE, dtype=dtype) if with_bias else None
    # The causal conv's buffer: 2 history frames, then the chunk the kernel writes (strided per sample).
    buffer = torch.full((2, channels, 5, 5, 7), 7.0, device=DEVICE, dtype=dtype)
    buffer = buffer.contiguous(memory_format=torch.channels_last_3d)
    rms_norm_silu(x, gamma, buffer[:, :, 2:], bias)
    expected = _norm_silu_ref(x, gamma, bias)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(buffer[:, :, 2:].double(), expected, rtol=tolerance, atol=tolerance)
    assert (buffer[:, :, :2] == 7.0).all()  # the history frames are left alone


def test_rms_norm_silu_of_zeros_is_zero() -> None:
    x = torch.zeros(1, 8, 1, 2, 2, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    out = torch.empty_like(x)
    rms_norm_silu(x, torch.ones(8, device=DEVICE), out)
    assert (out == 0).all()


def test_rms_norm_silu_rejects_channels_first() -> None:
    x = torch.randn(1, 8, 1, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="channels-last"):
        rms_norm_silu(x, torch.ones(8, device=DEVICE), torch.empty_like(x))


@pytest.mark.parametrize("residual", ["none", "plain", "with_bias"])
def test_add_bias_in_place(residual: str) -> None:
    y = _channels_last((2, 40, 3, 4, 5), torch.bfloat16)
    bias, res_bias = (torch.randn(40, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    res = _channels_last((2, 40, 3, 4, 5), torch.bfloat16)
    expected = y.double() + bias.double().view(1, -1, 1, 1, 1)
    args = {}
    if residual != "none":
        args["residual"] = res
        expected = expected + res.double()
    if residual == "with_bias":
        args["residual_bias"] = res_bias
        expected = expected + res_bias.double().view(1, -1, 1, 1, 1)
    out = add_bias_(y, bias, **args)
    assert out is y
    torch.testing.assert_close(y.double(), expected.to(torch.bfloat16).double(), rtol=8e-3, atol=8e-3)


def test_add_bias_on_a_2d_channels_last_batch() -> None:
    y = torch.randn(3, 16, 4, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(16, device=DEVICE)
    expected = y + bias.view(1, -1, 1, 1)
    add_bias_(y, bias)
    torch.testing.assert_close(y, expected)


def test_decode_through_the_kernels_equals_the_pytorch_path(monkeypatch) -> None:
    # TF32 convs would turn the paths' fp32 rounding differences into 1e-3 ones.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    vae = build_vae("tiny", device=DEVICE, dtype=torch.float32)
    latent = torch.randn(2, 16, 2, 2, 3, device=DEVICE)
    monkeypatch.setattr(vae_ops, "use_triton", lambda x: False)
    expected = vae.decode(latent)
    monkeypatch.setattr(vae_ops, "use_triton", lambda x: True)
    torch.testing.assert_close(vae.decode(latent), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels", [8, 24])
def test_upsample_nearest2x_equals_pytorch(channels: int) -> None:
    x = torch.randn(3, channels, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    out = upsample_nearest2x(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
