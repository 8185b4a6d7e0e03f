"""Official-format DiT files: round trips through load_dit, the quantize script, and clear errors."""

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from turbovideo.models import CheckpointError, build_dit, load_dit
from turbovideo.models.checkpoint import load_into
from turbovideo.models.dit import WanDiT
from turbovideo.models.dit_checkpoint import describe_dit_state
from turbovideo.models.dit_configs import DIT_CONFIGS
from turbovideo.models.int8 import quantize_blockwise

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quantize_checkpoint.py"


def tiny_inputs(name: str):
    g = torch.Generator().manual_seed(3)
    config = DIT_CONFIGS[name]
    x = torch.randn(2, 16, 3, 8, 12, generator=g)
    t = torch.tensor([988.0, 608.0])
    context = torch.randn(2, 512, config.text_dim, generator=g)
    y = torch.randn(2, config.cond_dim, 3, 8, 12, generator=g) if config.task == "i2v" else None
    return x, t, context, y


def quantize(source: Path, target: Path, capsys) -> tuple[int, str]:
    """Run scripts/quantize_checkpoint.py in-process; returns (exit code, stderr)."""
    argv, sys.argv = sys.argv, [str(SCRIPT), str(source), str(target)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny files in the published layout: flat state dicts as upstream's modify_model saves them."""
    root = tmp_path_factory.mktemp("dit")
    out = {}
    for name in ("tiny-t2v", "tiny-i2v"):
        model = build_dit(name, attention="dense")
        path = root / f"{name}.pth"
        torch.save(model.state_dict(), path)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v"])
def test_unquantized_file_round_trips_with_inferred_config(files, name):
    original, path = files[name]
    loaded = load_dit(path, attention="dense")
    assert loaded.config.name == name and not loaded.quantized and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())
    inputs = tiny_inputs(name)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), original(*inputs))


@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v"])
def test_quantize_script_output_loads_and_stays_close(files, name, tmp_path, capsys):
    original, path = files[name]
    target = tmp_path / f"{name}-quant.pth"
    code, err = quantize(path, target, capsys)
    assert code == 0, err
    raw = torch.load(target, weights_only=True)
    assert len(raw) == len(original.state_dict()) + 10 * DIT_CONFIGS[name].num_layers
    q, s = quantize_blockwise(original.state_dict()["blocks.1.ffn.2.weight"])
    assert torch.equal(raw["blocks.1.ffn.2.int8_weight"], q) and torch.equal(raw["blocks.1.ffn.2.scale"], s)
    assert torch.equal(
        raw["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"],
        original.state_dict()["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"],
    )

    loaded = load_dit(target, attention="dense")
    assert loaded.config.name == name and loaded.quantized
    inputs = tiny_inputs(name)
    with torch.no_grad():
        float_out, quant_out = original(*inputs), loaded(*inputs)
    error = ((quant_out - float_out).norm() / float_out.norm()).item()
    assert 0 < error < 3e-2


def test_quantize_script_refuses_quantized_and_foreign_files(files, tmp_path, capsys):
    _, path = files["tiny-t2v"]
    quantized = tmp_path / "q.pth"
    assert quantize(path, quantized, capsys)[0] == 0
    code, err = quantize(quantized, tmp_path / "qq.pth", capsys)
    assert code == 2 and "already a tiny T2V -quant checkpoint" in err
    vae = tmp_path / "vae.pth"
    torch.save(
        {"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(1)}, vae
    )
    code, err = quantize(vae, tmp_path / "x.pth", capsys)
    assert code == 2 and "not a Wan DiT checkpoint: it looks like a VAE checkpoint" in err
    assert not (tmp_path / "qq.pth").exists() and not (tmp_path / "x.pth").exists()


def test_quantize_script_keeps_its_input_when_told_to_write_over_it(files, tmp_path):
    # A subprocess: writing over the memory-mapped input ends in SIGBUS, which would kill pytest.
    _, path = files["tiny-t2v"]
    source = tmp_path / "finetuned.pth"
    shutil.copy(path, source)
    for target in (source, tmp_path / "link.pth"):
        if target != source:
            os.link(source, target)
        run = subprocess.run(
            [sys.executable, str(SCRIPT), str(source), str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2 and "is the input file itself" in run.stderr, run
        assert source.read_bytes() == path.read_bytes()


def test_quantize_script_says_in_one_line_when_it_cannot_write(files, tmp_path, capsys):
    _, path = files["tiny-t2v"]
    code, err = quantize(path, tmp_path / "missing" / "q.pth", capsys)
    assert code == 1 and err.startswith(f"error: cannot write {tmp_path / 'missing' / 'q.pth'}: ")
    assert err.count("\n") == 1


_FULL_DISK_QUANTIZE = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_quantize_script_on_a_full_disk_keeps_the_earlier_output_and_leaves_no_cut_file(
    files, tmp_path, suffix
):
    _, path = files["tiny-t2v"]
    target = tmp_path / f"q{suffix}"
    earlier = b"an earlier quantized file"
    target.write_bytes(earlier)
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_QUANTIZE, str(SCRIPT), str(path), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and run.stderr.startswith(f"error: cannot write {target}: "), run
    assert "File too large" in run.stderr and run.stderr.count("\n") == 1
    assert target.read_bytes() == earlier
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_quantize_script_does_not_blame_the_output_for_a_failure_reading_or_converting(
    files, tmp_path, capsys, monkeypatch
):
    import turbovideo.models.dit_checkpoint as dit_checkpoint

    def out_of_memory(state):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(dit_checkpoint, "quantize_dit_state", out_of_memory)
    _, path = files["tiny-t2v"]
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        quantize(path, tmp_path / "q.pth", capsys)
    assert "cannot write" not in capsys.readouterr().err


def test_safetensors_and_prefixed_training_exports_load(files, tmp_path):
    original, _ = files["tiny-t2v"]
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    safetensors = tmp_path / "model.safetensors"
    save_file(state, str(safetensors))
    exported = tmp_path / "export.pth"
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}}, exported)
    for path in (safetensors, exported):
        loaded = load_dit(path, name="tiny-t2v")
        assert torch.equal(loaded.head.head.weight, original.head.head.weight)


def test_training_export_with_the_conv3d_patch_embedding_loads(files, tmp_path):
    # scripts/dcp_to_pth.py upstream: nested under "state_dict", "net." keys, and the patch embedding
    # still in Wan's Conv3d shape [D, C, 1, 2, 2] (modify_model reshapes it for the published files).
    original, _ = files["tiny-t2v"]
    state = {f"net.{k}": v for k, v in original.state_dict().items()}
    state["net.patch_embedding.weight"] = original.patch_embedding.weight.unflatten(1, (16, 1, 2, 2))
    path = tmp_path / "dcp_export.pth"
    torch.save({"state_dict": state}, path)
    loaded = load_dit(path, attention="dense")
    assert torch.equal(loaded.patch_embedding.weight, original.patch_embedding.weight)
    x, t, context, y = tiny_inputs("tiny-t2v")
    with torch.inference_mode():
        assert torch.equal(loaded(x, t, context, y), original(x, t, context, y))


def test_dtypes_are_normalised_on_load(files, tmp_path):
    original, _ = files["tiny-t2v"]
    state = {k: v.float() for k, v in original.state_dict().items()}  # e.g. an fp32 proj_l or modulation
    path = tmp_path / "fp32.pth"
    torch.save(state, path)
    loaded = load_dit(path)
    assert loaded.blocks[0].self_attn.attn_op.local_attn.proj_l.weight.dtype == torch.bfloat16
    assert loaded.blocks[0].modulation.dtype == torch.bfloat16
    assert loaded.blocks[0].norm3.weight.dtype == torch.float32
    assert loaded.blocks[0].self_attn.norm_q.weight.dtype == torch.float32


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and not isinstance(exc.value, KeyError)
    return message


def test_wrong_architecture_and_layout_are_named(files, tmp_path, capsys):
    _, t2v = files["tiny-t2v"]
    with pytest.raises(CheckpointError) as info:
        load_dit(t2v, name="tiny-i2v")
    message = one_line(info)
    assert message.startswith("tiny-t2v.pth does not fit tiny I2V: it looks like a tiny T2V checkpoint")
    assert "shape mismatches (patch_embedding.weight is [64, 64] in the file but [64, 144]" in message

    quantized = tmp_path / "tiny-quant.pth"
    quantize(t2v, quantized, capsys)
    with pytest.raises(CheckpointError) as info:
        load_dit(quantized, quantized=False)
    message = one_line(info)
    assert "does not fit tiny T2V: it looks like a tiny T2V -quant checkpoint" in message
    assert "missing keys (blocks.0.cross_attn.k.weight" in message


def test_real_size_mismatch_names_both_architectures():
    # Real files are gigabytes; their key/shape check runs the same on meta tensors.
    state = build_dit("wan2.1-t2v-1.3b", device="meta").state_dict()
    with torch.device("meta"):
        target = WanDiT(DIT_CONFIGS["wan2.1-t2v-14b"], quantized=True)
    with pytest.raises(CheckpointError) as info:
        load_into(
            target, dict(state), source="x.pth", expected="Wan2.1-14B -quant", describe=describe_dit_state
        )
    assert one_line(info).startswith(
        "x.pth does not fit Wan2.1-14B -quant: it looks like a Wan2.1-1.3B checkpoint;"
    )
    quant_state = build_dit("wan2.1-t2v-14b", device="meta", quantized=True).state_dict()
    assert describe_dit_state(quant_state) == "a Wan2.1-14B -quant checkpoint"


def test_bad_files_give_one_sentence(files, tmp_path):
    _, path = files["tiny-t2v"]
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    json_file = tmp_path / "config.pth"
    json_file.write_text('{"dim": 1536}')
    vae = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(2), "decoder.conv1.weight": torch.zeros(2)}, vae)
    umt5 = tmp_path / "umt5.pth"
    torch.save({"token_embedding.weight": torch.zeros(4, 2), "norm.weight": torch.zeros(2)}, umt5)
    original_wan = tmp_path / "wan2.1_t2v_1.3B.pth"
    torch.save(
        {"patch_embedding.weight": torch.zeros(64, 16, 1, 2, 2), "head.modulation": torch.zeros(1)},
        original_wan,
    )
    cases = {
        original_wan: "it looks like an original Wan checkpoint (Conv3d patch embedding), not a TurboDiffusion one",
        truncated: "is truncated or is not a PyTorch checkpoint",
        empty: "is empty (0 bytes)",
        tmp_path / "missing.pth": "does not exist",
        json_file: "is truncated or is not a PyTorch checkpoint",
        vae: "is not a known Wan DiT checkpoint: it looks like a VAE checkpoint, not a DiT",
        umt5: "it looks like a umT5 text-encoder checkpoint, not a DiT",
    }
    for bad, expected in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_dit(bad)
        assert expected in one_line(info), bad.name
    with pytest.raises(CheckpointError) as info:
        load_dit(vae, name="tiny-t2v")
    assert "does not fit tiny T2V: it looks like a VAE checkpoint, not a DiT; 73 missing keys" in one_line(
        info
    )
