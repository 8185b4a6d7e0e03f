"""Attention kernel benchmark on one GPU: our Triton SLA (and SageSLA if installed) vs dense cuDNN SDPA.

Usage (repository root, CUDA GPU): python scripts/bench_kernels.py --out bench_kernels.json

For each Wan self-attention shape (B=1, D=128, bf16) it checks correctness first, then times with CUDA
events (median of --iters after warm-up): dense cuDNN SDPA, the SLA module at topk 0.10 and 0.15, the
module's parts, a few launch configs of the Triton sparse kernel (on Hopper the module runs the
warp-specialized one, kernels/sla_ws.py, so these rows are its side-by-side baseline), and SageSLA
when ``spas_sage_attn`` imports. Rows from scripts/bench_kernels_linear.py (``run(device) ->
list[dict]``) are appended when that file exists. Prints a table and writes every row as JSON to --out.
"""

import argparse
import importlib.util
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from turbovideo.kernels import sagesla, sla

from turbovideo.benchmark import (
    BACK_TO_BACK_CALLS,
    at_least_one,
    back_to_back_ms,
    benchmark_device,
    median_ms,
    rel_error,
)
from turbovideo.models.attention import SAGESLA_NOT_INSTALLED

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"wan-1.3B-480p": (12, 32760), "wan-14B-720p": (40, 75600)}
TOPKS = (0.10, 0.15)
TARGET_MS = {"wan-1.3B-480p": 2.0, "wan-14B-720p": 25.0}  # SLA module at topk 0.10 (performance.md)
HEAD_DIM = 128


def check_sla_rows(sla, q, k, v, weight, bias, topk, blkq, blkk, out, samples: int = 48) -> dict:
    """fp32 torch recomputation of sampled query blocks of ``out`` (same selection), and the selection itself.

    Returns the relative L2 error of the sampled rows and the fraction of selected blocks that an fp32
    torch selection also picks (bf16 pooling may swap near-ties).
    """
    length, heads, dim = q.shape[1:]
    state = sla.linear_state(k, v, blkk)
    index = sla.select_blocks(q, state, topk, blkq)
    gen = torch.Generator().manual_seed(0)
    heads_picked = torch.randint(heads, (samples,), generator=gen).tolist()
    blocks_picked = torch.randint(index.shape[2], (samples,), generator=gen).tolist()
    picks = list(zip(heads_picked, blocks_picked, strict=True))
    errors, agree = [], []
    for h in sorted({h for h, _ in picks}):
        qh, kh, vh = (x[0, :, h].float() for x in (q, k, v))  # [L, D]
        phi_k = kh.softmax(-1)
        kv, ksum = phi_k.T @ vh, phi_k.sum(0)
        n_k = math.ceil(length / blkk)
        pad_k = F.pad(kh - kh.mean(0), (0, 0, 0, n_k * blkk - length)).view(n_k, blkk, dim).sum(1)
        counts_k = (length - torch.arange(n_k, device=q.device) * blkk).clamp(max=blkk)
        k_pool = pad_k / counts_k[:, None]
        for _, i in ((hh, ii) for hh, ii in picks if hh == h):
            rows = slice(i * blkq, min(length, (i + 1) * blkq))
            cols = torch.cat(
                [torch.arange(j * blkk, min(length, (j + 1) * blkk)) for j in index[0, h, i].tolist()]
            )
            cols = cols.to(q.device)
            p = ((qh[rows] @ kh[cols].T) * dim**-0.5).softmax(-1)
            phi_q = qh[rows].softmax(-1)
            o_l = (phi_q @ kv) / (1e-5 + phi_q @ ksum)[:, None]
            expected = p @ vh[cols] + o_l @ weight.float().T + bias.float()
            errors.append((out[0, rows, h].float() - expected).square().sum() / expected.square().sum())
            score = qh[rows].mean(0) @ k_pool.T
            fp32_pick = set(score.topk(index.shape[-1]).indices.tolist())
            agree.append(len(fp32_pick & set(index[0, h, i].tolist())) / index.shape[-1])
    return {
        "rel_l2_vs_fp32": math.sqrt(torch.stack(errors).mean().item()),
        "selection_agreement": sum(agree) / len(agree),
    }


class Rows(list):
    """Result rows of one shape; every row names the shape, the measurement and its time."""

    def __init__(self, label: str, heads: int, length: int) -> None:
        super().__init__()
        self.base = {"shape": label, "heads": heads, "length": length}

    def add(self, name: str, ms: float | None, **extra) -> None:
        self.append({**self.base, "name": name, "ms": None if ms is None else round(ms, 4), **extra})


def bench_shape(
    sla, sagesla, label: str, heads: int, length: int, iters: int, sweep: bool, device: torch.device
) -> list[dict]:
    qkv = torch.randn(1, length, 3, heads, HEAD_DIM, device=device, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)  # strided views, as the DiT's fused projection produces them
    weight = torch.randn(HEAD_DIM, HEAD_DIM, device=device) * 0.05
    bias = torch.randn(HEAD_DIM, device=device) * 0.05
    rows = Rows(label, heads, length)

    q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = F.scaled_dot_product_attention(q_t, k_t, v_t).transpose(1, 2)
        dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q_t, k_t, v_t), iters=iters, warmup=3)
    rows.add(
        "dense cuDNN SDPA", dense_ms, tflops=round(4 * length * length * HEAD_DIM * heads / dense_ms / 1e9, 1)
    )
    full = sla.sla_attention(q, k, v, torch.zeros_like(weight), torch.zeros_like(bias), 1.0)
    rows.add("check: SLA topk 1.0 with proj_l = 0 vs dense", None, rel_l2=round(rel_error(full, dense), 5))
    del full, dense

    for topk in TOPKS:
        bench_sla(sla, rows, q, k, v, weight, bias, topk, dense_ms, iters, sweep and topk == TOPKS[0])
        if sagesla.is_available(device):
            bench_sagesla(sla, sagesla, rows, q, k, v, weight, bias, topk, dense_ms, iters)
    torch.cuda.empty_cache()
    return rows


def bench_sla(
    sla, rows: Rows, q, k, v, weight, bias, topk: float, dense_ms: float, iters: int, sweep: bool
) -> None:
    """The SLA module (checked against fp32), its three parts, and optionally a sparse-kernel config sweep."""
    length, heads = q.shape[1], q.shape[2]
    blkq, blkk = sla.SLA_BLOCKS
    out = sla.sla_attention(q, k, v, weight, bias, topk)
    check = check_sla_rows(sla, q, k, v, weight, bias, topk, blkq, blkk, out)
    total = median_ms(lambda: sla.sla_attention(q, k, v, weight, bias, topk), iters=iters, warmup=3)
    rows.add(
        f"SLA module topk {topk:.2f}",
        total,
        target_ms=TARGET_MS[rows.base["shape"]] if topk == 0.10 else None,
        speedup_vs_dense=round(dense_ms / total, 2),
        **{key: round(value, 5) for key, value in check.items()},
    )
    rows.add(
        f"SLA module topk {topk:.2f}, {BACK_TO_BACK_CALLS} back-to-back calls, per call",
        back_to_back_ms(lambda: sla.sla_attention(q, k, v, weight, bias, topk), iters),
    )
    state = sla.linear_state(k, v, blkk)
    index = sla.select_blocks(q, state, topk, blkq)
    linear = (state, weight, bias)
    sparse_flops = 4 * length * index.shape[-1] * blkk * HEAD_DIM * heads
    rows.add(
        f"  part: linear state + k pooling, topk {topk:.2f}",
        median_ms(lambda: sla.linear_state(k, v, blkk), iters=iters, warmup=3),
    )
    rows.add(
        f"  part: selection (q pooling, score, top-k), topk {topk:.2f}",
        median_ms(lambda: sla.select_blocks(q, state, topk, blkq), iters=iters, warmup=3),
    )
    for name, lin in (("sparse + linear epilogue", linear), ("sparse only", None)):
        ms = median_ms(
            lambda lin=lin: sla.block_sparse_attention(q, k, v, index, blkq, blkk, lin), iters=iters, warmup=3
        )
        rows.add(f"  part: {name}, topk {topk:.2f}", ms, tflops=round(sparse_flops / ms / 1e9, 1))
    if not sweep:
        return
    for cfg in (
        sla.SparseConfig(128, 8, 2),
        sla.SparseConfig(128, 8, 3),
        sla.SparseConfig(64, 4, 2),
        sla.SparseConfig(64, 4, 3),
    ):
        if cfg.block_m > blkq:
            continue
        name = f"  sweep: Triton kernel, sparse + linear, {cfg}"
        try:
            ms = median_ms(
                lambda cfg=cfg: sla.block_sparse_attention(q, k, v, index, blkq, blkk, linear, cfg), iters
            )
            rows.add(name, ms, tflops=round(sparse_flops / ms / 1e9, 1))
        except (
            Exception
        ) as exc:  # a config this GPU cannot compile (e.g. out of shared memory) is a result too
            rows.add(name, None, error=str(exc).splitlines()[0][:120])


def bench_sagesla(
    sla, sagesla, rows: Rows, q, k, v, weight, bias, topk: float, dense_ms: float, iters: int
) -> None:
    """SageSLA checked against fp32 with its own selection blocks (8-bit formats: expect ~4e-2)."""
    blkq, blkk = sagesla.selection_blocks(sagesla.cuda_arch(q.device))
    out = sagesla.sagesla_attention(q, k, v, weight, bias, topk)
    check = check_sla_rows(sla, q, k, v, weight, bias, topk, blkq, blkk, out)
    ms = median_ms(lambda: sagesla.sagesla_attention(q, k, v, weight, bias, topk), iters=iters, warmup=3)
    rows.add(
        f"SageSLA module topk {topk:.2f}",
        ms,
        target_ms=TARGET_MS[rows.base["shape"]] if topk == 0.10 else None,
        speedup_vs_dense=round(dense_ms / ms, 2),
        **{key: round(value, 5) for key, value in check.items()},
    )
    rows.add(
        f"SageSLA module topk {topk:.2f}, {BACK_TO_BACK_CALLS} back-to-back calls, per call",
        back_to_back_ms(lambda: sagesla.sagesla_attention(q, k, v, weight, bias, topk), iters),
    )


def linear_rows(device: torch.device) -> list[dict]:
    path = ROOT / "scripts" / "bench_kernels_linear.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("bench_kernels_linear", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(device)


def print_table(rows: list[dict]) -> None:
    keys = ["shape", "name", "ms"] + sorted(
        {k for r in rows for k in r} - {"shape", "name", "ms", "heads", "length"}
    )
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "") if r.get(k) is not None else "").ljust(widths[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--iters", type=at_least_one, default=20)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-sweep", action="store_true", help="skip the sparse-kernel launch-config sweep")
    args = parser.parse_args()
    benchmark_device("bench_kernels.py", out=args.out)
    torch.manual_seed(0)
    device = torch.device("cuda")
    rows = []
    for label in args.shapes:
        heads, length = SHAPES[label]
        rows += bench_shape(sla, sagesla, label, heads, length, args.iters, not args.no_sweep, device)
    if not sagesla.is_available(device):
        why = (
            SAGESLA_NOT_INSTALLED
            if sagesla.sparge_modules() is None
            else f"{sagesla.cuda_arch(device)} unsupported"
        )
        rows.append({"shape": "-", "name": "SageSLA skipped", "ms": None, "why": why})
    rows += linear_rows(device)
    print_table(rows)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    meta["triton"] = importlib.import_module("triton").__version__
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
