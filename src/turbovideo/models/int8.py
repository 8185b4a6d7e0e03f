"""W8A8 linear layers with 128x128 block scales (spec §5) and their exact PyTorch reference.

``quantize_blockwise`` and ``int8_gemm_reference`` are the ground truth the CUDA/Triton kernels are
tested against. ``Int8Linear`` calls whatever ``set_int8_impl`` installed; by default the Triton
kernels (turbovideo.kernels.int8_gemm) for bf16 on CUDA and the reference everywhere else. It also
takes a ``QuantizedActivation``, the int8 output of a norm kernel that quantized what it produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 128


class QuantizedActivation(NamedTuple):
    """A bf16 activation already quantized per 128x128 tile: int8 ``values`` [..., K], fp32 ``scales``."""

    values: torch.Tensor
    scales: torch.Tensor


Activation = torch.Tensor | QuantizedActivation
# (stream, gate): a linear given one returns stream + output * gate (gate fp32 [B, 1, N] or None for 1),
# rounded as the DiT's gated residual adds are: bf16(stream + bf16(output * bf16(gate))).
Residual = tuple[torch.Tensor, torch.Tensor | None]
Int8Impl = Callable[..., torch.Tensor]


def quantize_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D [M, K] tensor per 128x128 tile -> (int8 [M, K], fp32 scale [ceil(M/128), ceil(K/128)]).

    amax = max(1e-8, max |x| of the tile in fp32), q = clamp(round_half_even(x * (128/amax)), -128, 127),
    scale = amax/128: +amax saturates to 127. Tiles outside the matrix count as zeros.
    """
    m, k = x.shape
    mt, kt = math.ceil(m / BLOCK), math.ceil(k / BLOCK)
    tiles = F.pad(x.float(), (0, kt * BLOCK - k, 0, mt * BLOCK - m)).view(mt, BLOCK, kt, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-8)
    multiplier = 128.0 / amax
    q = torch.round(tiles * multiplier[:, None, :, None]).clamp(-128, 127).to(torch.int8)
    return q.view(mt * BLOCK, kt * BLOCK)[:m, :k].contiguous(), amax / 128.0


def int8_gemm_reference(
    qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor
) -> torch.Tensor:
    """fp32 [M, N] = sum over 128-wide K blocks, in order, of float(P_kb) * (sx * sw).

    P_kb (exact int32 in the kernel) is computed in float64, where sums of int8 products are exact.
    Each step acc = fp32(acc + P_kb * s) is a fused multiply-add into the fp32 accumulator.
    """
    m, k = qx.shape
    n = qw.shape[0]
    x_rows = sx.repeat_interleave(BLOCK, dim=0)[:m]  # [M, nkb]: scale of row m in K block kb
    w_rows = sw.repeat_interleave(BLOCK, dim=0)[:n]
    acc = torch.zeros(m, n, dtype=torch.float32, device=qx.device)
    for kb in range(math.ceil(k / BLOCK)):
        cols = slice(kb * BLOCK, (kb + 1) * BLOCK)
        partial = qx[:, cols].double() @ qw[:, cols].double().T
        scale = x_rows[:, kb, None] * w_rows[None, :, kb]  # fp32 product first, as the kernel does
        acc = (acc.double() + partial * scale.double()).float()
    return acc


def chunk_square_sums(y: torch.Tensor) -> torch.Tensor:
    """fp32 [M, ceil(N/128)]: each row's sum of squares of its fp32 values, per 128-column chunk of y [M, N].

    What an RMSNorm over the whole row needs, summed chunk by chunk (``Int8Linear(square_sums=)``).
    """
    m, n = y.shape
    chunks = F.pad(y.float(), (0, math.ceil(n / BLOCK) * BLOCK - n)).view(m, -1, BLOCK)
    return (chunks * chunks).sum(dim=-1)


def chunk_moments(y: torch.Tensor) -> torch.Tensor:
    """fp32 [M, N/128, 2]: each row's mean and sum of squared deviations from it, per 128-column chunk of
    y [M, N] (N a multiple of 128), in fp32.

    What a LayerNorm over the whole row needs, chunk by chunk (``Int8Linear(row_moments=)``);
    ``kernels.norms`` merges them into the row's statistics.
    """
    m, n = y.shape
    if n % BLOCK:
        raise ValueError(f"row moments are per {BLOCK}-column chunk: {n} columns are not a multiple")
    chunks = y.float().view(m, n // BLOCK, BLOCK)
    mean = chunks.sum(dim=-1) * (1.0 / BLOCK)
    return torch.stack([mean, (chunks - mean[..., None]).square().sum(dim=-1)], dim=-1)


def int8_linear_reference(
    x: Activation,
    int8_weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    residual: Residual | None = None,
    square_sums: torch.Tensor | None = None,
    gelu_int8: bool = False,
    row_moments: torch.Tensor | None = None,
    column_amax: torch.Tensor | None = None,
) -> Activation:
    """Quantize the activation x [M, K], run the block GEMM, round to x's dtype, then add the bias in it
    (and then the gated output to the residual stream, in the stream's shape).

    A ``QuantizedActivation`` stands for a bf16 one and skips the quantization. ``square_sums``, if
    given, receives ``chunk_square_sums`` of the output (without a residual); ``row_moments``
    ``chunk_moments`` of what it returns (after the residual); ``column_amax`` (fp32 [B, N], the M rows
    being B samples' rows one after another) ``sample_column_amax`` of the output (nothing else given).
    ``gelu_int8`` returns the output's tanh GELU quantized per tile, as the next linear takes it (the
    FFN's first linear).
    """
    if gelu_int8 and (residual is not None or square_sums is not None or row_moments is not None):
        raise ValueError("gelu_int8 returns the GELU's int8 tiles: not with a residual or row statistics")
    others = (residual, square_sums, row_moments)
    if column_amax is not None and (gelu_int8 or any(option is not None for option in others)):
        raise ValueError("column_amax is of a linear's own bf16 output: not with other options")
    if isinstance(x, QuantizedActivation):
        (qx, sx), dtype = x, torch.bfloat16
    else:
        (qx, sx), dtype = quantize_blockwise(x), x.dtype
    y = int8_gemm_reference(qx, sx, int8_weight, scale).to(dtype)
    y = y if bias is None else y + bias.to(dtype)
    if gelu_int8:
        return QuantizedActivation(*quantize_blockwise(F.gelu(y, approximate="tanh")))
    if column_amax is not None:
        column_amax.copy_(sample_column_amax(y, column_amax.shape[0]))
    if square_sums is not None:
        if residual is not None or row_moments is not None:
            raise ValueError("square_sums are of a linear's own output: not with a residual or row moments")
        square_sums.copy_(chunk_square_sums(y))
    if residual is not None:
        stream, gate = residual
        y = y.view(stream.shape)
        y = stream + (y if gate is None else y * gate.to(dtype))
    if row_moments is not None:
        row_moments.copy_(chunk_moments(y.reshape(-1, y.shape[-1])))
    return y


def int8_linear_default(
    x: Activation,
    int8_weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    residual: Residual | None = None,
    square_sums: torch.Tensor | None = None,
    gelu_int8: bool = False,
    row_moments: torch.Tensor | None = None,
    column_amax: torch.Tensor | None = None,
) -> Activation:
    """The Triton W8A8 kernels for bf16 activations on CUDA, the reference for everything else."""
    values = x.values if isinstance(x, QuantizedActivation) else x
    options = (residual, square_sums, gelu_int8, row_moments, column_amax)
    if values.is_cuda and values.dtype in (torch.bfloat16, torch.int8):
        from ..kernels.int8_gemm import int8_linear  # imports Triton only where it runs

        out = int8_linear(x, int8_weight, scale, bias, *options)
        return QuantizedActivation(*out) if gelu_int8 else out
    return int8_linear_reference(x, int8_weight, scale, bias, *options)


_impl: Int8Impl = int8_linear_default


def sample_column_amax(y: torch.Tensor, samples: int) -> torch.Tensor:
    """fp32 [samples, N]: each sample's largest |value| in each column of y [samples * rows, N].

    Per-channel ranges over a sample's tokens, as an fp8 V's scales need (SageSLA's,
    ``Int8Linear(column_amax=)``).
    """
    return y.float().abs().view(samples, -1, y.shape[-1]).amax(dim=1)


def set_int8_impl(impl: Int8Impl | None) -> None:
    """Install another ``(x2d, int8_weight, scale, bias) -> y2d``; None restores the default. Layers
    given a residual, square sums, row moments, column amax or ``gelu_int8`` call it with ``residual=``,
    ``square_sums=``, ``row_moments=``, ``column_amax=`` or ``gelu_int8=True`` as well (see
    ``int8_linear_reference``)."""
    global _impl
    _impl = impl or int8_linear_default


class Int8Linear(nn.Module):
    """A Linear whose weight is stored int8 with one fp32 scale per 128x128 tile (upstream's buffer names)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        scale_shape = (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))
        self.register_buffer(
            "int8_weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        bias_dtype = linear.weight.dtype if linear.bias is None else linear.bias.dtype
        module = cls(linear.in_features, linear.out_features, bias_dtype, linear.weight.device)
        module.int8_weight, module.scale = quantize_blockwise(linear.weight.detach())
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def forward(
        self,
        x: Activation,
        residual: Residual | None = None,
        square_sums: torch.Tensor | None = None,
        gelu_int8: bool = False,
        row_moments: torch.Tensor | None = None,
        column_amax: torch.Tensor | None = None,
    ) -> Activation:
        """The linear of x [..., K]; given a residual (stream [..., N], gate), stream + output * gate.

        ``square_sums`` (fp32 [rows, ceil(N/128)]), if given, receives ``chunk_square_sums`` of the
        output: the statistics of an RMSNorm after the linear, taken as the output is written.
        ``row_moments`` (fp32 [rows, N/128, 2]) receives ``chunk_moments`` of what the layer returns
        (after the residual): those of a LayerNorm after it (``kernels.norms``' ``moments=``).
        ``gelu_int8``: the output's tanh GELU as the next int8 linear's ``QuantizedActivation``.
        ``column_amax`` (fp32 [B, N] for x [B, L, K]) receives each sample's largest |output| of each
        column (``sample_column_amax``): the per-channel ranges of an fp8 V, taken as it is written.
        """
        if isinstance(x, QuantizedActivation):
            rows = x.values.shape[:-1]
            flat = QuantizedActivation(x.values.reshape(-1, self.in_features), x.scales)
        else:
            rows, flat = x.shape[:-1], x.reshape(-1, self.in_features)
        # Only what is given: an installed implementation need not know the other options.
        options = {
            "residual": residual,
            "square_sums": square_sums,
            "gelu_int8": gelu_int8 or None,
            "row_moments": row_moments,
            "column_amax": column_amax,
        }
        given = {name: value for name, value in options.items() if value is not None}
        out = _impl(flat, self.int8_weight, self.scale, self.bias, **given)
        if gelu_int8:
            values, scales = out
            return QuantizedActivation(values.reshape(*rows, self.out_features), scales)
        return out.reshape(*rows, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight the int8 values stand for (int8 * tile scale)."""
        scale = self.scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        return self.int8_weight.float() * scale[: self.out_features, : self.in_features]

    def _randomize_(self, generator: torch.Generator) -> None:
        """Seeded random init (random_init.materialize): quantize an N/sqrt(fan_in) float weight."""
        weight = torch.randn(
            self.out_features, self.in_features, generator=generator, device=self.int8_weight.device
        )
        self.int8_weight, self.scale = quantize_blockwise(weight / math.sqrt(self.in_features))
        noise = torch.randn(self.out_features, generator=generator, device=self.bias.device)
        self.bias = (0.1 * noise).to(self.bias.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8"
