"""Small DiT building blocks: fp32 norms, the timestep sinusoid, 3D RoPE, (un)patchify.

Numerics follow upstream's "fast" norms (spec §5.5): statistics and affine in fp32, one rounding
back to the input dtype at the end. Pure functions where there is no state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMS norm over the last dim with an fp32 weight; fp32 math, one final rounding."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight
        return y.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, optionally affine (fp32 weight/bias); fp32 math, one final rounding."""

    def __init__(self, dim: int, eps: float, affine: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
            self.bias = nn.Parameter(torch.zeros(dim, dtype=torch.float32))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,), self.weight, self.bias, self.eps).to(x.dtype)


def linear_fp32(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear`` evaluated in fp32 whatever its storage dtype (upstream runs it under fp32 autocast)."""
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)


def linear_gelu(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``GELU_tanh(linear(x))`` with the GELU in the GEMM epilogue (cuBLASLt on a GPU).

    Saves a pass over the FFN's widest activation; the GELU sees the fp32 accumulator, so the result
    is rounded once instead of twice (linear, then GELU, in the model dtype).
    """
    flat = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(linear.bias, flat, linear.weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], out.shape[-1])


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of timesteps t [B] (0..1000 scale): [cos, sin], computed in fp64."""
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the (t, h, w) rotary axes; 44/42/42 for head_dim 128 (spec §3.4)."""
    spatial = (head_dim // 6) * 2
    return head_dim - 2 * spatial, spatial, spatial


def rope_angles(grid: tuple[int, int, int], head_dim: int, device: torch.device | str) -> torch.Tensor:
    """Rotation angles [T*H*W, head_dim/2] (fp32) for a (t, h, w) token grid in row-major order."""
    gt, gh, gw = grid
    t_dim, h_dim, w_dim = rope_split(head_dim)
    shape = (gt, gh, gw, -1)
    angles = (
        _axis_angles(gt, t_dim, device)[:, None, None, :].expand(shape),
        _axis_angles(gh, h_dim, device)[None, :, None, :].expand(shape),
        _axis_angles(gw, w_dim, device)[None, None, :, :].expand(shape),
    )
    return torch.cat(angles, dim=-1).reshape(gt * gh * gw, head_dim // 2)


def _axis_angles(size: int, axis_dim: int, device: torch.device | str) -> torch.Tensor:
    # Upstream's fp32 recipe, op for op: exponents 2j/d in fp32, then 1 / 10000**exponent in fp32.
    # Rounding the exact value to fp32 instead moves most frequencies by an ulp or three.
    exponents = torch.arange(0, axis_dim, 2, device=device).float() / axis_dim
    omega = 1.0 / (10000.0**exponents)
    return torch.outer(torch.arange(size, dtype=torch.float32, device=device), omega)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2p, 2p+1) of x [B, L, H, D] by the angles whose cos and sin are
    given as [L, D/2] fp32; fp32 math."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] -> tokens [B, L, C*pt*ph*pw], tokens (t, h, w) row-major, channel outermost per token."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """Tokens [B, L, pt*ph*pw*C] (channel innermost, unlike patchify) -> [B, C, T, H, W]."""
    b = tokens.shape[0]
    gt, gh, gw = grid
    pt, ph, pw = patch
    x = tokens.reshape(b, gt, gh, gw, pt, ph, pw, -1)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, gt * pt, gh * ph, gw * pw)
