"""Real-size architectures on ``meta``: key sets, shapes, dtypes and parameter counts (spec §1.1, §3.2, §5.2)."""

import pytest
import torch

from turbovideo.models import build_dit

# name: (keys unquantized, keys quantized, parameters, int8 bytes of a -quant file, dim, ffn, in_dim, layers)
REAL = {
    "wan2.1-t2v-1.3b": (885, 1185, 1_419_492_160, 1_391_984_640, 1536, 8960, 16, 30),
    "wan2.1-t2v-14b": (1175, 1575, 14_289_152_064, 14_050_918_400, 5120, 13824, 16, 40),
    "wan2.2-i2v-a14b": (1175, 1575, 14_289_561_664, 14_050_918_400, 5120, 13824, 36, 40),
}


def shapes(name: str, quantized: bool) -> dict:
    model = build_dit(name, device="meta", quantized=quantized)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", REAL)
def test_unquantized_keys_shapes_and_dtypes(name):
    keys, _, params, _, dim, ffn, in_dim, layers = REAL[name]
    state = shapes(name, quantized=False)
    assert len(state) == keys
    assert sum(torch.Size(s).numel() for s, _ in state.values()) == params
    bf16, fp32 = torch.bfloat16, torch.float32
    expected = {
        "patch_embedding.weight": ((dim, in_dim * 4), bf16),
        "text_embedding.0.weight": ((dim, 4096), bf16),
        "time_embedding.0.weight": ((dim, 256), bf16),
        "time_projection.1.weight": ((6 * dim, dim), bf16),
        "head.modulation": ((1, 2, dim), bf16),
        "head.head.weight": ((64, dim), bf16),
        f"blocks.{layers - 1}.modulation": ((1, 6, dim), bf16),
        "blocks.0.self_attn.q.weight": ((dim, dim), bf16),
        "blocks.0.self_attn.norm_q.weight": ((dim,), fp32),
        "blocks.0.self_attn.attn_op.local_attn.proj_l.weight": ((128, 128), bf16),
        "blocks.0.self_attn.attn_op.local_attn.proj_l.bias": ((128,), bf16),
        "blocks.0.norm3.weight": ((dim,), fp32),
        "blocks.0.norm3.bias": ((dim,), fp32),
        "blocks.0.cross_attn.norm_k.weight": ((dim,), fp32),
        "blocks.0.ffn.0.weight": ((ffn, dim), bf16),
        "blocks.0.ffn.2.weight": ((dim, ffn), bf16),
    }
    for key, value in expected.items():
        assert state[key] == value, key
    assert f"blocks.{layers}.modulation" not in state


@pytest.mark.parametrize("name", REAL)
def test_quantized_layout(name):
    _, keys, _, int8_bytes, dim, ffn, _, _ = REAL[name]
    state = shapes(name, quantized=True)
    assert len(state) == keys
    assert sum(torch.Size(s).numel() for s, dt in state.values() if dt == torch.int8) == int8_bytes
    d, f = dim // 128, ffn // 128
    assert state["blocks.0.self_attn.q.int8_weight"] == ((dim, dim), torch.int8)
    assert state["blocks.0.self_attn.q.scale"] == ((d, d), torch.float32)
    assert state["blocks.0.cross_attn.o.bias"] == ((dim,), torch.bfloat16)
    assert state["blocks.0.ffn.0.scale"] == ((f, d), torch.float32)
    assert state["blocks.0.ffn.2.scale"] == ((d, f), torch.float32)
    assert "blocks.0.self_attn.q.weight" not in state
    # Never quantized: proj_l and everything outside the blocks.
    assert state["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"] == ((128, 128), torch.bfloat16)
    assert state["head.head.weight"][1] == torch.bfloat16


@pytest.mark.oracle
@pytest.mark.parametrize("name", REAL)
def test_matches_diffusers_key_set_and_shapes(name):
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel
    from test_dit_oracle import diffusers_config, to_diffusers_state

    ours = build_dit(name, device="meta").state_dict()
    with torch.device("meta"):
        reference = WanTransformer3DModel(**diffusers_config(name))
    converted = {k: tuple(v.shape) for k, v in to_diffusers_state(dict(ours), name).items()}
    assert converted == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
