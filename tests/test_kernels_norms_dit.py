"""The DiT block routed through the fused kernels equals its PyTorch reference path (tiny model, CPU).

``use_fused_kernels`` is patched to pick the path: off with the PyTorch int8 reference for the expected
output, on with the Triton GEMM for the fused one. Without a GPU the kernels run in Triton's
interpreter (conftest.py).
"""

import pytest
import torch
from turbovideo.kernels import cross_attention, head, norms, quant, rope, sla
from turbovideo.kernels.int8_gemm import int8_linear
from turbovideo.kernels.rounding import INTERPRETED

from turbovideo.models import DIT_CONFIGS, build_dit
from turbovideo.models import dit as dit_module
from turbovideo.models import int8 as int8_module
from turbovideo.models.dit_configs import DiTConfig

DEVICE = "cpu" if INTERPRETED else "cuda"

FUSED_CALLS_PER_BLOCK = {
    "layer_norm_modulate": 1,
    "layer_norm_affine": 0,
    "residual_layer_norm_affine": 1,
    "residual_layer_norm_modulate": 1,
    "gated_residual": 1,
    "rms_norm_rope": 2,
    "rms_norm": 2,
    "gelu_tanh_quantize": 0,
    "cross_attention_quantized": 0,
}
# The int8 GEMMs of o and ffn.2 add the residuals, so the norms after them only normalize.
INT8_CALLS_PER_BLOCK = {
    **FUSED_CALLS_PER_BLOCK,
    "layer_norm_modulate": 2,
    "layer_norm_affine": 1,
    "residual_layer_norm_affine": 0,
    "residual_layer_norm_modulate": 0,
    "gated_residual": 0,
}
# With 128-wide heads, cross-attention writes the o projection's int8 input itself, normalizing q on
# the way (only k's RMSNorm runs by itself). Its width is whole 128-column tiles, so the int8 GEMMs
# that add to the stream write its row moments, and every norm but the first block's first merges them.
WIDE_HEAD = DiTConfig("wide-head-t2v", "wide-head T2V", "t2v", 256, 256, 2, 2, 16, text_dim=32)
WIDE_HEAD_INT8_CALLS_PER_BLOCK = {**INT8_CALLS_PER_BLOCK, "cross_attention_quantized": 1, "rms_norm": 1}


def _tiny_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 16, 2, 4, 6, generator=g)  # 12 tokens per sample
    t = torch.tensor([250.5, 937.25][:batch])
    context = torch.randn(batch, 512, DIT_CONFIGS["tiny-t2v"].text_dim, generator=g)
    return x.to(DEVICE), t.to(DEVICE), context.to(DEVICE)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _spy_on_kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = dict.fromkeys(FUSED_CALLS_PER_BLOCK, 0)
    for name in calls:
        module = {"rms": rope, "gel": quant, "cro": cross_attention}.get(name[:3], norms)
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def _count_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[int]:
    """A one-element list that counts the calls of ``module.name`` from now on."""
    count, real = [0], getattr(module, name)

    def spy(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return count


@pytest.mark.parametrize(
    ("name", "quantized"),
    [("tiny-t2v", False), ("tiny-t2v", True), (WIDE_HEAD.name, True)],
    ids=["bf16", "int8", "int8-128-wide-heads"],
)
def test_fused_blocks_match_the_reference_forward(
    name: str, quantized: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(DIT_CONFIGS, WIDE_HEAD.name, WIDE_HEAD)
    model = build_dit(name, device=DEVICE, quantized=quantized, attention="dense")
    x, t, context = _tiny_inputs()
    try:
        with torch.no_grad():
            monkeypatch.setattr(dit_module, "use_fused_kernels", lambda x: False)
            int8_module.set_int8_impl(int8_module.int8_linear_reference)
            expected = model(x, t, context)

            calls = _spy_on_kernels(monkeypatch)
            merges = _count_calls(monkeypatch, norms, "_statistics_from_moments")
            heads = _count_calls(monkeypatch, head, "head_projection")
            monkeypatch.setattr(dit_module, "use_fused_kernels", lambda x: x.dtype == torch.bfloat16)
            moments_written = [0]

            def counting_int8_linear(*args, **kwargs):
                moments_written[0] += kwargs.get("row_moments") is not None
                return int8_linear(*args, **kwargs)

            int8_module.set_int8_impl(counting_int8_linear)
            out = model(x, t, context)
    finally:
        int8_module.set_int8_impl(None)
    layers = DIT_CONFIGS[name].num_layers
    per_block = INT8_CALLS_PER_BLOCK if quantized else FUSED_CALLS_PER_BLOCK
    if name == WIDE_HEAD.name:
        per_block = WIDE_HEAD_INT8_CALLS_PER_BLOCK
    assert calls == {name: count * layers for name, count in per_block.items()}
    assert heads == [1]
    assert merges == ([3 * layers - 1] if name == WIDE_HEAD.name else [0])
    # Every GEMM that writes moments has a norm after it: the last block's ffn.2 feeds the head.
    assert moments_written == merges
    # Only LayerNorm/RMSNorm statistics are summed in another order and the interpreter's tanh is a few
    # fp32 ulps off (rare one-rounding differences, which the int8 steps of two 128-wide blocks carry
    # to 7.4e-3, with or without the merged moments); a misplaced gate or modulation row gives ~0.3.
    assert _rel(out, expected) < 1e-2


class _SparseThenLinear:
    """SageSLA's structure (a sparse branch, then the linear branch added by a pass of its own, which can
    write o's int8 input) with the Triton sparse kernel where SageSLA runs SpargeAttn's."""

    name = "sparse-then-linear"
    block_q, block_k = 128, 64

    def __init__(self, writes_int8: bool) -> None:
        self.writes_int8 = writes_int8
        self.int8_outputs = 0

    def __call__(self, q, k, v, *, proj_l, topk, int8_output=False):
        state = sla.linear_state(k, v, self.block_k)
        index = sla.select_blocks(q, state, topk, self.block_q)
        o_s = sla.block_sparse_attention(q, k, v, index, self.block_q, self.block_k)
        self.int8_outputs += int8_output
        return sla.add_linear_branch(o_s, q, state, proj_l.weight, proj_l.bias, quantized=int8_output)


def test_attention_writing_the_int8_o_input_changes_no_output(monkeypatch: pytest.MonkeyPatch) -> None:
    # The o projection quantizes a bf16 input itself; given the int8 tiles instead, it must compute the
    # same. One sample: its rows' tiles are the kernel's (two or more take it, or a pass of its own).
    monkeypatch.setitem(DIT_CONFIGS, WIDE_HEAD.name, WIDE_HEAD)
    monkeypatch.setattr(dit_module, "use_fused_kernels", lambda x: x.dtype == torch.bfloat16)
    model = build_dit(WIDE_HEAD.name, device=DEVICE, quantized=True, attention="dense")
    x, t, context = _tiny_inputs(batch=1)
    outputs, backends = [], []
    for writes_int8 in (False, True):
        backend = _SparseThenLinear(writes_int8)
        for block in model.blocks:
            block.self_attn.attn_op.local_attn.backend = backend
        with torch.no_grad():
            outputs.append(model(x, t, context))
        backends.append(backend)
    assert [b.int8_outputs for b in backends] == [0, WIDE_HEAD.num_layers]
    assert torch.equal(outputs[0], outputs[1])
