"""The DiT's behaviour beyond the oracle: dtype flow, inputs, attention selection, seeded builds."""

import importlib.util
import math
import time

import pytest
import torch

from turbovideo.errors import InputError
from turbovideo.models import DIT_CONFIGS, build_dit
from turbovideo.models import attention as attention_module
from turbovideo.models.layers import apply_rope, patchify, rope_angles, rope_split, unpatchify


def tiny_inputs(name: str = "tiny-t2v", batch: int = 2):
    g = torch.Generator().manual_seed(2)
    config = DIT_CONFIGS[name]
    x = torch.randn(batch, 16, 3, 8, 12, generator=g)
    t = torch.tensor([250.5, 937.25][:batch])
    context = torch.randn(batch, 512, config.text_dim, generator=g)
    y = torch.randn(batch, config.cond_dim, 3, 8, 12, generator=g) if config.task == "i2v" else None
    return x, t, context, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v"])
@pytest.mark.parametrize("attention", ["dense", "sla"])
def test_bf16_forward_is_within_bf16_error_of_fp32_with_the_same_weights(name, attention):
    bf16 = build_dit(name, attention=attention)
    fp32 = build_dit(name, dtype=torch.float32, attention=attention)
    fp32.load_state_dict(bf16.state_dict())  # the bf16 values, upcast
    x, t, context, y = tiny_inputs(name)
    with torch.no_grad():
        low, high = bf16(x, t, context, y), fp32(x, t, context, y)
    assert low.dtype == torch.float32 and low.shape == x.shape
    assert 0 < rel(low, high) < 2e-2


def test_tiny_forward_is_fast_on_cpu():
    model = build_dit("tiny-t2v")
    inputs = tiny_inputs(batch=1)
    with torch.no_grad():
        model(*inputs)
        start = time.perf_counter()
        model(*inputs)
    assert time.perf_counter() - start < 1.0


def test_timesteps_may_be_a_column():
    model = build_dit("tiny-t2v", dtype=torch.float32)
    x, t, context, _ = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, context), model(x, t[:, None], context))


@pytest.mark.parametrize("quantized", [False, True])
def test_text_keys_made_once_give_the_forward_of_the_prompts_rows(quantized):
    model = build_dit("tiny-t2v", quantized=quantized)
    x, t, context, _ = tiny_inputs()
    prompt, other = context[:, :7], context[:, 7:14]
    with torch.no_grad():
        keys = model.text_keys(prompt)
        config = model.config
        # 7 rows and upstream's zero padding as a few biased keys, for every block
        assert (
            keys.k.shape == keys.v.shape == (config.num_layers, 2, 64, config.dim) and keys.bias is not None
        )
        assert torch.equal(model(x, t, keys), model(x, t, prompt))
        assert not torch.equal(model(x, t, model.text_keys(other)), model(x, t, keys))


class _Returns(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.value


def test_the_bf16_block_rounds_each_gated_product_then_each_sum_as_upstream():
    block = build_dit("tiny-t2v").blocks[0]  # bf16 on the CPU: the PyTorch path
    g = torch.Generator().manual_seed(5)
    dim = DIT_CONFIGS["tiny-t2v"].dim
    x, y_self, y_cross, y_ffn = (torch.randn(2, 9, dim, generator=g).bfloat16() for _ in range(4))
    modulation = torch.randn(2, 6, dim, generator=g)
    block.self_attn, block.cross_attn, block.ffn = _Returns(y_self), _Returns(y_cross), _Returns(y_ffn)
    gate_self, gate_ffn = modulation[:, 2:3].bfloat16(), modulation[:, 5:6].bfloat16()
    with torch.no_grad():
        out, _ = block.run(x, modulation, keys=None, rope=None)
    # bf16 tensor ops: the product rounded, then the sum
    after_self = x + y_self * gate_self
    assert torch.equal(out, after_self + y_cross + y_ffn * gate_ffn)
    # Both roundings matter here: in fp32 with one rounding at the end the output differs.
    wide = x.float() + y_self.float() * gate_self.float() + y_cross.float() + y_ffn.float() * gate_ffn.float()
    assert not torch.equal(out, wide.bfloat16())


def test_condition_is_required_for_i2v_and_refused_for_t2v():
    x, t, context, _ = tiny_inputs()
    with pytest.raises(ValueError, match="needs y"):
        build_dit("tiny-i2v")(x, t, context)
    with pytest.raises(ValueError, match="takes no image condition"):
        build_dit("tiny-t2v")(x, t, context, torch.zeros(2, 20, 3, 8, 12))


def test_the_attention_backend_is_logged_once_for_a_served_model_and_not_for_a_meta_one(caplog):
    # The worker plans host memory from meta-device copies of the models before downloading them: their
    # backend ("sla-reference" off a GPU) is not what serves, and a line saying so would mislead.
    with caplog.at_level("INFO", logger="turbovideo"):
        build_dit("tiny-t2v", device=torch.device("meta"))
        build_dit("tiny-t2v")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DiT ")]
    assert lines == ["DiT tiny-t2v: attention sla-reference, topk 0.10"]


def test_attention_selection_and_topk():
    model = build_dit("tiny-t2v", dtype=torch.float32)
    assert model.attention_backend == "sla-reference" and model.sla_topk == 0.1
    x, t, context, _ = tiny_inputs()
    with torch.no_grad():
        sparse = model(x, t, context)
        model.set_attention("sla", topk=1.0)
        full = model(x, t, context)
        model.set_attention("dense")
        dense = model(x, t, context)
    assert model.attention_backend == "dense" and model.sla_topk == 1.0
    assert rel(sparse, dense) > 1e-3 and rel(full, dense) > 1e-3  # proj_l's linear branch is active


def test_sagesla_where_it_cannot_run_is_one_clear_sentence():
    with pytest.raises(InputError) as info:
        build_dit("tiny-t2v", attention="sagesla")  # on the CPU
    if importlib.util.find_spec("spas_sage_attn") is None:
        expected = (
            "attention=sagesla needs SpargeAttn (spas_sage_attn), which is not installed; use attention=sla"
        )
    else:  # a GPU machine with SpargeAttn: the CPU model still cannot use it
        from turbovideo.kernels.sagesla import wheel_archs  # those the installed build has kernels for

        expected = (
            f"attention=sagesla needs a CUDA GPU of arch {', '.join(wheel_archs())} for the installed "
            "SpargeAttn; use attention=sla"
        )
    assert str(info.value) == expected
    with pytest.raises(InputError, match="unknown attention 'flash'"):
        build_dit("tiny-t2v", attention="flash")


@pytest.fixture
def registry(monkeypatch):
    """The attention registry, restored after the test (plugins load first so they land in the original)."""
    attention_module._load_plugins()
    copy = {name: list(candidates) for name, candidates in attention_module._REGISTRY.items()}
    monkeypatch.setattr(attention_module, "_REGISTRY", copy)
    monkeypatch.setattr(attention_module, "_UNAVAILABLE", dict(attention_module._UNAVAILABLE))
    return attention_module


def test_a_registered_backend_drops_in_by_priority_and_device(registry):
    class Faster(registry.SLAReference):
        pass

    fast = Faster(name="sla-fast")
    registry.register_attention("sla", fast, available=lambda device: device.type == "cpu", priority=10)
    registry.register_attention(
        "sla", lambda: Faster(name="sla-gpu"), available=lambda d: d.type == "cuda", priority=20
    )
    assert registry.select_attention("auto", "cpu") is fast
    assert registry.select_attention("sla-reference", "cpu").name == "sla-reference"
    assert registry.select_attention("auto", "meta").name == "sla-reference"
    model = build_dit("tiny-t2v")
    assert model.attention_backend == "sla-fast"


def test_a_backend_limited_to_some_head_dims_is_skipped_by_auto_and_refused_explicitly(registry):
    # SpargeAttn's kernels exist for head dims 64 and 128 only; the tiny models have 32.
    registry.register_attention(
        "sagesla", registry.SLAReference(name="sagesla-stand-in"), priority=30, head_dims=(64, 128)
    )
    assert registry.select_attention("auto", "cpu", head_dim=128).name == "sagesla-stand-in"
    assert registry.select_attention("auto", "cpu", head_dim=32).name == "sla-reference"
    assert build_dit("tiny-t2v").attention_backend == "sla-reference"
    with pytest.raises(InputError, match="head dim 32; use attention=sla"):
        registry.select_attention("sagesla", "cpu", head_dim=32)


def test_build_is_seeded_and_meta_allocates_nothing():
    a, b = build_dit("tiny-t2v"), build_dit("tiny-t2v")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    other = build_dit("tiny-t2v", seed=7)
    assert not torch.equal(other.patch_embedding.weight, a.patch_embedding.weight)
    meta = build_dit("wan2.2-i2v-a14b", device="meta", quantized=True)
    assert all(t.is_meta for t in meta.state_dict().values())
    assert meta.quantized and meta.config.task == "i2v" and meta.config.in_dim == 36


def test_rope_split_and_interleaved_rotation():
    assert rope_split(128) == (44, 42, 42) and rope_split(32) == (12, 10, 10)
    angles = rope_angles((2, 3, 4), 128, "cpu")
    token = 1 * 12 + 2 * 4 + 3  # (t, h, w) = (1, 2, 3)
    expected = torch.cat(
        [
            1 * 10000.0 ** (-torch.arange(0, 44, 2) / 44),
            2 * 10000.0 ** (-torch.arange(0, 42, 2) / 42),
            3 * 10000.0 ** (-torch.arange(0, 42, 2) / 42),
        ]
    )
    torch.testing.assert_close(angles[token], expected.float())
    x = torch.randn(1, 24, 2, 128)
    as_complex = (
        torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
        * torch.polar(torch.ones_like(angles, dtype=torch.float64), angles.double())[None, :, None, :]
    )
    rotated = torch.view_as_real(as_complex).flatten(-2)
    rope = apply_rope(x, angles.cos(), angles.sin())
    torch.testing.assert_close(rope.double(), rotated, rtol=1e-6, atol=1e-6)


def test_rope_frequencies_are_upstreams_fp32_values_bit_for_bit():
    # Spec §3.4 (fp32 frequencies); upstream's VideoRopePosition3DEmb forms the exponent 2j/d in fp32
    # and the frequency as 1 / 10000**exponent in fp32. Rounding the exact (float64) frequency to fp32
    # instead gives other values for most j (by up to 3 ulp), so every angle of a 128-long axis moved.
    def upstream(d: int) -> torch.Tensor:
        exponent = torch.arange(0, d, 2).to(torch.float32) / d
        return torch.outer(
            torch.arange(128).to(torch.float32), torch.reciprocal(torch.pow(10000.0, exponent))
        )

    assert torch.equal(rope_angles((128, 1, 1), 128, "cpu")[:, :22], upstream(44))
    assert torch.equal(rope_angles((1, 128, 1), 128, "cpu")[:, 22:43], upstream(42))
    assert torch.equal(rope_angles((1, 1, 128), 128, "cpu")[:, 43:], upstream(42))


def test_patchify_is_channel_outermost_and_unpatchify_channel_innermost():
    x = torch.arange(2 * 3 * 1 * 4 * 6, dtype=torch.float32).view(2, 3, 1, 4, 6)
    tokens = patchify(x, (1, 2, 2))
    assert tokens.shape == (2, 6, 12)
    # token (h=1, w=2), channel c, patch row dy, column dx sits at feature c*4 + dy*2 + dx
    assert tokens[1, 1 * 3 + 2, 2 * 4 + 1 * 2 + 0] == x[1, 2, 0, 3, 4]
    inner = tokens.unflatten(-1, (3, 4)).transpose(-1, -2).flatten(-2)  # channel innermost
    assert torch.equal(unpatchify(inner, (1, 2, 3), (1, 2, 2)), x)
    assert math.prod(tokens.shape) == x.numel()
