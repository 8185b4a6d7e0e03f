"""umT5 encoder: transformers oracle, output contract, real-size layout, loading, bf16 accuracy."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from turbovideo.models import (
    TEXT_ENCODER_CONFIGS,
    CheckpointError,
    build_text_encoder,
    encode_prompts,
    load_text_encoder,
    load_tokenizer,
)
from turbovideo.models.text_encoder import TextEncoderConfig, gelu_tanh, relative_position_buckets

ORACLE = TextEncoderConfig(vocab_size=1000, dim=64, ffn_dim=128, num_heads=4, num_layers=2)
LENGTH, PADDED_FROM = 200, 150  # longer than max_distance 128; row 1 is padding from 150 on


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def to_transformers(
    state: dict[str, torch.Tensor], swap_gate: bool = False, shared_bias: bool = False
) -> dict:
    """Wan keys -> transformers UMT5EncoderModel keys (the table in oracles.md 2.3).

    ``swap_gate`` and ``shared_bias`` (block 0's position bias everywhere, as in T5) are the
    negative controls.
    """
    out = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = value
            continue
        if key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
            continue
        block, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
        gate, fc1 = ("fc1", "gate.0") if swap_gate else ("gate.0", "fc1")
        renames = {
            "norm1.weight": "layer.0.layer_norm.weight",
            "norm2.weight": "layer.1.layer_norm.weight",
            "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
            f"ffn.{gate}.weight": "layer.1.DenseReluDense.wi_0.weight",
            f"ffn.{fc1}.weight": "layer.1.DenseReluDense.wi_1.weight",
            "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
            **{f"attn.{p}.weight": f"layer.0.SelfAttention.{p}.weight" for p in "qkvo"},
        }
        if shared_bias and rest == "pos_embedding.embedding.weight":
            value = state["blocks.0.pos_embedding.embedding.weight"]
        out[f"encoder.block.{block}.{renames[rest]}"] = value
    return out


def transformers_config(config: TextEncoderConfig):
    transformers = pytest.importorskip("transformers")
    return transformers.UMT5Config(
        vocab_size=config.vocab_size,
        d_model=config.dim,
        d_kv=config.head_dim,
        d_ff=config.ffn_dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.num_buckets,
        relative_attention_max_distance=config.max_distance,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=config.eps,
        attn_implementation="eager",
    )


@pytest.fixture(scope="module")
def oracle_inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ORACLE.vocab_size, (2, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, PADDED_FROM:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def oracle_run(oracle_inputs):
    """Returns ``run(**mapping_options) -> transformers output`` for our fp32 encoder's weights."""
    transformers = pytest.importorskip("transformers")
    ours = build_text_encoder(ORACLE, dtype=torch.float32, seed=3)
    ids, mask = oracle_inputs

    def run(scaled: bool = False, **mapping) -> torch.Tensor:
        reference = transformers.UMT5EncoderModel(transformers_config(ORACLE)).eval()
        reference.load_state_dict(to_transformers(ours.state_dict(), **mapping), strict=True)
        if scaled:
            for block in reference.encoder.block:
                block.layer[0].SelfAttention.scaling = ORACLE.head_dim**-0.5
        with torch.no_grad():
            return reference(input_ids=ids, attention_mask=mask).last_hidden_state

    return ours, run


def valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]


@pytest.mark.oracle
def test_matches_transformers_umt5(oracle_run, oracle_inputs) -> None:
    ours, run = oracle_run
    ids, mask = oracle_inputs
    with torch.no_grad():
        out = ours(ids, mask)
    expected = valid(run(), mask)
    torch.testing.assert_close(valid(out, mask), expected, atol=1e-4, rtol=1e-5)
    assert rel_error(valid(out, mask), expected) < 1e-5
    assert out[1, PADDED_FROM:].eq(0).all()


@pytest.mark.oracle
def test_bf16_bit_exact_with_transformers(oracle_inputs) -> None:
    """In bf16 too: same roundings (norm cast, tanh GELU op by op, fp32 softmax) as transformers' eager UMT5."""
    transformers = pytest.importorskip("transformers")
    ours = build_text_encoder(ORACLE, dtype=torch.bfloat16, seed=4)
    reference = transformers.UMT5EncoderModel(transformers_config(ORACLE)).eval().to(torch.bfloat16)
    reference.load_state_dict(to_transformers(ours.state_dict()), strict=True)
    ids, mask = oracle_inputs
    with torch.no_grad():
        out = ours(ids, mask)
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(valid(out, mask), valid(expected, mask))


@pytest.mark.oracle
@pytest.mark.parametrize(
    "mistake",
    [{"swap_gate": True}, {"shared_bias": True}, {"scaled": True}],
    ids=["gate-fc1", "t5-bias", "scaled"],
)
def test_oracle_negative_controls(oracle_run, oracle_inputs, mistake: dict) -> None:
    ours, run = oracle_run
    ids, mask = oracle_inputs
    with torch.no_grad():
        out = ours(ids, mask)
    assert rel_error(valid(out, mask), valid(run(**mistake), mask)) > 1e-2


def test_relative_position_buckets_match_spec_boundaries() -> None:
    # upstream-spec 8.1: |rel| 0..7 exact, then 8-11, 12-15, 16-22, 23-31, 32-45, 46-63, 64-90, >=91.
    starts = [8, 12, 16, 23, 32, 46, 64, 91]
    expected = [d if d < 8 else 7 + sum(d >= s for s in starts) for d in range(300)]
    buckets = relative_position_buckets(300, 32, 128, torch.device("cpu"))
    assert buckets[0].tolist() == [0] + [16 + b for b in expected[1:]]  # keys after the query
    assert buckets[:, 0].tolist() == expected  # keys before the query
    assert torch.equal(buckets[5, 5:105], buckets[0, :100])  # depends only on key - query


def test_gelu_rounds_every_step_like_upstream() -> None:
    """fp32: the tanh GELU; bf16: each op rounds to bf16, unlike F.gelu, which rounds once (40% differ)."""
    x32 = torch.linspace(-6, 6, 4001)
    torch.testing.assert_close(gelu_tanh(x32), F.gelu(x32, approximate="tanh"), atol=1e-6, rtol=1e-6)

    x = x32.to(torch.bfloat16)

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).float()

    cube = torch.pow(x, 3.0).float()  # torch's own bf16 pow, as upstream calls it
    inner = rounded(math.sqrt(2.0 / math.pi) * rounded(x.float() + rounded(0.044715 * cube)))
    expected = rounded(rounded(0.5 * x.float()) * rounded(1.0 + rounded(torch.tanh(inner))))
    assert torch.equal(gelu_tanh(x).float(), expected)
    assert not torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))


@pytest.fixture(scope="module")
def tiny_fp32():
    return build_text_encoder("tiny", dtype=torch.float32)


def test_output_contract(tiny_fp32) -> None:
    tokenizer = load_tokenizer(None)
    prompts = ["a cat", "", "a dog running along a beach at sunset", "x" * 700]
    encoder = build_text_encoder("tiny")
    out = encode_prompts(prompts, tokenizer, encoder)
    assert out.shape == (4, 512, 32) and out.dtype == torch.bfloat16 and not out.requires_grad
    lengths = tokenizer.encode(prompts).lengths.tolist()
    assert lengths == [6, 1, 38, 512]
    for row, n in enumerate(lengths):
        assert out[row, n:].eq(0).all()
        assert out[row, :n].abs().sum(dim=-1).gt(0).all()


def test_tokenizer_encoder_mismatch_is_refused() -> None:
    tokenizer = load_tokenizer(None)
    largest = int(tokenizer.encode(["zebra"]).ids.max())
    for vocab_size in (50, largest):  # an id equal to the vocabulary size is one past its last row
        small = build_text_encoder(
            TextEncoderConfig(vocab_size=vocab_size, dim=8, ffn_dim=8, num_heads=2, num_layers=1)
        )
        with pytest.raises(ValueError, match="belong to different models"):
            encode_prompts(["zebra"], tokenizer, small)
    fits = TextEncoderConfig(vocab_size=largest + 1, dim=8, ffn_dim=8, num_heads=2, num_layers=1)
    assert encode_prompts(["zebra"], tokenizer, build_text_encoder(fits)).shape == (1, 512, 8)


def test_padding_does_not_leak(tiny_fp32) -> None:
    """A prompt's rows equal a run on its real tokens alone, and do not depend on its batch mates."""
    tokenizer = load_tokenizer(None)
    alone = encode_prompts(["a cat on a mat"], tokenizer, tiny_fp32)
    batched = encode_prompts(["x" * 300, "a cat on a mat"], tokenizer, tiny_fp32)
    n = int(tokenizer.encode(["a cat on a mat"]).lengths[0])
    with torch.no_grad():
        unpadded = tiny_fp32(tokenizer.encode(["a cat on a mat"]).ids[:, :n])
    torch.testing.assert_close(batched[1:], alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(alone[:, :n], unpadded, atol=1e-6, rtol=1e-6)
    assert rel_error(batched[0, :n], alone[0, :n]) > 1e-2  # different prompts differ


def test_real_size_layout_on_meta() -> None:
    encoder = build_text_encoder("umt5-xxl", device="meta")
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert len(shapes) == 242
    assert sum(p.numel() for p in encoder.parameters()) == 5_680_910_336
    assert encoder.dim == 4096 and encoder.dtype == torch.bfloat16 and encoder.device.type == "meta"
    assert shapes["token_embedding.weight"] == (256384, 4096) and shapes["norm.weight"] == (4096,)
    for i in range(24):
        assert shapes[f"blocks.{i}.norm1.weight"] == shapes[f"blocks.{i}.norm2.weight"] == (4096,)
        assert all(shapes[f"blocks.{i}.attn.{p}.weight"] == (4096, 4096) for p in "qkvo")
        assert (
            shapes[f"blocks.{i}.ffn.gate.0.weight"] == shapes[f"blocks.{i}.ffn.fc1.weight"] == (10240, 4096)
        )
        assert shapes[f"blocks.{i}.ffn.fc2.weight"] == (4096, 10240)
        assert shapes[f"blocks.{i}.pos_embedding.embedding.weight"] == (32, 64)

    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        reference = transformers.UMT5EncoderModel(transformers_config(TEXT_ENCODER_CONFIGS["umt5-xxl"]))
    converted = {k: tuple(v.shape) for k, v in to_transformers(encoder.state_dict()).items()}
    assert converted == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_load_official_format_file(tmp_path, tiny_fp32) -> None:
    # The published file is a plain bf16 state dict in Wan's key layout.
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in tiny_fp32.state_dict().items()}, path)
    loaded = load_text_encoder(path, dtype=torch.float32, name="tiny")
    assert loaded.dtype == torch.float32 and not any(p.requires_grad for p in loaded.parameters())
    for key, value in tiny_fp32.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16).float())
    ids = load_tokenizer(None).encode(["a cat"]).ids
    with torch.no_grad():
        assert rel_error(loaded(ids), tiny_fp32(ids)) < 2e-2
    assert load_text_encoder(path, name="tiny").dtype == torch.bfloat16
    assert load_text_encoder(path, device="meta", name="tiny").device.type == "meta"  # where it was asked


def _one_sentence(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.count(". ") == 0
    return message


@pytest.mark.parametrize(
    ("state", "phrase"),
    [
        (
            {"patch_embedding.weight": torch.zeros(2, 4), "blocks.0.self_attn.q.weight": torch.zeros(2, 2)},
            "DiT",
        ),
        (
            {"blocks.0.self_attn.q.int8_weight": torch.zeros(2, 2, dtype=torch.int8)},
            "quantized TurboDiffusion DiT",
        ),
        ({"encoder.downsamples.0.residual.0.gamma": torch.zeros(2), "conv1.weight": torch.zeros(1)}, "VAE"),
        ({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, "transformers"),
        (
            {
                "token_embedding.weight": torch.zeros(4, 2),
                "decoder.blocks.0.ffn.fc1.weight": torch.zeros(2, 2),
            },
            "full T5 encoder-decoder checkpoint, not the encoder-only file",
        ),
    ],
    ids=["dit", "dit-quant", "vae", "transformers", "encoder-decoder"],
)
def test_foreign_file_is_named(tmp_path, state: dict, phrase: str) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_text_encoder(path, name="tiny")
    message = _one_sentence(error)
    assert phrase in message and "wrong.pth does not fit the tiny text encoder" in message


def test_wrong_size_and_truncated_files(tmp_path, tiny_fp32) -> None:
    path = tmp_path / "enc.pth"
    torch.save(tiny_fp32.state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_text_encoder(path)  # a tiny file where umT5-XXL is expected
    assert "vocabulary 384 and width 32" in _one_sentence(error) and "shape mismatches" in str(error.value)

    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_text_encoder(path, name="tiny")
    _one_sentence(error)


def test_bf16_close_to_fp32() -> None:
    """bf16 activations against fp32 math on the same (bf16-valued) weights, on real tokens.

    Measured 1.1e-2 relative (2.3e-3 from the final norm alone, ~5e-3 more per layer: random
    weights give unscaled attention logits of std ~4, whose bf16 rounding moves the softmax).
    """
    tokenizer = load_tokenizer(None)
    prompts = ["a red car driving through a neon city at night", "waves"]
    bf16 = build_text_encoder("tiny", dtype=torch.bfloat16)
    fp32 = build_text_encoder("tiny", device="meta", dtype=torch.float32)
    fp32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()}, assign=True)
    mask = tokenizer.encode(prompts).mask.bool()
    low = encode_prompts(prompts, tokenizer, bf16)
    high = encode_prompts(prompts, tokenizer, fp32)
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32
    assert 1e-3 < rel_error(valid(low, mask), valid(high, mask)) < 2.5e-2
