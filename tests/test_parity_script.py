"""scripts/parity_upstream.py at tiny size on CPU: our models against upstream TurboDiffusion's own modules.

Needs the upstream checkout in third_party/TurboDiffusion (git-ignored; CI has none, so these tests
skip there) and einops, which upstream imports. Everything runs in fp32, so layouts and op order must
agree to ~1e-6. Upstream's SLA kernel is not run here (bf16 is wrong in Triton's CPU interpreter);
its model is still built and loaded from the same file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ROOT / "third_party" / "TurboDiffusion"
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import parity_upstream as parity  # noqa: E402
from _upstream_stubs import apply_rotary_emb  # noqa: E402

from turbovideo.models import DIT_CONFIGS  # noqa: E402

MISSING = (
    "no upstream checkout in third_party/TurboDiffusion"
    if not (UPSTREAM / "turbodiffusion" / "rcm" / "networks" / "wan2pt1.py").is_file()
    else "einops (imported by upstream) is not installed"
    if importlib.util.find_spec("einops") is None
    else None
)

# Upstream wraps its fp32/bf16 regions in CUDA autocast, which is inert (and says so) on a CPU.
pytestmark = pytest.mark.filterwarnings("ignore:.*Disabling autocast:UserWarning")

CPU = torch.device("cpu")
# A small latent keeps Triton's interpreter (upstream's fast norms) quick; SLA is not run on CPU.
# 64 tokens: upstream's norm kernels handle rows in blocks of 32 without masking them at dims <= 512.
SMALL = (2, 8, 16)


def test_rotary_stand_in_is_interleaved_complex_rotation() -> None:
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(5, 4)
    expected = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        * torch.polar(torch.ones_like(angles), angles)[:, None]
    ).flatten(-2)
    out = apply_rotary_emb(x, angles.cos(), angles.sin(), interleaved=True)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # The half-split convention is a different rotation; the stand-in refuses it rather than guess.
    with pytest.raises(NotImplementedError):
        apply_rotary_emb(x, angles.cos(), angles.sin(), interleaved=False)


@pytest.fixture(scope="module")
def up():
    if MISSING:
        pytest.skip(MISSING)
    return parity.import_upstream(UPSTREAM)


@pytest.fixture(scope="module")
def setting():
    return dataclasses.replace(
        parity.tiny_setting(CPU, repeats=1),
        dit_latent=SMALL,
        big_latent=SMALL,
        vae_latent=(2, 4, 4),
        vae_clip=(5, 16, 16),
    )


def _by_variant(records: list[dict]) -> dict[str, dict]:
    assert all(r["error"] is None for r in records), [r.get("traceback") or r["error"] for r in records]
    return {r["variant"]: r for r in records}


def test_tiny_t2v_dit_matches_upstream_original_attention(up, setting, tmp_path) -> None:
    config = DIT_CONFIGS["tiny-t2v"]
    records = _by_variant(parity.dit_case(up, setting, config, SMALL, "dit", False, tmp_path))
    assert records["dense"]["rel_l2"] < 1e-5
    assert records["dense"]["within_bound"]
    assert "upstream_block_ms" not in records["dense"]
    assert records["sla"]["rel_l2"] is None and "CUDA" in records["sla"]["skipped"]


def test_tiny_i2v_first_block_matches_upstream_wan2pt2(up, setting, tmp_path) -> None:
    config = parity.blocks_of(DIT_CONFIGS["tiny-i2v"], 1)
    assert config.num_layers == 1 and "1 of 2 blocks" in config.label
    records = _by_variant(parity.dit_case(up, setting, config, SMALL, "i2v14b", True, tmp_path))
    assert records["dense"]["rel_l2"] < 1e-5
    assert records["dense"]["upstream_block_ms"] > 0 and records["dense"]["ours_block_ms"] > 0


def test_comparison_sees_a_one_tensor_difference(up, setting, tmp_path) -> None:
    """Negative control: the same pipeline with one of our norm weights off by 1 % must disagree."""
    config = DIT_CONFIGS["tiny-t2v"]
    state = parity.published_dit_state(up, config, setting, seed=3)
    path = tmp_path / "dit.pth"
    torch.save(state, path)
    ours = parity.our_dit(path, config, setting)
    inputs = parity.dit_inputs(config, SMALL, setting, seed=4)
    reference = parity.fp32_reference(up, config, "dense", state, inputs, setting)
    with torch.no_grad():
        same = ours(inputs["x"], inputs["t"], inputs["context"])
        ours.blocks[0].self_attn.norm_q.weight.mul_(1.01)
        different = ours(inputs["x"], inputs["t"], inputs["context"])
    assert parity.rel_l2(same, reference) < 1e-5
    assert parity.rel_l2(different, reference) > 1e-4


def test_published_layout_has_fp32_norms_and_bf16_proj_l(up, setting) -> None:
    state = parity.published_dit_state(up, DIT_CONFIGS["tiny-t2v"], setting, seed=3)
    assert state["blocks.0.self_attn.norm_q.weight"].dtype == torch.float32
    assert state["blocks.1.norm3.bias"].dtype == torch.float32
    assert state["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"].dtype == torch.bfloat16
    assert state["patch_embedding.weight"].shape == (64, 64)  # Linear over 16 channels x 2 x 2
    assert not any(k.startswith("net.") or "_checkpoint_wrapped_module" in k for k in state)


def test_tiny_vae_matches_upstream(up, setting, tmp_path) -> None:
    records = _by_variant(parity.vae_case(up, setting, tmp_path))
    assert records["decode"]["rel_l2"] < 1e-5
    assert records["encode"]["rel_l2"] < 1e-5


def test_tiny_vae_in_bf16_is_measured_against_upstream_in_fp32(up, setting, tmp_path) -> None:
    """The real run's precision: both sides bf16, each also compared with upstream in fp32."""
    records = _by_variant(parity.vae_case(up, dataclasses.replace(setting, dtype=torch.bfloat16), tmp_path))
    for record in records.values():
        assert 1e-4 < record["upstream_vs_fp32"] < 5e-2  # bf16 rounding, not a mismatch
        assert record["ours_vs_fp32"] < 1.5 * record["upstream_vs_fp32"]
        assert record["rel_l2"] < 5e-2


def test_main_writes_table_and_json_for_the_text_encoder(up, tmp_path, capsys) -> None:
    out = tmp_path / "parity.json"
    code = parity.main(["--out", str(out), "--tiny", "--device", "cpu", "--repeats", "1", "--cases", "umt5"])
    report = json.loads(out.read_text())
    (record,) = report["results"]
    assert code == 0 and record["error"] is None
    assert record["case"] == "umt5" and record["rel_l2"] < 1e-5
    assert "flash_attn.layers.rotary" in report["stand_ins"]
    assert "umt5" in capsys.readouterr().out
