"""Upstream's zero-padded text context as a few biased keys: the same attention from fewer rows."""

import math
from dataclasses import replace

import pytest
import torch

from turbovideo.models import DIT_CONFIGS, build_dit, prompt_rows
from turbovideo.models.text_padding import (
    KEY_MULTIPLE,
    MIN_COPIES,
    attention_bias,
    context_lengths,
    context_rows,
    key_count,
    padding_keys,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [0, 1, 30, 48, 49, 63, 100, 383, 432])
def test_the_stand_in_keys_weigh_as_much_as_the_padding(rows, dtype):
    biases = padding_keys(rows, 512, dtype)
    copies = sum(count for _, count in biases)
    assert (rows + copies) % KEY_MULTIPLE == 0 and MIN_COPIES <= copies < 512 - rows
    for bias, _ in biases:
        assert torch.tensor(bias, dtype=dtype).item() == bias  # exactly what SDPA adds in dtype
    weight = sum(count * math.exp(bias) for bias, count in biases)
    # One bias rounded to bf16 misses by up to 1.6 %; two neighbouring values mixed, by far less.
    assert abs(weight / (512 - rows) - 1) < (5e-4 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("rows", [433, 500, 512, 600])
def test_a_prompt_near_or_past_text_len_keeps_its_rows(rows):
    assert padding_keys(rows, 512, torch.bfloat16) is None


def test_contexts_cut_at_context_rows_attend_with_the_prompts_keys_and_share_lengths():
    assert context_lengths(512) == (48, 112, 176, 240, 304, 368, 432, 512)
    for rows in range(513):
        cut = context_rows(rows, 512)
        assert cut >= rows
        assert _keys(cut) == _keys(rows)


def test_the_key_count_is_what_the_dit_attends_with_for_any_prompt_length():
    # The memory plan counts the text keys a request holds; past 496 rows they stay 512, never 576.
    for rows in range(601):
        assert key_count(rows, 512) == _keys(min(rows, 512)), rows


def _keys(rows: int) -> int:
    """The keys the DiT attends with for ``rows`` prompt rows (WanDiT._text_context)."""
    biases = padding_keys(rows, 512, torch.bfloat16)
    return 512 if biases is None else rows + sum(copies for _, copies in biases)


def test_the_bias_is_zero_for_prompt_keys_and_the_chosen_values_after():
    biases = padding_keys(30, 512, torch.bfloat16)
    bias = attention_bias(30, biases, torch.bfloat16, torch.device("cpu"))
    assert bias.shape == (1, 1, 1, 64) and bias.dtype == torch.bfloat16
    assert not bias[..., :30].any()
    assert sorted(set(bias[..., 30:].flatten().tolist())) == sorted({b for b, n in biases if n})


@pytest.mark.parametrize("rows", [1, 7, 64, 200, 432, 433, 511])
def test_a_prompt_without_its_padding_gives_the_padded_forward(rows):
    model = build_dit("tiny-t2v", dtype=torch.float32, attention="dense")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 3, 8, 12, generator=g)
    t = torch.tensor([250.5, 937.25])
    padded = torch.zeros(2, 512, DIT_CONFIGS["tiny-t2v"].text_dim)
    padded[:, :rows] = torch.randn(2, rows, padded.shape[-1], generator=g)
    with torch.no_grad():
        expected = model(x, t, padded)
        assert _rel(model(x, t, padded[:, :rows]), expected) < 1e-5


def test_without_the_bias_the_stand_in_keys_would_change_the_output():
    model = build_dit("tiny-t2v", dtype=torch.float32, attention="dense")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    t = torch.tensor([500.0])
    prompt = torch.randn(1, 7, DIT_CONFIGS["tiny-t2v"].text_dim, generator=g)
    with torch.no_grad():
        tokens, inputs = model.embed(x, t, prompt)
        assert inputs.text.k.shape[2] == KEY_MULTIPLE and inputs.text.bias is not None
        unbiased = model.run_blocks(tokens, replace(inputs, text=inputs.text._replace(bias=None)))
        padded = model(x, t, torch.cat([prompt, prompt.new_zeros(1, 505, prompt.shape[-1])], 1))
        biased = model(x, t, prompt)
    assert _rel(biased, padded) < 1e-5
    assert (
        _rel(
            model.head(unbiased, inputs.e).flatten(),
            model.head(model.run_blocks(tokens, inputs), inputs.e).flatten(),
        )
        > 1e-3
    )


def test_prompt_rows_drops_the_zero_rows_after_the_longest_prompt():
    context = torch.zeros(2, 512, 4)
    context[0, :3] = 1.0
    context[1, 5, 2] = -2.0  # a zero row inside a prompt stays
    assert prompt_rows(context).shape == (2, 6, 4)
    assert torch.equal(prompt_rows(context), context[:, :6])
    assert prompt_rows(torch.zeros(1, 512, 4)).shape == (1, 0, 4)
