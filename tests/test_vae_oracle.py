"""The Wan2.1 VAE against diffusers' AutoencoderKLWan (oracles.md §2.2, §5): same random weights through
diffusers' own key converter, fp32 on CPU, both implementations (fast and eager)."""

import pytest
import torch

from turbovideo.models.vae import LATENT_MEAN, LATENT_STD, WanVAE, build_vae
from turbovideo.models.vae_cache import FeatureCache

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

pytestmark = pytest.mark.oracle

MEAN = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)
STD = torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)


def _reference(vae: WanVAE) -> torch.nn.Module:
    ref = diffusers.AutoencoderKLWan(
        base_dim=vae.config.base_dim,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    ref.load_state_dict(convert_wan_vae_to_diffusers(state), strict=True)
    return ref


@pytest.fixture(scope="module")
def models() -> tuple[WanVAE, torch.nn.Module]:
    vae = build_vae("tiny", dtype=torch.float32, seed=3)
    return vae, _reference(vae)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert _rel(ours, ref) < 1e-5


@pytest.mark.parametrize(("frames", "fast"), [(9, True), (9, False), (1, True)])
def test_encode_matches_diffusers(models, frames: int, fast: bool) -> None:
    vae, ref = models
    vae.fast = fast
    video = torch.rand(1, 3, frames, 32, 48) * 2 - 1
    latent = vae.encode(video)
    with torch.no_grad():
        expected = (ref.encode(video).latent_dist.mode() - MEAN) / STD
    assert latent.shape == (1, 16, 1 + (frames - 1) // 4, 4, 6)
    _assert_matches(latent, expected)


def _diffusers_decode(ref: torch.nn.Module, latent: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref.decode(latent * STD + MEAN).sample


@pytest.mark.parametrize(("latent_frames", "fast"), [(3, True), (3, False), (1, True)])
def test_decode_matches_diffusers(models, latent_frames: int, fast: bool) -> None:
    """Diffusers decodes one latent frame at a time too, so 3 latent frames check the chunk cache."""
    vae, ref = models
    vae.fast = fast
    latent = torch.randn(1, 16, latent_frames, 4, 6)
    video = vae.decode(latent)
    assert video.dtype == torch.float32
    assert video.shape == (1, 3, 1 + 4 * (latent_frames - 1), 32, 48)
    # diffusers clamps to [-1, 1]; the tiny random init keeps every value inside.
    assert video.abs().max() < 1
    _assert_matches(video, _diffusers_decode(ref, latent))


class _Forgetful(FeatureCache):
    """A broken cache: every temporal conv sees zeros before each chunk instead of the previous frames."""

    def conv(self, conv, x, activation=None, bias=True):
        out = super().conv(conv, x, activation, bias)
        self.remember(conv, None)
        return out


def test_decode_without_the_cache_is_caught(models, monkeypatch) -> None:
    vae, ref = models
    vae.fast = True
    latent = torch.randn(1, 16, 3, 4, 6)
    monkeypatch.setattr("turbovideo.models.vae.FeatureCache", _Forgetful)
    assert _rel(vae.decode(latent), _diffusers_decode(ref, latent)) > 1e-2


def test_real_size_layout_matches_diffusers() -> None:
    vae = build_vae("wan2.1-vae", device="meta")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()
    converted = convert_wan_vae_to_diffusers(vae.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
