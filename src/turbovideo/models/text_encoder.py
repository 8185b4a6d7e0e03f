"""The umT5-XXL text encoder (encoder half only) and ``encode_prompts``.

Module and key names follow Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (242 keys), so the file
loads unchanged. The math follows upstream op by op, because the DiT was trained on its bf16
rounding: T5 RMS norm with fp32 statistics, attention without 1/sqrt(d) scaling plus a per-layer
relative position bias, softmax in fp32, and a tanh GELU evaluated as separate tensor ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from turbovideo.models.checkpoint import StateDict, load_into, read_state_dict
from turbovideo.models.random_init import materialize
from turbovideo.models.tokenizer import PromptTokenizer


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


TEXT_ENCODER_CONFIGS: dict[str, TextEncoderConfig] = {
    "umt5-xxl": TextEncoderConfig(vocab_size=256384, dim=4096, ffn_dim=10240, num_heads=64, num_layers=24),
    "tiny": TextEncoderConfig(vocab_size=384, dim=32, ffn_dim=64, num_heads=4, num_layers=2),
}


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, device: torch.device
) -> torch.Tensor:
    """Bidirectional T5 buckets of ``key_pos - query_pos``, shape [length, length].

    Half the buckets are for keys after the query. Within a half, distances below ``max_exact``
    get a bucket each and larger ones share log-spaced buckets up to ``max_distance``.
    """
    positions = torch.arange(length, device=device)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    distance = relative.abs()
    # Distance 0 gives log(0) = -inf here; torch.where below picks the exact bucket for it.
    log_bucket = (
        max_exact
        + (
            torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
        ).long()
    )
    log_bucket = log_bucket.clamp(max=half - 1)
    return (relative > 0).long() * half + torch.where(distance < max_exact, distance, log_bucket)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU with every intermediate rounded to ``x.dtype``, as upstream evaluates it.

    ``F.gelu(approximate="tanh")`` computes internally in fp32 and differs by an ulp in bf16.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class RelativePositionBias(nn.Module):
    """One learned bias per (bucket, head); the checkpoint names it ``pos_embedding.embedding``."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, heads, L, L]


class SelfAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.dim, config.dim, bias=False)
        self.k = nn.Linear(config.dim, config.dim, bias=False)
        self.v = nn.Linear(config.dim, config.dim, bias=False)
        self.o = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        masked_out = ~key_mask[:, None, None, :]
        lowest = torch.finfo(x.dtype).min
        # Eager on purpose: upstream rounds q.k + bias to bf16 before the fp32 softmax, and fused SDPA
        # (which keeps the logits in fp32) drifts far from it with real-size random weights (measured
        # 1.2 relative on an H100) while being slower (32 vs 27 ms). Upstream puts the dtype minimum
        # in the bias of padded keys; writing it over q.k + bias gives the same softmax.
        logits = (q @ k.transpose(-1, -2) + position_bias).masked_fill_(masked_out, lowest)
        out = torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class GatedFeedForward(nn.Module):
    """``fc2(fc1(x) * gelu(gate(x)))``; ``gate`` is a Sequential upstream, hence the key ``gate.0``."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(config.dim, config.ffn_dim, bias=False))
        self.fc1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * gelu_tanh(self.gate(x)))


class EncoderBlock(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.norm1 = T5RMSNorm(config.dim, config.eps)
        self.attn = SelfAttention(config)
        self.norm2 = T5RMSNorm(config.dim, config.eps)
        self.ffn = GatedFeedForward(config)
        self.pos_embedding = RelativePositionBias(config.num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.pos_embedding(buckets), key_mask)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """umT5 encoder: ids [B, L] and mask [B, L] -> final-norm states [B, L, dim], zero where mask is 0.

    Bit-exact with transformers' eager UMT5 in fp32 and bf16 (upstream's op order).
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.norm = T5RMSNorm(config.dim, config.eps)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        key_mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        buckets = relative_position_buckets(
            ids.shape[1], self.config.num_buckets, self.config.max_distance, ids.device
        )
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, buckets, key_mask)
        # Rows of padding go to the DiT as exact zeros (upstream keeps the first n rows, pads with 0).
        return self.norm(x).masked_fill(~key_mask[..., None], 0.0)


def _config(name: str | TextEncoderConfig) -> TextEncoderConfig:
    if isinstance(name, TextEncoderConfig):
        return name
    if name not in TEXT_ENCODER_CONFIGS:
        raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(TEXT_ENCODER_CONFIGS)}")
    return TEXT_ENCODER_CONFIGS[name]


def _build_on_meta(config: TextEncoderConfig, dtype: torch.dtype) -> UMT5Encoder:
    with torch.device("meta"):
        return UMT5Encoder(config).to(dtype).eval().requires_grad_(False)


def build_text_encoder(
    name: str | TextEncoderConfig = "umt5-xxl",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> UMT5Encoder:
    """A text encoder with seeded random weights; on ``meta`` nothing is allocated."""
    return materialize(_build_on_meta(_config(name), dtype), device, seed)


def load_text_encoder(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    name: str | TextEncoderConfig = "umt5-xxl",
) -> UMT5Encoder:
    """Load a Wan-format umT5 encoder file (e.g. ``models_t5_umt5-xxl-enc-bf16.pth``), cast to ``dtype``."""
    config = _config(name)
    encoder = _build_on_meta(config, dtype)
    state = read_state_dict(path)
    load_into(
        encoder, state, source=Path(path).name, expected=f"the {name} text encoder", describe=describe_foreign
    )
    return encoder.to(device)


def describe_foreign(state: StateDict) -> str | None:
    """Name the kind of model a state dict holds when it is not a Wan umT5 encoder."""
    keys = state.keys()

    def has(fragment: str) -> bool:
        return any(fragment in key for key in keys)

    if has("int8_weight"):
        return "a quantized TurboDiffusion DiT (-quant) checkpoint"
    if has("self_attn.q.weight") or "patch_embedding.weight" in keys:
        return "a Wan/TurboDiffusion DiT checkpoint"
    if has("decoder.upsamples.") or has("encoder.downsamples."):
        return "a Wan VAE checkpoint"
    if has("SelfAttention.q.weight"):
        return "a Hugging Face transformers T5/umT5 checkpoint, whose keys are not Wan's layout"
    if has("decoder.blocks."):
        return "a full T5 encoder-decoder checkpoint, not the encoder-only file"
    if "token_embedding.weight" in keys:
        rows, width = state["token_embedding.weight"].shape
        return f"a T5 encoder with vocabulary {rows} and width {width}"
    return None


def prompt_rows(context: torch.Tensor) -> torch.Tensor:
    """``context`` [B, rows, dim] without the zero rows after its longest prompt: upstream's padding,
    which the DiT attends to without materializing (WanDiT). Reads the values: pass a host tensor."""
    nonzero = context.ne(0).flatten(2).any(-1).any(0).nonzero()
    return context[:, : int(nonzero[-1]) + 1 if len(nonzero) else 0]


def encode_prompts(prompts: list[str], tokenizer: PromptTokenizer, encoder: UMT5Encoder) -> torch.Tensor:
    """Embed prompts as the DiT's text context: [B, 512, dim] in the encoder's dtype and device.

    Rows after each prompt's ``</s>`` are zero. Prompts over 511 tokens are cut and the tokenizer
    logs a warning; a caller that must report it reads ``tokenizer.encode(prompts).truncated``
    (tokenizing again costs microseconds next to the encoder).
    """
    batch = tokenizer.encode(prompts)
    largest = int(batch.ids.max())
    if largest >= encoder.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.source} gave token id {largest}, but the text encoder embeds only "
            f"{encoder.config.vocab_size} ids; the tokenizer and the encoder belong to different models"
        )
    with torch.inference_mode():
        return encoder(batch.ids.to(encoder.device), batch.mask.to(encoder.device))
