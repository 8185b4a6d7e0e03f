"""Prompt cleaning and tokenization: upstream's cleaning rules, 512-token layout, both tokenizer sources."""

import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from turbovideo.models import CheckpointError, clean_text, load_tokenizer
from turbovideo.models.tokenizer import MAX_LENGTH

WORDS = ["a", "cat", "dog", "runs", "on", "the", "beach", "red", "car", "at", "night"]


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("caf\u00c3\u00a9 au lait", "café au lait"),  # UTF-8 read as Latin-1
        ("salt &amp;amp; pepper", "salt & pepper"),  # escaped twice
        ("&lt;b&gt;bold&lt;/b&gt; &quot;x&quot;", '<b>bold</b> "x"'),
        ("  a\n\n cat\t\tsits \r\n on  a\u00a0\u00a0mat  ", "a cat sits on a mat"),
        ("A Cat, Sitting!", "A Cat, Sitting!"),  # no lower-casing, punctuation kept
        (" \n\t ", ""),
    ],
)
def test_clean_text(raw: str, cleaned: str) -> None:
    assert clean_text(raw) == cleaned


def test_tiny_tokenizer_layout() -> None:
    tokenizer = load_tokenizer(None)
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)
    assert tokenizer.vocab_size <= 384
    batch = tokenizer.encode(["hello", "  hello \n", "", "a different prompt"])
    assert batch.ids.shape == batch.mask.shape == (4, MAX_LENGTH)
    assert batch.ids.dtype == torch.long
    assert batch.lengths.tolist() == [6, 6, 1, 19]  # bytes + </s>; cleaning makes rows 0 and 1 equal
    assert torch.equal(batch.ids[0], batch.ids[1])
    assert batch.ids[0, 5] == 1 and batch.ids[2, 0] == 1
    assert int(batch.ids[[0, 1, 3], :5].min()) > 2  # plain text never maps to specials or <unk>
    for row, n in enumerate(batch.lengths.tolist()):
        assert batch.mask[row, :n].eq(1).all() and batch.mask[row, n:].eq(0).all()
        assert batch.ids[row, n:].eq(0).all()
    assert batch.truncated == [False] * 4
    assert load_tokenizer(None).encode(["a different prompt"]).ids.equal(batch.ids[3:])


@pytest.mark.parametrize(("body", "truncated"), [(510, False), (511, False), (512, True), (900, True)])
def test_truncation_keeps_eos_last(body: int, truncated: bool, caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = load_tokenizer(None)
    with caplog.at_level(logging.WARNING):
        batch = tokenizer.encode(["short", "x" * body])
    assert batch.truncated == [False, truncated]
    n = min(body, MAX_LENGTH - 1) + 1
    assert int(batch.lengths[1]) == n
    assert int(batch.ids[1, n - 1]) == 1
    assert int((batch.ids[1] == 1).sum()) == 1
    assert ("prompt 1 has" in caplog.text) == truncated


def _unigram_tokenizer(post_processor: bool) -> Tokenizer:
    """A small umT5-style tokenizer: SentencePiece unigram, Metaspace, optionally T5's ``$A </s>``."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0 - i / 10) for i, w in enumerate(WORDS)]
    pieces += [(c, -8.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz,."]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>"])
    if post_processor:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
    else:
        # Settings a file may carry; the loader must not let them pad or cut before </s>.
        tokenizer.enable_padding(pad_id=0, pad_token="<pad>", length=40)
        tokenizer.enable_truncation(max_length=10)
    return tokenizer


@pytest.fixture
def umt5_style_dir(tmp_path):
    directory = tmp_path / "google" / "umt5-xxl"
    directory.mkdir(parents=True)
    _unigram_tokenizer(post_processor=True).save(str(directory / "tokenizer.json"))
    return directory


PROMPTS = ["a cat runs on the beach", "a red car at night, the dog runs.", "", " ".join(WORDS * 60)]


def test_directory_loader_appends_one_eos(umt5_style_dir, tmp_path) -> None:
    raw = Tokenizer.from_file(str(umt5_style_dir / "tokenizer.json"))
    assert raw.encode("a cat").ids[-1] == 1  # the file's post-processor really appends </s>

    tokenizer = load_tokenizer(umt5_style_dir)
    batch = tokenizer.encode(PROMPTS)
    assert batch.ids[0, :7].tolist() == [3, 4, 6, 7, 8, 9, 1]
    # What the pipeline's "read only the first 511" warning counts: the cleaned prompt, without </s>.
    assert [tokenizer.token_count(p) for p in [*PROMPTS[:3], " a \n cat  "]] == [6, 10, 0, 2]
    assert (batch.ids == 1).sum(dim=1).tolist() == [1, 1, 1, 1]
    assert batch.lengths.tolist() == [7, 11, 1, 512]
    assert batch.truncated == [False, False, False, True]

    bare = tmp_path / "bare"
    bare.mkdir()
    _unigram_tokenizer(post_processor=False).save(str(bare / "tokenizer.json"))
    assert json.loads((bare / "tokenizer.json").read_text())["post_processor"] is None
    same = load_tokenizer(bare / "tokenizer.json").encode(PROMPTS)
    assert torch.equal(same.ids, batch.ids) and torch.equal(same.mask, batch.mask)


@pytest.mark.oracle
def test_matches_transformers_fast_tokenizer(umt5_style_dir) -> None:
    """Upstream calls the fast tokenizer with padding="max_length", truncation=True, max_length=512."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(umt5_style_dir / "tokenizer.json"),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    ours = load_tokenizer(umt5_style_dir).encode(PROMPTS)
    expected = reference(
        [clean_text(p) for p in PROMPTS],
        padding="max_length",
        truncation=True,
        max_length=512,
        return_tensors="pt",
    )
    assert torch.equal(ours.ids, expected.input_ids)
    assert torch.equal(ours.mask, expected.attention_mask)


def test_loader_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError, match="not a readable tokenizers file") as caught:
        load_tokenizer(tmp_path)
    assert caught.value.path == (tmp_path / "tokenizer.json").resolve()  # the start checks (and heals) it
    no_eos = Tokenizer(models.Unigram([("<pad>", 0.0), ("<unk>", 0.0), ("\u2581a", -1.0)], unk_id=1))
    no_eos.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="no </s> token"):
        load_tokenizer(tmp_path)
