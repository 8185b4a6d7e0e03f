"""The Wan DiT (Wan2.1 T2V 1.3B/14B, one Wan2.2 I2V A14B expert) as TurboDiffusion runs it (spec §3).

dtype flow: the residual stream, linears and attention run in the model dtype (bf16 by default);
timestep MLPs, modulation, norms and the head run in fp32 with one rounding back. Built with
dtype=float32 everything is fp32. Self-attention goes through a backend from attention.py.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..catalog import DEFAULT_SLA_TOPK
from .attention import AttentionOp, select_attention
from .checkpoint import CheckpointError, load_into, read_state_dict
from .dit_checkpoint import (
    describe_dit_state,
    identify,
    is_quantized,
    linear_patch_embedding,
    variant_label,
)
from .dit_configs import DIT_CONFIGS, DiTConfig
from .int8 import BLOCK as QUANT_BLOCK
from .int8 import Activation, Int8Linear, QuantizedActivation, Residual
from .layers import (
    LayerNorm,
    RMSNorm,
    apply_rope,
    linear_fp32,
    linear_gelu,
    patchify,
    rope_angles,
    timestep_embedding,
    unpatchify,
)
from .random_init import materialize
from .text_padding import attention_bias, padding_keys

__all__ = ["DIT_CONFIGS", "DiTConfig", "DiTInputs", "TextKeys", "WanDiT", "build_dit", "load_dit"]

logger = logging.getLogger("turbovideo")


def use_fused_kernels(x: torch.Tensor) -> bool:
    """Whether a block runs its norms, modulation, residuals and RoPE as the Triton kernels of
    turbovideo.kernels (same roundings, fewer passes over memory) instead of PyTorch ops."""
    return x.is_cuda and x.dtype == torch.bfloat16


def _block_linear(in_features: int, out_features: int, dtype: torch.dtype, quantized: bool) -> nn.Module:
    if quantized:
        return Int8Linear(in_features, out_features, bias_dtype=dtype)
    return nn.Linear(in_features, out_features, dtype=dtype)


def _project(
    layer: nn.Module, x: Activation, residual: Residual | None, moments: torch.Tensor | None = None
) -> torch.Tensor:
    """layer(x), or the residual stream plus layer(x) * gate (an Int8Linear adds it as it writes, and
    writes the sum's rows' ``moments`` if given)."""
    if residual is None:
        return layer(x)
    return layer(x, residual) if moments is None else layer(x, residual, row_moments=moments)


def _moments_of(stream: torch.Tensor) -> torch.Tensor | None:
    """A buffer for the per-128-column row moments of a stream like ``stream`` (Int8Linear's
    ``row_moments``), or None where its width is not whole 128-column tiles."""
    *rows, dim = stream.shape
    if dim % QUANT_BLOCK:
        return None
    return stream.new_empty((math.prod(rows), dim // QUANT_BLOCK, 2), dtype=torch.float32)


class _Projections(nn.Module):
    """An attention layer's q, k, v and o linears and its q/k RMSNorms (checkpoint keys ``q``, ``k``,
    ``v``, ``o``, ``norm_q``, ``norm_k``)."""

    def __init__(self, config: DiTConfig, dtype: torch.dtype, quantized: bool) -> None:
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.q, self.k, self.v, self.o = (_block_linear(dim, dim, dtype, quantized) for _ in range(4))
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)
        # With int8 linears and 128-wide heads, 128 rows of a head are one of o's input scale tiles: an
        # attention kernel that can (SageSLA; cross-attention's own) writes o's int8 input itself.
        self.writes_int8 = quantized and dim == self.num_heads * QUANT_BLOCK


class SelfAttention(_Projections):
    def __init__(self, config: DiTConfig, dtype: torch.dtype, quantized: bool) -> None:
        super().__init__(config, dtype, quantized)
        self.attn_op = AttentionOp(config.head_dim, dtype)

    def forward(
        self,
        x: Activation,
        rope: tuple[torch.Tensor, torch.Tensor],
        residual: Residual | None = None,
        moments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q, k = self.q(x), self.k(x)
        # A backend that turns v into fp8 needs its per-channel ranges: an int8 v projection takes them
        # as it writes v, instead of the backend's pass over it.
        v_amax = None
        if isinstance(self.v, Int8Linear) and self.attn_op.local_attn.takes_v_amax:
            v_amax = torch.empty(q.shape[0], q.shape[-1], dtype=torch.float32, device=q.device)
        v = self.v(x) if v_amax is None else self.v(x, column_amax=v_amax)
        # qk-norm spans all heads, so it runs before the head split.
        if use_fused_kernels(q):
            from ..kernels.rope import rms_norm_rope

            q = rms_norm_rope(q, self.norm_q.weight, *rope, self.norm_q.eps)
            k = rms_norm_rope(k, self.norm_k.weight, *rope, self.norm_k.eps)
        else:
            q = apply_rope(self.norm_q(q).unflatten(-1, heads), *rope).flatten(2)
            k = apply_rope(self.norm_k(k).unflatten(-1, heads), *rope).flatten(2)
        int8_output = self.writes_int8 and use_fused_kernels(q)
        out = self.attn_op.local_attn(
            q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads), int8_output, v_amax
        )
        return _project(
            self.o, out if isinstance(out, QuantizedActivation) else out.flatten(2), residual, moments
        )


class CrossKeys(NamedTuple):
    """What a block's cross-attention reads of the prompt: the same at every step of a request."""

    k: torch.Tensor  # [B, keys, dim], RMS-normed as the attention reads it
    v: torch.Tensor  # [B, keys, dim]
    bias: torch.Tensor | None  # [1, 1, 1, keys] score bias of upstream's zero padding, None for all zero


class CrossAttention(_Projections):
    """Attention from the video tokens to all text rows (padding rows included: upstream uses no mask).

    The keys and values depend on the prompt alone (``keys``), so a request makes them once. Their
    ``bias`` is added to the scores: the stand-in keys of upstream's zero padding carry it
    (models/text_padding.py). Where it writes o's int8 input (``writes_int8``), the fused path's kernel
    (kernels/cross_attention.py) runs without cuDNN and folds q's RMSNorm into its scores, from the
    sums of squares the q projection wrote; its keys carry q's norm weight for that.
    """

    def keys(self, context: torch.Tensor, bias: torch.Tensor | None = None) -> CrossKeys:
        """The keys and values of ``context`` [B, keys, dim] (the embedded text) as ``forward`` reads them."""
        k = self.k(context)
        if not use_fused_kernels(k):
            return CrossKeys(self.norm_k(k), self.v(context), bias)
        from ..kernels.rope import rms_norm

        weight = self.norm_k.weight * self.norm_q.weight if self.writes_int8 else self.norm_k.weight
        return CrossKeys(rms_norm(k, weight, self.norm_k.eps), self.v(context), bias)

    def forward(
        self,
        x: Activation,
        keys: CrossKeys,
        residual: Residual | None = None,
        moments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.writes_int8 and use_fused_kernels(keys.k):
            return self._forward_int8(x, keys, residual, moments)
        q = self.q(x)
        if use_fused_kernels(q):
            from ..kernels.rope import rms_norm

            q = rms_norm(q, self.norm_q.weight, self.norm_q.eps)
        else:
            q = self.norm_q(q)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, keys.k, keys.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys.bias)
        return _project(self.o, out.transpose(1, 2).flatten(2), residual, moments)

    def _forward_int8(
        self, x: Activation, keys: CrossKeys, residual: Residual | None, moments: torch.Tensor | None
    ) -> torch.Tensor:
        """The fused path when ``writes_int8``: the q projection also writes its rows' sums of squares,
        and one kernel attends with q's RMSNorm folded in and writes o's int8 input (no pass over q in
        between)."""
        from ..kernels.cross_attention import cross_attention_quantized

        rows = (x.values if isinstance(x, QuantizedActivation) else x).shape[:-1].numel()
        square_sums = torch.empty(rows, self.num_heads, dtype=torch.float32, device=keys.k.device)
        q = self.q(x, square_sums=square_sums)
        out = cross_attention_quantized(
            q, keys.k, keys.v, keys.bias, self.num_heads, q_square_sums=square_sums, eps=self.norm_q.eps
        )
        return _project(self.o, QuantizedActivation(*out), residual, moments)


class Block(nn.Module):
    def __init__(self, config: DiTConfig, dtype: torch.dtype, quantized: bool) -> None:
        super().__init__()
        dim = config.dim
        # Rows: shift, scale, gate of self-attention, then shift, scale, gate of the FFN.
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim, dtype=dtype))
        self.norm1 = LayerNorm(dim, config.eps)
        self.self_attn = SelfAttention(config, dtype, quantized)
        self.norm3 = LayerNorm(dim, config.eps, affine=True)
        self.cross_attn = CrossAttention(config, dtype, quantized)
        self.norm2 = LayerNorm(dim, config.eps)
        self.ffn = nn.Sequential(
            _block_linear(dim, config.ffn_dim, dtype, quantized),
            nn.GELU(approximate="tanh"),
            _block_linear(config.ffn_dim, dim, dtype, quantized),
        )

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        keys: CrossKeys,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        return self.run(x, e0 + self.modulation, keys, rope, moments_out=False)[0]

    def run(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        keys: CrossKeys,
        rope: tuple[torch.Tensor, torch.Tensor],
        moments: torch.Tensor | None = None,
        moments_out: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` given e0 plus this block's modulation rows ([B, 6, dim] fp32; WanDiT.run_blocks
        adds every block's at once), passing the stream's row moments along: given x's (which the block
        before wrote with its last int8 GEMM), the first norm merges them instead of a statistics pass
        over x. Returns the output and, if ``moments_out`` (not for the last block, whose output the
        head normalizes itself), its moments (None where no int8 GEMM wrote them)."""
        modulation = modulation.chunk(6, dim=1)
        if use_fused_kernels(x):
            return self._forward_fused(x, modulation, keys, rope, moments, moments_out)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation
        dtype = x.dtype
        h = (self.norm1(x).float() * (1 + scale1) + shift1).to(dtype)
        # Gated residuals round the product and then the sum to the stream dtype, as upstream does.
        x = x + self.self_attn(h, rope) * gate1.to(dtype)
        x = x + self.cross_attn(self.norm3(x), keys)
        h = (self.norm2(x).float() * (1 + scale2) + shift2).to(dtype)
        return x + self.ffn(h) * gate2.to(dtype), None

    def _forward_fused(
        self,
        x: torch.Tensor,
        modulation: tuple[torch.Tensor, ...],
        keys: CrossKeys,
        rope: tuple[torch.Tensor, torch.Tensor],
        moments: torch.Tensor | None,
        moments_out: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``run`` through turbovideo.kernels, with each residual add fused into a neighbour: the int8
        GEMMs add theirs as they write the output (and take the new stream's row moments for the norm
        after them), a bf16 block's norms before they normalize."""
        from ..kernels import norms

        shift1, scale1, gate1, shift2, scale2, gate2 = modulation
        eps = self.norm1.eps
        if not isinstance(self.ffn[0], Int8Linear):
            h = norms.layer_norm_modulate(x, shift1, scale1, eps)
            y = self.self_attn(h, rope)
            x, h = norms.residual_layer_norm_affine(x, y, gate1, self.norm3.weight, self.norm3.bias, eps)
            y = self.cross_attn(h, keys)
            x, h = norms.residual_layer_norm_modulate(x, y, None, shift2, scale2, eps)
            return norms.gated_residual(x, self.ffn[2](linear_gelu(h, self.ffn[0])), gate2), None
        # Each norm emits its output as the int8 input of the linears after it (no separate quantize
        # pass), and ffn.0 its GELU as that of ffn.2.
        h = QuantizedActivation(*norms.layer_norm_modulate(x, shift1, scale1, eps, True, moments))
        moments = _moments_of(x)
        x = self.self_attn(h, rope, residual=(x, gate1), moments=moments)
        h = QuantizedActivation(
            *norms.layer_norm_affine(x, self.norm3.weight, self.norm3.bias, eps, True, moments)
        )
        moments = _moments_of(x)
        x = self.cross_attn(h, keys, residual=(x, None), moments=moments)
        h = QuantizedActivation(*norms.layer_norm_modulate(x, shift2, scale2, eps, True, moments))
        moments = _moments_of(x) if moments_out else None
        return self.ffn[2](self.ffn[0](h, gelu_int8=True), residual=(x, gate2), row_moments=moments), moments


class Head(nn.Module):
    def __init__(self, config: DiTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = LayerNorm(config.dim, config.eps)
        self.head = nn.Linear(config.dim, config.out_dim * config.patch_volume, dtype=dtype)
        self.modulation = nn.Parameter(torch.zeros(1, 2, config.dim, dtype=dtype))  # shift, scale

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e[:, None, :]).chunk(2, dim=1)
        if use_fused_kernels(x):
            from ..kernels.head import head_projection

            return head_projection(x, shift, scale, self.head.weight, self.head.bias, self.norm.eps)
        return linear_fp32(self.norm(x).float() * (1 + scale) + shift, self.head)


class TextKeys(NamedTuple):
    """Every block's ``CrossKeys`` of one prompt, stacked ([layers, B, keys, dim] k and v) so that a CUDA
    graph takes them as two inputs: ``WanDiT.text_keys`` makes them once a request, every step reads them."""

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None

    def of_block(self, index: int) -> CrossKeys:
        return CrossKeys(self.k[index], self.v[index], self.bias)


@dataclass(frozen=True)
class DiTInputs:
    """Per-forward inputs of the blocks and the head (``WanDiT.embed``)."""

    e: torch.Tensor  # [B, dim] fp32 time embedding; modulates the head
    e0: torch.Tensor  # [B, 6, dim] fp32; modulates every block
    text: TextKeys
    # cos, sin of the RoPE angles: [L, head_dim / 2] fp32 each, a row per token
    rope: tuple[torch.Tensor, torch.Tensor]
    grid: tuple[int, int, int]  # the (t, h, w) token grid


class WanDiT(nn.Module):
    """``model(x, t, context, y=None)`` -> fp32 velocity [B, 16, T, H, W]; state_dict in upstream's key names.

    ``context`` [B, rows, text_dim]: umT5 rows, which upstream pads with zero rows to ``text_len``
    (512). Fewer rows stand for that padding, attended to as a few biased keys instead of materialized
    (models/text_padding.py): pass a prompt's rows only (``text_encoder.prompt_rows``) to save the work.
    Or ``context`` is their ``text_keys``, which depend on the prompt alone: a request makes them once
    for all its steps (upstream projects the text again in every block of every step).
    """

    def __init__(
        self, config: DiTConfig, dtype: torch.dtype = torch.bfloat16, quantized: bool = False
    ) -> None:
        super().__init__()
        self.config = config
        self.quantized = quantized
        dim = config.dim
        self.patch_embedding = nn.Linear(config.in_dim * config.patch_volume, dim, dtype=dtype)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim, dtype=dtype),
            nn.GELU(approximate="tanh"),
            nn.Linear(dim, dim, dtype=dtype),
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(config.freq_dim, dim, dtype=dtype), nn.SiLU(), nn.Linear(dim, dim, dtype=dtype)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, dtype=dtype))
        self.blocks = nn.ModuleList(Block(config, dtype, quantized) for _ in range(config.num_layers))
        self.head = Head(config, dtype)
        self._sla_topk = DEFAULT_SLA_TOPK

    @property
    def attention_backend(self) -> str:
        return self.self_attentions()[0].backend.name

    @property
    def sla_topk(self) -> float:
        return self._sla_topk

    def set_attention(self, name: str = "auto", topk: float | None = None) -> None:
        """Select the self-attention backend for the device the weights are on (call again after moving)."""
        backend = select_attention(name, self.patch_embedding.weight.device, self.config.head_dim)
        if topk is not None:
            if not 0.0 < topk <= 1.0:
                raise ValueError(f"sla_topk must be in (0, 1], got {topk}")
            self._sla_topk = topk
        for local in self.self_attentions():
            if local.backend != backend or local.topk != self._sla_topk:  # each assignment costs the host
                local.backend = backend
                local.topk = self._sla_topk

    def self_attentions(self) -> list[nn.Module]:
        """Every block's self-attention (``LocalAttention``), whose ``backend`` runs the attention math."""
        return [block.self_attn.attn_op.local_attn for block in self.blocks]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | TextKeys,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens, inputs = self.embed(x, t, context, y)
        tokens = self.run_blocks(tokens, inputs)
        return unpatchify(self.head(tokens, inputs.e), inputs.grid, self.config.patch_size)

    # The forward's stages, also called one by one by the sequence-parallel forward
    # (turbovideo.parallel), which runs the blocks and the head on a slice of the tokens.

    def embed(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | TextKeys,
        y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DiTInputs]:
        """The patch tokens [B, L, dim] and what the blocks and the head need besides them."""
        config = self.config
        x = self._with_condition(x, y)
        dtype = self.patch_embedding.weight.dtype
        batch, _, frames, height, width = x.shape
        pt, ph, pw = config.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(
                f"latent {frames}x{height}x{width} is not divisible by the patch {config.patch_size}"
            )
        grid = (frames // pt, height // ph, width // pw)

        tokens = self.patch_embedding(patchify(x.to(dtype), config.patch_size))
        # t is used as given (the sampler rounds it to bf16 like upstream); [B] and [B, 1] both work.
        sinusoid = timestep_embedding(t.reshape(batch, -1)[:, 0], config.freq_dim)
        e = linear_fp32(F.silu(linear_fp32(sinusoid, self.time_embedding[0])), self.time_embedding[2])
        e0 = linear_fp32(F.silu(e), self.time_projection[1]).unflatten(1, (6, config.dim))
        angles = rope_angles(grid, config.head_dim, x.device)
        rope = (angles.cos(), angles.sin())  # once per forward, not in every block
        text = context if isinstance(context, TextKeys) else self.text_keys(context)
        return tokens, DiTInputs(e, e0, text, rope, grid)

    def text_keys(self, context: torch.Tensor) -> TextKeys:
        """Every block's cross-attention keys and values of ``context`` [B, rows, text_dim] (umT5 rows)."""
        text, bias = self._text_context(context.to(self.patch_embedding.weight.dtype))
        keys = [block.cross_attn.keys(text, bias) for block in self.blocks]
        return TextKeys(torch.stack([k.k for k in keys]), torch.stack([k.v for k in keys]), bias)

    def _text_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedded text with upstream's zero padding (as a few biased keys where that is cheaper)."""
        rows = context.shape[1]
        biases = padding_keys(rows, self.config.text_len, context.dtype)
        if biases is None:
            zero_rows, bias = max(0, self.config.text_len - rows), None
        else:
            zero_rows = sum(copies for _, copies in biases)
            bias = attention_bias(rows, biases, context.dtype, context.device)
        if zero_rows:
            context = F.pad(context, (0, 0, 0, zero_rows))
        return self.text_embedding(context), bias

    def run_blocks(self, tokens: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        # Every block's modulation rows plus e0 in two launches instead of one a block (bf16 + fp32
        # promotes to fp32 exactly: the same sum as converting first).
        modulations = torch.stack([block.modulation for block in self.blocks]) + inputs.e0
        moments = None  # of the stream's rows, from the block before (Block.run)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            tokens, moments = block.run(
                tokens,
                modulations[index],
                inputs.text.of_block(index),
                inputs.rope,
                moments,
                index < last,
            )
        return tokens

    def _with_condition(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        config = self.config
        if config.task == "i2v":
            if y is None:
                raise ValueError(
                    f"{config.name} is image-to-video and needs y, the [B, {config.cond_dim}, T, H, W] image condition"
                )
            return torch.cat([x, y.to(x.dtype)], dim=1)
        if y is not None:
            raise ValueError(f"{config.name} is text-to-video and takes no image condition y")
        return x


def build_dit(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quantized: bool = False,
    attention: str = "auto",
    seed: int | None = None,
) -> WanDiT:
    """The named config with seeded random weights (on ``meta`` nothing is allocated)."""
    config = _config(name)
    with torch.device("meta"):
        model = WanDiT(config, dtype, quantized)
    materialize(model, device, zlib.crc32(name.encode()) if seed is None else seed)
    return _ready(model, attention)


def load_dit(
    path: str | Path,
    name: str | None = None,
    attention: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quantized: bool | None = None,
) -> WanDiT:
    """Load a published DiT file (``.pth``/``.safetensors``, plain or ``-quant``) into an eval-mode model.

    Without ``name`` the architecture is inferred from the keys; without ``quantized`` so is the layout.
    """
    path = Path(path)
    state = linear_patch_embedding(read_state_dict(path))
    if name is not None:
        config = _config(name)
    else:
        config = identify(state)
        if config is None:
            raise CheckpointError(
                f"{path.name} is not a known Wan DiT checkpoint: it looks like {describe_dit_state(state)}"
            )
    quantized = is_quantized(state) if quantized is None else quantized
    with torch.device("meta"):
        model = WanDiT(config, dtype, quantized)
    load_into(
        model, state, source=path.name, expected=variant_label(config, quantized), describe=describe_dit_state
    )
    return _ready(model.to(device), attention)


def _config(name: str) -> DiTConfig:
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; known: {', '.join(DIT_CONFIGS)}")
    return DIT_CONFIGS[name]


def _ready(model: WanDiT, attention: str) -> WanDiT:
    model.eval().requires_grad_(False)
    model.set_attention(attention)
    if not model.patch_embedding.weight.is_meta:  # a meta-device model only plans memory: not what serves
        quant = " (int8 W8A8)" if model.quantized else ""
        logger.info(
            "DiT %s%s: attention %s, topk %.2f",
            model.config.name,
            quant,
            model.attention_backend,
            model.sla_topk,
        )
    return model
