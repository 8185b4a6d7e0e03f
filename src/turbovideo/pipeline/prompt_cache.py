"""Prompt embeddings kept so that repeated prompts skip the text encoder.

An in-memory LRU keyed by (encoder identity, cleaned text), optionally backed by a directory of
safetensors files keyed by the sha256 of both. The directory is best-effort: any file-system error
(full disk, read-only volume, a torn file) degrades to a cache miss, never a failed request.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from turbovideo.files import replaced_when_written

log = logging.getLogger(__name__)

_TENSOR_NAME = "embedding"


class PromptCache:
    """LRU of ``capacity`` embeddings (held on the CPU), plus an optional persistent directory."""

    def __init__(self, capacity: int = 8, directory: Path | None = None) -> None:
        self.capacity = capacity
        self.directory = directory
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def get(self, encoder_id: str, text: str) -> torch.Tensor | None:
        key = (encoder_id, text)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        hit = self._read(key)
        if hit is not None:
            self._remember(key, hit)
        return hit

    def put(self, encoder_id: str, text: str, embedding: torch.Tensor) -> None:
        key = (encoder_id, text)
        host = embedding.detach().to("cpu").contiguous()
        self._remember(key, host)
        self._write(key, host)

    def __len__(self) -> int:
        return len(self._entries)

    def _remember(self, key: tuple[str, str], embedding: torch.Tensor) -> None:
        self._entries[key] = embedding
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def _path(self, key: tuple[str, str]) -> Path | None:
        if self.directory is None:
            return None
        digest = hashlib.sha256("\0".join(key).encode("utf-8")).hexdigest()
        return self.directory / f"{digest}.safetensors"

    def _read(self, key: tuple[str, str]) -> torch.Tensor | None:
        path = self._path(key)
        if path is None:
            return None
        try:
            if not path.is_file():  # inside: a folder this process may not search raises here
                return None
            embedding = load_file(path)[_TENSOR_NAME]
        except (OSError, SafetensorError, KeyError) as err:
            log.warning("prompt cache: ignoring unreadable %s (%s)", path, err)
            return None
        if embedding.dim() != 3 or not embedding.is_floating_point():  # [1, tokens, width], as put
            log.warning("prompt cache: ignoring %s, which holds no prompt embedding", path)
            return None
        return embedding

    def _write(self, key: tuple[str, str], embedding: torch.Tensor) -> None:
        path = self._path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replaced_when_written(path) as partial:  # a reader never sees half a file
                save_file({_TENSOR_NAME: embedding}, partial)
        except (OSError, SafetensorError) as err:
            log.warning("prompt cache: not persisted to %s (%s)", path.parent, err)
