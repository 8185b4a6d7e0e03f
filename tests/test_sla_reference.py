"""SLA reference (spec §4.1) against dense attention and a naive float64 masked implementation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from turbovideo.models import sla_reference as sla_module
from turbovideo.models.sla_reference import block_mean, select_blocks, selected_block_count, sla_reference

CONVENTIONS = [(128, 64), (64, 128)]  # (block_q, block_k): sla / sagesla on sm90


def qkv(length: int, heads: int = 2, dim: int = 32, batch: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(length)
    return [
        torch.randn(batch, length, heads, dim, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)
    ]


def projection(dim: int, zero: bool = False) -> nn.Linear:
    proj = nn.Linear(dim, dim)
    if zero:
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
    return proj


def naive_sla(q, k, v, proj_l, topk, block_q, block_k):
    """Float64, one explicit [L, L] mask; returns (output [B, L, H, D], selected block indices)."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    length, d = q.shape[2], q.shape[3]
    n_q, n_k = math.ceil(length / block_q), math.ceil(length / block_k)
    k_centred = k - k.mean(2, keepdim=True)
    q_pool = torch.stack([q[:, :, i * block_q : (i + 1) * block_q].mean(2) for i in range(n_q)], 2)
    k_pool = torch.stack([k_centred[:, :, j * block_k : (j + 1) * block_k].mean(2) for j in range(n_k)], 2)
    selected = (q_pool @ k_pool.transpose(-1, -2)).topk(int(topk * n_k), dim=-1).indices
    block_mask = torch.zeros(*selected.shape[:2], n_q, n_k, dtype=torch.bool).scatter_(-1, selected, True)
    mask = block_mask.repeat_interleave(block_q, 2).repeat_interleave(block_k, 3)[:, :, :length, :length]
    logits = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    sparse = logits.softmax(-1) @ v
    phi_q, phi_k = q.softmax(-1), k.softmax(-1)
    linear = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / (
        1e-5 + (phi_q * phi_k.sum(2, keepdim=True)).sum(-1, keepdim=True)
    )
    linear = F.linear(linear, proj_l.weight.double(), proj_l.bias.double())
    return (sparse + linear).transpose(1, 2), selected


@pytest.mark.parametrize("block_q,block_k", CONVENTIONS)
def test_full_topk_with_zero_projection_is_dense_attention(block_q, block_k):
    q, k, v = qkv(300, batch=2)  # 300 leaves a partial last block in both conventions
    out = sla_reference(q, k, v, proj_l=projection(32, zero=True), topk=1.0, block_q=block_q, block_k=block_k)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_q,block_k", CONVENTIONS)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "block-by-block"])
def test_sparse_topk_matches_naive_masked_float64(block_q, block_k, chunked, monkeypatch):
    if chunked:  # the memory bound real sizes hit: one query block per gathered chunk
        monkeypatch.setattr(sla_module, "_CHUNK_ELEMENTS", 1)
    length, topk = 1300, 0.1  # nK = 21 or 11 -> kk = 2 or 1; last blocks are partial
    q, k, v = qkv(length)
    proj_l = projection(32)
    with torch.no_grad():
        expected, naive_selected = naive_sla(q, k, v, proj_l, topk, block_q, block_k)
        out = sla_reference(q, k, v, proj_l=proj_l, topk=topk, block_q=block_q, block_k=block_k)
    selected = select_blocks(q.transpose(1, 2), k.transpose(1, 2), topk, block_q, block_k)
    assert torch.equal(selected.sort(-1).values, naive_selected.sort(-1).values)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_bf16_stays_within_bf16_error_of_float64():
    q, k, v = qkv(1300, dtype=torch.bfloat16)
    proj_l = projection(32)
    with torch.no_grad():
        expected, _ = naive_sla(q, k, v, proj_l, 0.1, 128, 64)
        out = sla_reference(q, k, v, proj_l=proj_l, topk=0.1)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-2


def test_partial_last_block_is_averaged_over_its_true_rows():
    x = torch.arange(5 * 3, dtype=torch.float32).view(1, 1, 5, 3)
    pooled = block_mean(x, 2)
    torch.testing.assert_close(
        pooled[0, 0], torch.stack([x[0, 0, :2].mean(0), x[0, 0, 2:4].mean(0), x[0, 0, 4]])
    )


def test_selected_block_count_follows_int_rule_and_keeps_one_block():
    assert selected_block_count(512, 0.1) == 51  # 1.3B 480p, sla
    assert selected_block_count(1182, 0.15) == 177  # 14B 720p
    assert selected_block_count(256, 1.0) == 256
    assert selected_block_count(2, 0.1) == 1  # upstream would take 0 blocks and produce NaN


def test_tiny_sequence_stays_finite():
    q, k, v = qkv(72)  # the tiny DiT's 16x3x8x12 latent: nK = 2, int(0.1 * 2) = 0
    out = sla_reference(q, k, v, proj_l=projection(32), topk=0.1)
    assert torch.isfinite(out).all()
