"""Prompt-embedding cache: LRU in memory, best-effort persistence on disk."""

import logging
import os

import pytest
import torch

from turbovideo.pipeline.prompt_cache import PromptCache


def _embedding(value: float) -> torch.Tensor:
    return torch.full((1, 512, 8), value, dtype=torch.bfloat16)


def test_lru_evicts_the_least_recently_used():
    cache = PromptCache(capacity=2)
    cache.put("enc", "a", _embedding(1))
    cache.put("enc", "b", _embedding(2))
    assert cache.get("enc", "a") is not None  # a is now the most recent
    cache.put("enc", "c", _embedding(3))
    assert cache.get("enc", "b") is None
    assert torch.equal(cache.get("enc", "a"), _embedding(1))
    assert torch.equal(cache.get("enc", "c"), _embedding(3))
    assert len(cache) == 2


def test_key_includes_the_encoder_identity():
    cache = PromptCache()
    cache.put("encoder-1", "a fox", _embedding(1))
    assert cache.get("encoder-2", "a fox") is None


def test_disk_entries_survive_a_new_cache(tmp_path):
    PromptCache(directory=tmp_path).put("enc", "a fox", _embedding(4))
    fresh = PromptCache(directory=tmp_path)
    hit = fresh.get("enc", "a fox")
    assert hit is not None and torch.equal(hit, _embedding(4))
    assert fresh.get("other-encoder", "a fox") is None
    assert not list(tmp_path.glob("*.partial"))


def test_a_file_is_keyed_by_the_encoder_and_the_text_apart(tmp_path):
    # The same characters split differently between encoder and text are another prompt.
    PromptCache(directory=tmp_path).put("encoder-1", "1 a fox", _embedding(5))
    fresh = PromptCache(directory=tmp_path)
    assert fresh.get("encoder-11", " a fox") is None
    assert fresh.get("encoder-", "11 a fox") is None
    assert torch.equal(fresh.get("encoder-1", "1 a fox"), _embedding(5))


def test_unwritable_directory_does_not_fail(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = PromptCache(directory=blocker / "cache")
    cache.put("enc", "a fox", _embedding(5))  # mkdir fails: logged, not raised
    assert torch.equal(cache.get("enc", "a fox"), _embedding(5))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_does_not_fail(tmp_path):
    tmp_path.chmod(0o500)
    try:
        cache = PromptCache(directory=tmp_path)
        cache.put("enc", "a fox", _embedding(6))
        assert torch.equal(cache.get("enc", "a fox"), _embedding(6))
    finally:
        tmp_path.chmod(0o700)


def test_corrupt_file_is_a_miss(tmp_path):
    PromptCache(directory=tmp_path).put("enc", "a fox", _embedding(7))
    (stored,) = tmp_path.glob("*.safetensors")
    stored.write_bytes(b"torn write")
    assert PromptCache(directory=tmp_path).get("enc", "a fox") is None


def test_a_file_holding_no_embedding_is_a_miss(tmp_path):
    from safetensors.torch import save_file

    PromptCache(directory=tmp_path).put("enc", "a fox", _embedding(7))
    (stored,) = tmp_path.glob("*.safetensors")
    save_file({"embedding": torch.arange(6)}, stored)  # readable, but 1-D integers
    assert PromptCache(directory=tmp_path).get("enc", "a fox") is None


def test_a_folder_this_process_may_not_search_is_a_miss(tmp_path, monkeypatch):
    # As root no folder can be made unsearchable; is_file() raises PermissionError there for other users.
    from pathlib import Path

    cache = PromptCache(directory=tmp_path / "theirs")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", denied)
    assert cache.get("enc", "a fox") is None


def test_no_memory_slots_still_reads_the_folder(tmp_path):
    PromptCache(directory=tmp_path).put("enc", "a fox", _embedding(8))
    cache = PromptCache(capacity=0, directory=tmp_path)
    assert torch.equal(cache.get("enc", "a fox"), _embedding(8)) and len(cache) == 0


def test_a_pipeline_remembers_its_last_eight_prompts():
    # README: each served model remembers the text-encoder output of its last 8 prompts.
    cache = PromptCache()
    for i in range(9):
        cache.put("enc", f"prompt {i}", torch.full((1, 2, 4), float(i)))
    assert cache.get("enc", "prompt 0") is None
    assert all(cache.get("enc", f"prompt {i}") is not None for i in range(1, 9))


def test_a_prompt_read_from_the_folder_is_kept_in_memory(tmp_path):
    PromptCache(directory=tmp_path).put("enc", "a fox", _embedding(9))
    cache = PromptCache(directory=tmp_path)
    assert cache.get("enc", "a fox") is not None and len(cache) == 1
    for stored in tmp_path.glob("*.safetensors"):
        stored.unlink()
    assert torch.equal(cache.get("enc", "a fox"), _embedding(9))  # no second read of the file


def test_a_non_contiguous_embedding_is_persisted(tmp_path):
    # A transposed or strided encoder output: safetensors refuses such tensors as they are.
    strided = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4).transpose(1, 2)
    PromptCache(directory=tmp_path).put("enc", "a fox", strided)
    assert torch.equal(PromptCache(directory=tmp_path).get("enc", "a fox"), strided)


def test_a_prompt_never_cached_is_a_quiet_miss(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert PromptCache(directory=tmp_path).get("enc", "a new prompt") is None
    assert caplog.records == []


def test_a_file_holding_integers_of_the_right_shape_is_a_miss(tmp_path):
    from safetensors.torch import save_file

    PromptCache(directory=tmp_path).put("enc", "a fox", _embedding(7))
    (stored,) = tmp_path.glob("*.safetensors")
    save_file({"embedding": torch.zeros((1, 512, 8), dtype=torch.int64)}, stored)  # token ids, not embeddings
    assert PromptCache(directory=tmp_path).get("enc", "a fox") is None
