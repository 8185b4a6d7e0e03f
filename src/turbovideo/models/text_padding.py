"""Upstream's zero padding of the text context, attended to without materializing it (spec §3.3).

Upstream pads each prompt's umT5 rows with zero rows up to ``text_len`` (512) and cross-attends to all
of them without a mask. The zero rows embed to one row, so they are ``pad`` identical keys and values,
and identical keys' softmax weights add up: a few copies of that key whose scores carry biases with
``sum(exp(bias)) == pad`` give the same attention. A prompt of n rows then costs ceil((n + 16) / 64) * 64
keys instead of 512 (H200, cuDNN: 0.107 against 0.180 ms a call at the 1.3B 480p shape, 0.74 against
1.40 ms at 14B's 720p one; the output differs from the 512-key call's by float rounding only).
"""

from __future__ import annotations

import functools
import math

import torch

# Keys come in multiples of this: on the H200 64 keys took as long as 24 (0.107 / 0.104 ms at 1.3B),
# 128 took longer at 14B (0.77 against 0.74 ms).
KEY_MULTIPLE = 64
# At least this many stand-in keys, so that mixing two rounded biases over them can hit the padding's
# weight: within half a rounding step divided by the copies (bf16: < 5e-4 relative).
MIN_COPIES = 16

Biases = tuple[tuple[float, int], ...]  # (bias, copies) of the padding's stand-in keys


# A request's steps share their prompt: both are asked at every forward, the answers computed once.
@functools.lru_cache(maxsize=64)
def padding_keys(rows: int, text_len: int, dtype: torch.dtype) -> Biases | None:
    """The biases of the keys that stand for the zero padding of a ``rows``-row context up to
    ``text_len``, or None where the padding is attended to as zero rows (nothing to pad, or a prompt
    so long that its keys and the stand-ins would fill ``text_len`` anyway).

    A bias is rounded to ``dtype`` (SDPA adds the mask in the query's dtype), so two neighbouring
    values of it are mixed: their exponentials sum to ``pad`` within half a step over all copies
    (bf16: < 5e-4 relative, against up to 1.6 % for one rounded bias).
    """
    pad = text_len - rows
    keys = _keys(rows)
    if pad <= 0 or keys >= text_len:
        return None
    copies = keys - rows  # MIN_COPIES <= copies < pad: every bias is positive
    target = math.log(pad / copies)
    low = torch.tensor(target, dtype=torch.float64).to(dtype)
    if low.item() > target:
        low = torch.nextafter(low, torch.zeros_like(low))
    high = torch.nextafter(low, torch.full_like(low, math.inf))
    e_low, e_high = math.exp(low.item()), math.exp(high.item())
    high_copies = min(copies, max(0, round((pad - copies * e_low) / (e_high - e_low))))
    return ((high.item(), high_copies), (low.item(), copies - high_copies))


def context_rows(rows: int, text_len: int) -> int:
    """The most rows (prompt rows, then zero rows) a context may have to attend with as many keys as
    ``rows`` prompt rows do. Contexts cut there from the zero-padded text have one of a few lengths
    (48, 112, ..., 432 or ``text_len``), so prompts of similar length share shapes (and CUDA graphs),
    at no extra cost: the zero rows only move weight from the stand-in keys to keys of their own."""
    keys = _keys(rows)
    return text_len if keys >= text_len else keys - MIN_COPIES


def key_count(rows: int, text_len: int) -> int:
    """The keys cross-attention attends with for a ``rows``-row prompt: its rows, then the padding's."""
    return min(_keys(rows), text_len)


def context_lengths(text_len: int) -> tuple[int, ...]:
    """Every length ``context_rows`` cuts a context at, shortest first."""
    return tuple(sorted({context_rows(rows, text_len) for rows in range(text_len + 1)}))


def _keys(rows: int) -> int:
    """The keys a ``rows``-row prompt attends with: its rows and at least MIN_COPIES stand-ins."""
    return -(-(rows + MIN_COPIES) // KEY_MULTIPLE) * KEY_MULTIPLE


@functools.lru_cache(maxsize=64)
def attention_bias(rows: int, biases: Biases, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The [1, 1, 1, keys] score bias of ``rows`` prompt keys (0) followed by the padding's keys, shared
    by every caller (read only).

    Filled on the device: a tensor copied from host memory would make the host wait for the GPU.
    """
    parts = [torch.zeros(rows, dtype=dtype, device=device)]
    parts += [torch.full((copies,), bias, dtype=dtype, device=device) for bias, copies in biases]
    return torch.cat(parts).view(1, 1, 1, -1)
