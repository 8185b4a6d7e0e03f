"""Prompt cleaning and tokenization for the umT5 text encoder.

Upstream tokenizes with transformers' fast T5 tokenizer (512 tokens, ``</s>`` appended, padded
with id 0). We read the same ``tokenizer.json`` with the ``tokenizers`` library and do the
truncation, the ``</s>`` and the padding ourselves, so the ids do not depend on whether the file
carries T5's ``</s>``-appending post-processor or stored padding/truncation settings.

``load_tokenizer(directory)`` reads the umT5 tokenizer (the ``google/umt5-xxl/`` folder of
``Wan-AI/Wan2.1-T2V-1.3B``); ``load_tokenizer(None)`` builds the tiny byte-level tokenizer that
the ``tiny`` models use, with no file at all.
"""

from __future__ import annotations

import html
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import ftfy
import regex
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from turbovideo.models.checkpoint import CheckpointError

MAX_LENGTH = 512
PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
TOKENIZER_FILE = "tokenizer.json"

_WHITESPACE = regex.compile(r"\s+")
log = logging.getLogger(__name__)


def clean_text(text: str) -> str:
    """Upstream's "whitespace" cleaning: repair mojibake, unescape HTML twice, collapse whitespace.

    The pipeline keys its prompt-embedding cache on this text, so two prompts that clean to the
    same string share one embedding.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


def is_blank(text: str) -> bool:
    """Whether nothing visible is left of ``text`` once cleaned as the encoder sees it (e.g. "&nbsp;",
    a byte-order mark or zero-width spaces alone)."""
    return all(char.isspace() or unicodedata.category(char) == "Cf" for char in clean_text(text))


@dataclass(frozen=True)
class TokenBatch:
    """Token ids for a batch of prompts, always ``MAX_LENGTH`` wide.

    ``mask`` is 1 for the prompt's tokens and its ``</s>``, 0 for padding; ``truncated[i]`` says
    whether prompt ``i`` lost tokens to the length limit.
    """

    ids: torch.Tensor  # [B, 512] int64
    mask: torch.Tensor  # [B, 512] int64
    truncated: list[bool]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


class PromptTokenizer:
    """A ``tokenizers.Tokenizer`` with umT5's cleaning, truncation, ``</s>`` and padding."""

    def __init__(self, tokenizer: Tokenizer, source: str, max_length: int = MAX_LENGTH) -> None:
        self._tokenizer = tokenizer
        # Settings stored in a tokenizer.json would pad or cut before we append </s>.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.source = source
        self.max_length = max_length
        self.pad_id = self._special_id(PAD_TOKEN)
        self.eos_id = self._special_id(EOS_TOKEN)

    def _special_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(
                f"tokenizer {self.source} has no {token} token, so it is not a T5/umT5 tokenizer"
            )
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def clean(self, text: str) -> str:
        return clean_text(text)

    def token_count(self, text: str) -> int:
        """Tokens of the cleaned text, without ``</s>``: over ``max_length - 1``, ``encode`` cuts it."""
        return len(self._tokenizer.encode(self.clean(text), add_special_tokens=False).ids)

    def encode(self, prompts: list[str]) -> TokenBatch:
        """Clean and tokenize ``prompts``; a prompt longer than 511 tokens is cut and logged."""
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        truncated = []
        # add_special_tokens=False keeps the file's post-processor from appending a second </s>.
        encodings = self._tokenizer.encode_batch([self.clean(p) for p in prompts], add_special_tokens=False)
        for row, encoding in enumerate(encodings):
            body = encoding.ids
            keep = self.max_length - 1
            if len(body) > keep:
                log.warning(
                    "prompt %d has %d tokens; only the first %d are used (the text encoder reads %d with </s>)",
                    row,
                    len(body),
                    keep,
                    self.max_length,
                )
            tokens = torch.tensor([*body[:keep], self.eos_id], dtype=torch.long)
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
            truncated.append(len(body) > keep)
        return TokenBatch(ids=ids, mask=mask, truncated=truncated)


def load_tokenizer(directory: str | Path | None) -> PromptTokenizer:
    """Load the umT5 tokenizer from a folder holding ``tokenizer.json`` (or from that file).

    ``None`` gives the tiny tokenizer of the ``tiny`` models.
    """
    if directory is None:
        return PromptTokenizer(tiny_tokenizer(), source="tiny")
    path = Path(directory)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(
            f"tokenizer file {file} does not exist; download the google/umt5-xxl tokenizer folder"
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable JSON
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{file} is not a readable tokenizers file: {first_line}", path=file.resolve()
        ) from exc
    return PromptTokenizer(tokenizer, source=str(file))


def tiny_tokenizer() -> Tokenizer:
    """A byte-level tokenizer: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then one token per byte (259 ids).

    Any text encodes without a download, and different prompts give different ids, which keeps the
    tiny pipeline's text conditioning meaningful. Byte tokens are ordered by their printable
    stand-in character so the ids are the same on every run.
    """
    specials = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
    byte_tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate((*specials, *byte_tokens))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(list(specials))
    return tokenizer
