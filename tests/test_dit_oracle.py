"""The DiT against diffusers' WanTransformer3DModel (oracles.md §2.1, §5): same weights, same inputs, fp32."""

import pytest
import torch

from turbovideo.models import build_dit
from turbovideo.models import dit as dit_module
from turbovideo.models.dit_configs import DIT_CONFIGS
from turbovideo.models.layers import timestep_embedding

pytestmark = pytest.mark.oracle
diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402


def diffusers_config(name: str) -> dict:
    c = DIT_CONFIGS[name]
    return dict(
        patch_size=c.patch_size,
        num_attention_heads=c.num_heads,
        attention_head_dim=c.head_dim,
        in_channels=c.in_dim,
        out_channels=c.out_dim,
        text_dim=c.text_dim,
        freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim,
        num_layers=c.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=c.eps,
    )


def to_diffusers_state(state: dict, name: str) -> dict:
    """Upstream keys -> diffusers keys with diffusers' own converter (Linear patch embedding back to Conv3d)."""
    c = DIT_CONFIGS[name]
    state = {k: v for k, v in state.items() if ".proj_l." not in k}
    state["patch_embedding.weight"] = state["patch_embedding.weight"].reshape(c.dim, c.in_dim, *c.patch_size)
    return convert_wan_transformer_to_diffusers(state)


def diffusers_twin(model, name: str, fp64_sinusoid: bool):
    from diffusers import WanTransformer3DModel

    reference = WanTransformer3DModel(**diffusers_config(name)).eval()
    reference.load_state_dict(to_diffusers_state(dict(model.state_dict()), name), strict=True)
    if fp64_sinusoid:
        # diffusers computes the sinusoid in fp32 (phase error ~4e-5 at t~1000); Wan uses fp64.
        reference.condition_embedder.timesteps_proj.forward = lambda t: timestep_embedding(t, 256)
    return reference


def inputs(name: str):
    g = torch.Generator().manual_seed(1)
    c = DIT_CONFIGS[name]
    x = torch.randn(2, 16, 3, 8, 12, generator=g)
    t = torch.tensor([250.5, 937.25])
    context = torch.randn(2, 512, c.text_dim, generator=g)
    context[:, 7:] = 0  # zero padding after the prompt, attended without a mask
    y = torch.randn(2, c.cond_dim, 3, 8, 12, generator=g) if c.task == "i2v" else None
    return x, t, context, y


def run_pair(name: str, fp64_sinusoid: bool):
    model = build_dit(name, dtype=torch.float32, attention="dense")
    reference = diffusers_twin(model, name, fp64_sinusoid)
    x, t, context, y = inputs(name)
    with torch.no_grad():
        ours = model(x, t, context, y)
        hidden = x if y is None else torch.cat([x, y], dim=1)
        theirs = reference(hidden, t, context, return_dict=False)[0]
    return ours, theirs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v"])
def test_matches_diffusers_with_wan_fp64_sinusoid(name):
    ours, theirs = run_pair(name, fp64_sinusoid=True)
    assert ours.dtype == torch.float32 and ours.shape == (2, 16, 3, 8, 12)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert rel(ours, theirs) < 2e-6


@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v"])
def test_matches_unpatched_diffusers(name):
    ours, theirs = run_pair(name, fp64_sinusoid=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert rel(ours, theirs) < 2e-5


def sin_first(t: torch.Tensor, dim: int) -> torch.Tensor:
    return timestep_embedding(t, dim).roll(dim // 2, dims=1)


def test_negative_control_swapped_sin_cos(monkeypatch):
    monkeypatch.setattr(dit_module, "timestep_embedding", sin_first)
    ours, theirs = run_pair("tiny-t2v", fp64_sinusoid=True)
    assert rel(ours, theirs) > 1e-2


def test_negative_control_swapped_shift_scale(monkeypatch):
    original = dit_module.Block.run

    def swapped(self, x, modulation, *rest):
        return original(self, x, modulation[:, [1, 0, 2, 4, 3, 5]], *rest)

    monkeypatch.setattr(dit_module.Block, "run", swapped)
    ours, theirs = run_pair("tiny-t2v", fp64_sinusoid=True)
    assert rel(ours, theirs) > 1e-2
