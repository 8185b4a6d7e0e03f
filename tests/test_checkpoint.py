"""The shared checkpoint reader and loader (models/checkpoint.py)."""

import argparse
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from turbovideo.models.checkpoint import CheckpointError, load_into, read_state_dict


def small_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(3, 4, generator=g), "layer.bias": torch.randn(3, generator=g)}


def holder(dtype=torch.bfloat16) -> nn.Module:
    with torch.device("meta"):
        module = nn.Module()
        module.layer = nn.Linear(4, 3, dtype=dtype)
    return module


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": {f"net.{k}": v for k, v in s.items()}},
        lambda s: {"model": {f"module.{k}": v for k, v in s.items()}, "step": 3},
        lambda s: {k.replace("layer.", "layer._checkpoint_wrapped_module."): v for k, v in s.items()},
        # torch.compile around DDP, and DDP around a training model that holds the DiT as .net
        lambda s: {f"_orig_mod.module.{k}": v for k, v in s.items()},
        lambda s: {"state_dict": {f"module.net.{k}": v for k, v in s.items()}},
        # blocks compiled one by one (model.blocks[i] = torch.compile(block))
        lambda s: {k.replace("layer.", "layer._orig_mod."): v for k, v in s.items()},
        # EMA weights saved alone beside the training step
        lambda s: {"ema": dict(s), "step": 3},
        # a training export with both: the EMA weights are the published ones
        lambda s: {"model": {k: v + 1 for k, v in s.items()}, "ema": dict(s)},
        # a container by a nesting name that holds no weights: the next one does
        lambda s: {"model": {"config": "x"}, "state_dict": dict(s)},
    ],
    ids=[
        "flat",
        "net-prefix-nested",
        "module-prefix-nested",
        "checkpoint-wrapper-infix",
        "compiled-ddp-prefixes",
        "ddp-net-prefixes",
        "compiled-submodule-infix",
        "ema-nested",
        "ema-over-model",
        "past-a-container-without-weights",
    ],
)
def test_pth_layouts_read_as_flat_module_keys(tmp_path, wrap):
    path = tmp_path / "m.pth"
    torch.save(wrap(small_state()), path)
    assert_same(read_state_dict(path), small_state())


def test_pth_files_are_memory_mapped_not_read_into_memory(tmp_path):
    # A 14B DiT is ~28 GB: read whole, it would need that much host memory on top of the model.
    path = tmp_path / "m.pth"
    torch.save(small_state(), path)
    state = read_state_dict(path)
    assert str(path.resolve()) in Path("/proc/self/maps").read_text()
    assert_same(state, small_state())


def test_legacy_serialisation_and_safetensors(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save(small_state(), legacy, _use_new_zipfile_serialization=False)
    assert_same(read_state_dict(legacy), small_state())
    st = tmp_path / "m.safetensors"
    save_file(small_state(), str(st))
    assert_same(read_state_dict(st), small_state())


def test_unreadable_files_raise_one_sentence(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(small_state(), good)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(good.read_bytes()[:300])
    st = tmp_path / "cut.safetensors"
    save_file(small_state(), str(st))
    st.write_bytes(st.read_bytes()[:50])
    json_file = tmp_path / "a.pth"
    json_file.write_text("{}")
    not_tensors = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_tensors)
    empty = tmp_path / "empty.pth"
    empty.touch()
    cases = {
        tmp_path / "nope.pth": "does not exist",
        tmp_path: "is a folder; name the checkpoint file in it",  # was "does not exist"
        empty: "is empty (0 bytes)",
        truncated: "is truncated or is not a PyTorch checkpoint",
        st: "is truncated or is not a safetensors file",
        json_file: "is truncated or is not a PyTorch checkpoint",
        not_tensors: "does not hold a state dict of tensors (found a list)",
    }
    for path, expected in cases.items():
        with pytest.raises(CheckpointError) as info:
            read_state_dict(path)
        assert expected in str(info.value) and "\n" not in str(info.value), path.name


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    ],
    ids=["MemoryError", "torch-cpu-allocator"],
)
def test_a_host_out_of_memory_is_not_called_a_damaged_file(tmp_path, monkeypatch, error):
    # A CheckpointError with a path makes the worker delete the file and download it again.
    path = tmp_path / "m.pth"
    torch.save(small_state(), path)

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(type(error)) as info:
        read_state_dict(path)
    assert info.value is error


def test_a_checkpoint_holding_python_objects_is_not_called_truncated(tmp_path):
    # Training exports often keep their arguments or a numpy step beside the weights; weights_only
    # loading refuses those objects, but the file is intact and re-downloading it would not help.
    path = tmp_path / "export.pth"
    torch.save({"state_dict": small_state(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message == (
        f"{path} holds Python objects besides tensors (argparse.Namespace), which are not loaded from "
        "checkpoint files for safety; save its state dict alone with torch.save"
    )
    assert info.value.path is None


def test_a_damaged_file_behind_a_link_is_named_by_where_its_bytes_are(tmp_path):
    # The worker's models/<name>/ folders link into the cache; deleting the link would fix nothing.
    cached = tmp_path / "repo" / "dit.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"PK\x03\x04 not really a zip")
    link = tmp_path / "models" / "dit.pth"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "repo" / "dit.pth")
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(cached.resolve()))} \(\d+ bytes\) is truncated"
    ):
        read_state_dict(link)


def test_load_into_casts_to_the_declared_dtype_and_allocates_from_the_file():
    state = small_state()
    module = load_into(holder(torch.bfloat16), dict(state), source="f.pth", expected="a layer")
    assert module.layer.weight.dtype == torch.bfloat16 and not module.layer.weight.is_meta
    assert torch.equal(module.layer.weight, state["layer.weight"].bfloat16())


def test_load_into_casts_across_kinds_only_values_that_survive():
    # An int8 weight stored as floats or int16 loads while its values are whole and in range; a wrap or a cut
    # is refused.
    class Int8Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("int8_weight", torch.zeros(2, 3, dtype=torch.int8, device="meta"))

    whole = torch.tensor([[1.0, -128.0, 127.0], [0.0, 5.0, -7.0]])
    loaded = load_into(Int8Holder(), {"int8_weight": whole}, source="f.pth", expected="a layer")
    assert torch.equal(loaded.int8_weight, whole.to(torch.int8))
    assert torch.equal(
        load_into(Int8Holder(), {"int8_weight": whole.short()}, source="f.pth", expected="").int8_weight,
        whole.to(torch.int8),
    )
    for bad in (whole + 0.5, whole * 3, whole.where(whole != 0, float("nan")), (whole * 3).short()):
        with pytest.raises(
            CheckpointError, match=r"^f\.pth: int8_weight holds \w+ values that the model's int8"
        ):
            load_into(Int8Holder(), {"int8_weight": bad}, source="f.pth", expected="a layer")


def test_load_into_names_missing_unexpected_and_misshaped_keys():
    state = small_state()
    state["layer.weight"] = torch.zeros(3, 5)
    state["extra.weight"] = torch.zeros(1)
    del state["layer.bias"]
    with pytest.raises(CheckpointError) as info:
        load_into(holder(), state, source="f.pth", expected="a layer", describe=lambda s: "something else")
    assert str(info.value) == (
        "f.pth does not fit a layer: it looks like something else; 1 missing keys (layer.bias); "
        "1 unexpected keys (extra.weight); "
        "1 shape mismatches (layer.weight is [3, 5] in the file but [3, 4] in the model)"
    )
