"""Sparse-linear attention (SLA, spec §4.1) in plain PyTorch: the reference the fast kernels are tested against.

Tensors are [B, H, L, D] inside this module. Each step rounds to the input dtype where upstream's
bf16 tensor ops do, so a bf16 input reproduces upstream's numerics up to accumulation order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of one gathered logits chunk; bounds memory at real sizes (L = 32760 .. 75600).
_CHUNK_ELEMENTS = 1 << 27


def selected_block_count(n_key_blocks: int, topk: float) -> int:
    """Key blocks kept per query block: int(topk * nK), at most nK.

    Upstream allows 0 (and then divides 0/0); we keep at least one block so tiny latents stay finite.
    """
    return max(1, min(n_key_blocks, int(topk * n_key_blocks)))


def block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each run of ``block`` rows of x [B, H, L, D] -> [B, H, ceil(L/block), D].

    Sums in fp32 and divides by the true row count, so a partial last block is not diluted by padding.
    """
    length = x.shape[2]
    n = math.ceil(length / block)
    padded = F.pad(x.float(), (0, 0, 0, n * block - length))
    sums = padded.unflatten(2, (n, block)).sum(3)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = length - (n - 1) * block
    return (sums / counts[:, None]).to(x.dtype)


def select_blocks(q: torch.Tensor, k: torch.Tensor, topk: float, block_q: int, block_k: int) -> torch.Tensor:
    """Indices [B, H, nQ, kk] of the key blocks each query block attends to exactly.

    Pooled scores compare block means of q and of mean-centred k (centring changes no softmax but
    sharpens the pooled score); no 1/sqrt(d) scale, as upstream.
    """
    k_centred = k - k.mean(dim=2, keepdim=True)
    scores = block_mean(q, block_q) @ block_mean(k_centred, block_k).transpose(-1, -2)
    kk = selected_block_count(scores.shape[-1], topk)
    return torch.topk(scores.float(), kk, dim=-1, sorted=False).indices


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, block_q: int, block_k: int
) -> torch.Tensor:
    """Softmax attention of each query block over its selected key blocks only (keys past L masked).

    fp32 logits and sums; probabilities are rounded to the input dtype before P·V like the Triton kernel.
    """
    b, h, length, d = q.shape
    n_q, n_k = math.ceil(length / block_q), math.ceil(length / block_k)
    kk = blocks.shape[-1]
    q_blocks = F.pad(q, (0, 0, 0, n_q * block_q - length)).unflatten(2, (n_q, block_q))
    k_blocks = F.pad(k, (0, 0, 0, n_k * block_k - length)).unflatten(2, (n_k, block_k))
    v_blocks = F.pad(v, (0, 0, 0, n_k * block_k - length)).unflatten(2, (n_k, block_k))
    key_valid = (torch.arange(n_k * block_k, device=q.device) < length).view(n_k, block_k)
    scale = 1.0 / math.sqrt(d)

    chunk = max(1, _CHUNK_ELEMENTS // (b * h * block_q * kk * block_k))
    out = []
    for start in range(0, n_q, chunk):
        idx = blocks[:, :, start : start + chunk]  # [B, H, c, kk]
        gather = idx[..., None, None].expand(*idx.shape, block_k, d)
        keys = torch.gather(k_blocks[:, :, None].expand(-1, -1, idx.shape[2], -1, -1, -1), 3, gather)
        values = torch.gather(v_blocks[:, :, None].expand(-1, -1, idx.shape[2], -1, -1, -1), 3, gather)
        keys, values = keys.flatten(3, 4), values.flatten(3, 4)  # [B, H, c, kk*bk, D]
        logits = (q_blocks[:, :, start : start + chunk].float() @ keys.float().transpose(-1, -2)) * scale
        logits = logits.masked_fill(~key_valid[idx].flatten(-2)[..., None, :], float("-inf"))
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        o = (p.to(q.dtype).float() @ values.float()) / p.sum(-1, keepdim=True)
        out.append(o.to(q.dtype))
    return torch.cat(out, dim=2).flatten(2, 3)[:, :, :length]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear attention over all keys with a softmax feature map over the head dim, in the input dtype."""
    phi_q, phi_k = q.softmax(-1), k.softmax(-1)
    kv = phi_k.transpose(-1, -2) @ v
    k_sum = phi_k.sum(dim=2, keepdim=True)
    return (phi_q @ kv) / (1e-5 + (phi_q * k_sum).sum(-1, keepdim=True))


def sla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    proj_l: torch.nn.Linear,
    topk: float,
    block_q: int = 128,
    block_k: int = 64,
) -> torch.Tensor:
    """SLA on q, k, v [B, L, H, D] (q, k already normed and rotated) -> [B, L, H, D]."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    blocks = select_blocks(qh, kh, topk, block_q, block_k)
    sparse = sparse_attention(qh, kh, vh, blocks, block_q, block_k)
    bias = None if proj_l.bias is None else proj_l.bias.to(q.dtype)
    linear = F.linear(linear_attention(qh, kh, vh), proj_l.weight.to(q.dtype), bias)
    return (sparse + linear).transpose(1, 2)
