"""SageSLA on a GPU with SpargeAttn installed (the image); skipped elsewhere."""

import pytest
import torch
from turbovideo.kernels import sagesla, sla
from turbovideo.kernels.cuda_graph import SegmentedGraph
from turbovideo.kernels.quant import quantize_blockwise
from turbovideo.kernels.sla_backends import SageSLA

from turbovideo.models import DIT_CONFIGS, DiTConfig, build_dit
from turbovideo.models.int8 import sample_column_amax

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and sagesla.is_available(torch.device("cuda"))),
    reason="needs a CUDA GPU with SpargeAttn (spas_sage_attn) installed",
)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, 1000, 2, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    proj = torch.nn.Linear(128, 128, device="cuda", dtype=torch.bfloat16)
    return q, k, v, proj.weight.detach(), proj.bias.detach()


def test_sagesla_runs_on_the_default_stream():
    out = sagesla.sagesla_attention(*_inputs(), topk=0.5)
    assert out.shape == (1, 1000, 2, 128) and torch.isfinite(out).all()


def test_sagesla_refuses_other_streams_instead_of_racing_them():
    inputs = _inputs()
    with (
        torch.cuda.stream(torch.cuda.Stream()),
        pytest.raises(RuntimeError, match="default CUDA stream only"),
    ):
        sagesla.sagesla_attention(*inputs, topk=0.5)


def test_a_segmented_graph_replays_sagesla_with_spargeattn_between_its_graphs():
    inputs = _inputs()
    static = [x.clone() for x in inputs[:3]]
    sagesla.sagesla_attention(*inputs, topk=0.5)  # compiled and tuned before the capture, as it must be
    graph = SegmentedGraph(torch.cuda.graph_pool_handle())
    out = graph.capture(lambda: sagesla.sagesla_attention(*static, *inputs[3:], topk=0.5))
    assert graph.segments == 2
    for seed in (1, 2):
        fresh = _inputs(seed)
        for buffer, value in zip(static, fresh[:3], strict=True):
            buffer.copy_(value)
        graph.replay()
        expected = sagesla.sagesla_attention(*fresh[:3], *inputs[3:], topk=0.5)
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_a_graph_of_consecutive_sagesla_layers_replays_them_bit_for_bit():
    # SpargeAttn's launches between the graphs read memory the pool may hand on once they are recorded:
    # the second layer's must not overwrite what the first one's still reads.
    q, k, v, weight, bias = _inputs()

    def two_layers(q, k, v):
        first = sagesla.sagesla_attention(q, k, v, weight, bias, topk=0.5)
        return sagesla.sagesla_attention(first, k, first, weight, bias, topk=0.5)

    static = [x.clone() for x in (q, k, v)]
    two_layers(*static)
    graph = SegmentedGraph(torch.cuda.graph_pool_handle())
    out = graph.capture(lambda: two_layers(*static))
    assert graph.segments == 3
    for seed in (1, 2):
        fresh = _inputs(seed)[:3]
        for buffer, value in zip(static, fresh, strict=True):
            buffer.copy_(value)
        graph.replay()
        assert torch.equal(out, two_layers(*fresh))


def test_the_fused_query_block_means_are_the_selection_pass_means():
    # The quantizer's means replace sla.block_means in the selection. Compiled into another kernel, the
    # same sum may run in another order (an H200 showed it), so they agree to fp32 rounding, not bits.
    q = _inputs()[0]
    means = torch.empty(1, 2, 16, 128, device="cuda")
    sagesla.quantize_blocks(q, 64, block_means=means)
    torch.testing.assert_close(means, sla.block_means(q, 64), rtol=0, atol=1e-6)


def test_sagesla_matches_the_triton_sla_of_its_blocks():
    # Same selection blocks and linear branch; only the sparse branch's 8-bit formats differ.
    q, k, v, weight, bias = _inputs()
    out = sagesla.sagesla_attention(q, k, v, weight, bias, topk=0.5)
    blocks = sagesla.selection_blocks(sagesla.cuda_arch(q.device))
    expected = sla.sla_attention(q, k, v, weight, bias, 0.5, *blocks)
    assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() < 6e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sagesla_takes_other_input_dtypes(dtype):
    # Its selection and linear branch run in the input's dtype: fp32 tiles must fit shared memory too.
    q, k, v, weight, bias = (x.to(dtype) for x in _inputs())
    out = sagesla.sagesla_attention(q, k, v, weight, bias, topk=0.5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = sla.sla_attention(
        q, k, v, weight, bias, 0.5, *sagesla.selection_blocks(sagesla.cuda_arch(q.device))
    )
    assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() < 6e-2


def test_the_int8_output_is_the_bf16_output_quantized():
    # What the int8 o projection reads: one pass instead of the bf16 output and a quantize pass. Two
    # samples of 1000 rows: the 128-row tiles of the [2000, 256] view straddle them.
    q, k, v, weight, bias = _inputs()
    q, k, v = (torch.cat([x, x.flip(1)]) for x in (q, k, v))
    values, scales = sagesla.sagesla_attention(q, k, v, weight, bias, topk=0.5, quantized=True)
    expected = quantize_blockwise(sagesla.sagesla_attention(q, k, v, weight, bias, topk=0.5).flatten(2))
    assert values.shape == (2, 1000, 256) and scales.shape == (16, 2)
    assert torch.equal(values, expected[0]) and torch.equal(scales, expected[1])


def test_the_v_amax_a_caller_gives_changes_no_bit():
    # Two samples of 1000 rows, one ten times the other's range.
    q, k, v, weight, bias = _inputs()
    q, k, v = (torch.cat([x, 10 * x.flip(1)]) for x in (q, k, v))
    amax = sample_column_amax(v.reshape(2000, 256), 2)
    for quantized in (False, True):
        given = sagesla.sagesla_attention(q, k, v, weight, bias, topk=0.5, quantized=quantized, v_amax=amax)
        own = sagesla.sagesla_attention(q, k, v, weight, bias, topk=0.5, quantized=quantized)
        for a, b in zip(given if quantized else [given], own if quantized else [own], strict=True):
            assert torch.equal(a, b)


def test_an_int8_dit_gives_sagesla_the_v_amax_its_v_projection_wrote(monkeypatch):
    # 128-wide heads, two samples of 864 tokens (128-row tiles straddle them): the v projection writes
    # V's per-channel amax, SageSLA's fp8 preparation skips its pass, and the forward keeps its bits.
    config = DiTConfig("v-amax-t2v", "v-amax T2V", "t2v", 256, 512, 2, 2, 16, text_dim=32)
    monkeypatch.setitem(DIT_CONFIGS, config.name, config)
    model = build_dit(config.name, device="cuda", quantized=True, attention="sagesla")
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, 16, 3, 32, 36, device="cuda", generator=g).bfloat16()
    t = torch.tensor([988.0, 500.0], device="cuda", dtype=torch.bfloat16)
    context = torch.randn(2, 40, 32, device="cuda", generator=g).bfloat16()
    given = []
    real = sagesla.prepare_v_fp8

    def spy(v, amax=None):
        given.append(amax is not None)
        return real(v, amax)

    monkeypatch.setattr(sagesla, "prepare_v_fp8", spy)
    with torch.no_grad():
        keys = model.text_keys(context)
        out = model(x, t, keys)
        assert given == [True, True]
        monkeypatch.setattr(SageSLA, "takes_v_amax", property(lambda self: False))
        expected = model(x, t, keys)
    assert given == [True, True, False, False]
    assert torch.equal(out, expected)
