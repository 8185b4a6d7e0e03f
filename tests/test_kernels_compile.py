"""The SLA, SageSLA-quantizer, int8, LayerNorm and RMSNorm + RoPE kernels compile for each GPU
generation (H100 sm_90, A100 sm_80, Ada sm_89) without spilling registers or overflowing shared memory,
and stream their operands in ahead of use; Hopper's warp-specialized int8 GEMM (Gluon) compiles for
sm_90 without spills and without ptxas serializing its warpgroup MMAs.

Triton's interpreter (the CPU tests) accepts code that the GPU compiler rejects, so this compiles the
production launch configurations ahead of time with Triton's bundled ptxas; no GPU is needed. Triton
must not be in interpreter mode for that, hence the subprocess.
"""

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

H100_MAX_SHARED = 227 * 1024
A100_MAX_SHARED = 163 * 1024
ADA_MAX_SHARED = 99 * 1024
MAX_SHARED = {90: H100_MAX_SHARED, 80: A100_MAX_SHARED, 89: ADA_MAX_SHARED}


def _compile(
    kernel,
    pointer_types: dict,
    constexprs: dict,
    num_warps: int,
    num_stages: int,
    arch: int = 90,
    divisible: tuple[str, ...] = (),
) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    # As at launch: head-dim strides are 1 (Triton specialises ints equal to 1), pointers and the other
    # strides are multiples of 16 (torch allocations, H*D row strides).
    constexprs = {**constexprs, **{p: 1 for p in params if p.startswith("stride_") and p.endswith("d")}}
    signature = {p: "constexpr" if p in constexprs else pointer_types.get(p, "i32") for p in params}
    aligned = [
        p
        for p in params
        if p not in constexprs
        and (
            p.endswith("_ptr")
            or p.startswith("stride_")
            or p in divisible
            or pointer_types.get(p, "")[:1] == "*"
        )
    ]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(params.index(p),): v for p, v in constexprs.items()},
        attrs={(params.index(p),): [["tt.divisibility", 16]] for p in aligned},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return {
        "name": kernel.fn.__name__,
        "arch": arch,
        "constexprs": {p: v for p, v in constexprs.items() if not p.startswith("stride_")},
        "shared": compiled.metadata.shared,
        "registers": int(regs),
        "stack": int(stack),
        "async_copies": compiled.asm["ttgir"].count("async_copy_global_to_local"),
        "tma_copies": compiled.asm["ttgir"].count("async_tma_copy_global_to_local"),
    }


def _gluon_descriptor(dtype: str, block: list[int]) -> str:
    """The signature type of a bulk-copy descriptor of ``block`` tiles in Gluon's default layout."""
    from triton.experimental.gluon import language as gl

    gl_dtype = {"i8": gl.int8, "bf16": gl.bfloat16}[dtype]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
    return f"tensordesc<{dtype}[{block[0]}, {block[1]}],{layout!r}>"


def _compile_gluon(kernel, types: dict, constexprs: dict, aligned: tuple[str, ...], maxnreg: int) -> dict:
    """A Hopper Gluon kernel (4 warps in its default partition, as launched), with ptxas's own log."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    source = GluonASTSource(
        kernel,
        signature,
        {(params.index(p),): v for p, v in constexprs.items()},
        {(params.index(p),): [["tt.divisibility", 16]] for p in aligned},
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4, "maxnreg": maxnreg, "enable_fp_fusion": False},
    )

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        # ptxas says when it serializes the warpgroup MMAs, which would undo the kernel's overlap.
        log = subprocess.run(
            [
                get_ptxas(90).path,
                "-arch=sm_90a",
                "-v",
                f"--maxrregcount={maxnreg}",
                str(ptx),
                "-o",
                str(ptx) + ".o",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    return {
        "name": kernel.fn.__name__,
        "arch": 90,
        "constexprs": constexprs,
        "shared": compiled.metadata.shared,
        "stack": stack,
        "mma_serialized": "serialized" in log,
        "tma_copies": compiled.asm["ttgir"].count("async_tma_copy_global_to_local"),
    }


def _compile_warp_specialized_gemm(epilogue: str) -> dict:
    """Hopper's Gluon int8 GEMM (kernels/int8_gemm_ws.py) as int8_gemm launches it: with a gated
    residual and the row moments as the DiT's o projections and ffn.2 run (128x256 tiles; 128x128 for
    N an odd number of 128-column tiles), writing square sums as cross-attention's q, quantizing its
    GELU as ffn.0, raising the column amax as SageSLA's v, or none of these (128x256)."""
    from turbovideo.kernels import int8_gemm_ws

    gelu = epilogue == "gelu"
    out_tile = [2 * int8_gemm_ws.SUB_M if gelu else int8_gemm_ws.SUB_M, int8_gemm_ws.BLOCK_N]
    types = {
        "a_desc": _gluon_descriptor("i8", [int8_gemm_ws.SUB_M, 128]),
        "w_desc": _gluon_descriptor("i8", [int8_gemm_ws.BLOCK_N, 128]),
        "c_desc": _gluon_descriptor("i8" if gelu else "bf16", out_tile),
        "s_desc": _gluon_descriptor("bf16", [int8_gemm_ws.SUB_M, int8_gemm_ws.BLOCK_N]),
        "bias_ptr": "*bf16",
    }
    scales = ("a_scale_ptr", "w_scale_ptr", "gate_ptr", "stats_ptr", "q_scale_ptr")
    types.update(dict.fromkeys(scales, "*fp32"))
    wide = epilogue in ("plain", "wide-residual")  # 128x256 tiles, as int8_gemm_ws launches them
    residual = epilogue in ("residual", "wide-residual")
    # As int8_gemm_ws launches it: the epilogue partition's kernels (128x128 tiles' moments) at 128.
    maxnreg = 128 if gelu or epilogue in ("residual", "column-amax") else 168
    constexprs = dict(GROUP_M=16, STAGES=int8_gemm_ws.STAGES, RESIDUAL=residual, HAS_GATE=residual)
    stats = {
        "residual": int8_gemm_ws.ROW_MOMENTS,
        "wide-residual": int8_gemm_ws.ROW_MOMENTS,
        "squares": int8_gemm_ws.SQUARE_SUMS,
        "column-amax": int8_gemm_ws.COLUMN_AMAX,
    }.get(epilogue)
    constexprs.update(
        SHARED_GATE=True, STATS=(stats or int8_gemm_ws.NO_STATS).value, GELU=gelu, HALVES=2 if wide else 1
    )
    return _compile_gluon(
        int8_gemm_ws._int8_gemm_ws_kernel, types, constexprs, (*scales, "bias_ptr"), maxnreg
    )


def _compile_warp_specialized_attention(has_linear: bool) -> dict:
    """Hopper's Gluon sparse attention (kernels/sla_ws.py) as sla launches it, with and without SLA's
    linear branch."""
    from turbovideo.kernels import sla_ws

    tile = _gluon_descriptor("bf16", [sla_ws.SUB_M, sla_ws.HEAD_DIM])
    types = dict(q_desc=tile, k_desc=tile, v_desc=tile, o_ptr="*bf16", index_ptr="*i32", ksum_ptr="*fp32")
    types.update(kvw_desc=_gluon_descriptor("bf16", [128, 128]), bias_ptr="*bf16", qk_scale="fp32")
    constexprs = dict(STAGES=sla_ws.STAGES, HAS_LINEAR=has_linear)
    aligned = ("o_ptr", "index_ptr", "ksum_ptr", "bias_ptr", "stride_ol")
    return _compile_gluon(sla_ws._sparse_ws_kernel, types, constexprs, aligned, sla_ws.MAX_REGISTERS)


def _compile_report() -> list[dict]:
    from turbovideo.kernels import cross_attention, head, int8_gemm, int8_gemm_ws, norms, rope, sagesla, sla
    from turbovideo.kernels.gpu import GpuLimits

    # Hopper; A100; Ada and RTX Ampere (the 24 GB cards), which have 99 KB of shared memory per program.
    # Before Hopper there is no warpgroup MMA and no TMA: operands arrive through pointer loads.
    gpus = [GpuLimits(arch, shared) for arch, shared in MAX_SHARED.items()]

    bf16 = "*bf16"
    sparse_types = dict.fromkeys(("q_ptr", "o_ptr", "kvw_ptr", "k_src", "v_src"), bf16)
    sparse_types.update(index_ptr="*i32", ksum_ptr="*fp32", bias_ptr=bf16, qk_scale="fp32")
    state_types = dict(k_ptr=bf16, v_ptr=bf16, kv_part_ptr="*fp32", sums_part_ptr="*fp32", kblock_ptr="*fp32")
    report = []
    for blkq, blkk in (sla.SLA_BLOCKS, sla.SAGESLA_SM90_BLOCKS):
        config = sla.default_sparse_config(blkq, blkk)
        key_desc = f"tensordesc<bf16[1, {blkk}, 1, 128]>"
        for has_linear in (True, False):
            constexprs = dict(BLKQ=blkq, BLKK=blkk, BLOCK_M=config.block_m, D=128, HAS_LINEAR=has_linear)
            report.append(
                _compile(
                    sla._sparse_attention_kernel,
                    {**sparse_types, "k_src": key_desc, "v_src": key_desc},
                    {**constexprs, "TMA": config.tma, "PRECISION": "tf32"},
                    config.num_warps,
                    config.num_stages,
                )
            )
        launch = sla._state_launch(blkk, 128, None)
        report.append(
            _compile(sla._kv_state_kernel, state_types, dict(BLKK=blkk, D=128, PRECISION="tf32"), *launch)
        )
        report.append(
            _compile(sla._block_mean_kernel, dict(x_ptr=bf16, out_ptr="*fp32"), dict(BLK=blkq, D=128), 4, 3)
        )
    blkq, blkk = sla.SLA_BLOCKS
    for gpu in gpus[1:]:
        config = sla.default_sparse_config(blkq, blkk, 128, gpu)
        constexprs = dict(BLKQ=blkq, BLKK=blkk, BLOCK_M=config.block_m, D=128, HAS_LINEAR=True)
        report.append(
            _compile(
                sla._sparse_attention_kernel,
                sparse_types,
                {**constexprs, "TMA": config.tma, "PRECISION": "tf32"},
                config.num_warps,
                config.num_stages,
                arch=gpu.capability,
            )
        )
        launch = sla._state_launch(blkk, 128, gpu)
        report.append(
            _compile(
                sla._kv_state_kernel,
                state_types,
                dict(BLKK=blkk, D=128, PRECISION="tf32"),
                *launch,
                arch=gpu.capability,
            )
        )
    # The sum of its partials, with a bf16 KV.
    finish_types = dict(kv_part_ptr="*fp32", sums_part_ptr="*fp32", kblock_ptr="*fp32", kv_ptr=bf16)
    finish_types.update(ksum_ptr="*fp32", k_mean_ptr="*fp32")
    finish = dict(D=128, ROWS=sla._FINISH_ROWS, BLOCKS=16, KV_BF16=True)
    report.append(_compile(sla._state_finish_kernel, finish_types, finish, 4, 1))
    # Top-k over the 1182 key blocks of a 14B 720p row, the widest in use, as indices and as SageSLA's LUT.
    top_types = dict(score_ptr="*fp32", out_ptr="*i32", count_ptr="*i32")
    report.extend(
        _compile(sla._top_blocks_kernel, top_types, dict(NK=2048, STEPS=steps), 1, 1)
        for steps in (False, True)
    )
    # The linear branch added to SpargeAttn's output, as bf16 and as the o projection's int8 input.
    linear_types = dict.fromkeys(("q_ptr", "o_s_ptr", "o_ptr", "kvw_ptr", "bias_ptr"), bf16)
    linear_types.update(ksum_ptr="*fp32")
    constexprs = dict(BLOCK_M=64, D=128, PRECISION="tf32", OUT_BF16=True)
    report.append(_compile(sla._add_linear_kernel, linear_types, constexprs, 4, 3))
    quantized_types = {**linear_types, "o_ptr": "*i8", "scale_ptr": "*fp32"}
    constexprs = dict(BLOCK_M=64, D=128, PRECISION="tf32", STAGES=sla._QUANTIZED_STAGES)
    stages = sla._QUANTIZED_STAGES  # tl.range's, and the launch's default
    report.append(
        _compile(sla._add_linear_quantized_kernel, quantized_types, constexprs, sla._QUANTIZED_WARPS, stages)
    )
    # SageSLA's per-block q/k quantizer, on every GPU SpargeAttn runs on.
    quant_types = dict(x_ptr=bf16, mean_ptr="*fp32", q_ptr="*i8", scale_ptr="*fp32", block_mean_ptr="*fp32")
    for gpu in gpus:
        for has_mean in (True, False):  # k (minus its mean); q (with the selection's block means)
            constexprs = dict(BLK=128, D=128, HAS_MEAN=has_mean, BLOCK_MEANS=not has_mean)
            report.append(
                _compile(sagesla._quantize_blocks_kernel, quant_types, constexprs, 4, 1, arch=gpu.capability)
            )
    # Its fp8 V preparation, where SpargeAttn uses fp8 (sm89, sm90).
    for arch in (90, 89):
        report.append(
            _compile(
                sagesla._channel_amax_kernel,
                dict(v_ptr=bf16, out_ptr="*fp32"),
                dict(CHUNK=256, D=128),
                4,
                1,
                arch=arch,
            )
        )
        fp8_types = dict(v_ptr=bf16, amax_ptr="*fp32", out_ptr="*fp8e4nv", scale_ptr="*fp32")
        constexprs = dict(
            RANGE=sagesla._V_FP8_RANGE, INV_RANGE=sagesla._V_INV_RANGE, TILE=sagesla._V_TILE, D=128
        )
        report.append(_compile(sagesla._v_fp8_kernel, fp8_types, constexprs, 4, 1, arch=arch))
    # The int8 GEMM on int8 activations (the DiT's) and on bf16 ones quantized as they load.
    for gpu in gpus:
        for quantize_a in (False, True):
            launch = int8_gemm.gemm_launch(quantize_a, gpu)
            a_type = "bf16" if quantize_a else "i8"
            if launch.tma:
                operands = dict(
                    a_src=f"tensordesc<{a_type}[{launch.block_m}, 128]>",
                    w_src=f"tensordesc<i8[{launch.block_n}, 128]>",
                )
            else:
                operands = dict(a_src=f"*{a_type}", w_src="*i8")
            # The int8-input launch as the DiT's o and ffn.2 projections run it, with a gated residual
            # and the new stream's row moments.
            residual = not quantize_a
            stats = int8_gemm_ws.ROW_MOMENTS if residual else int8_gemm_ws.NO_STATS
            constexprs = dict(
                HAS_BIAS=True, RESIDUAL=residual, HAS_GATE=residual, SHARED_GATE=True, STATS=stats.value,
                QUANTIZE_A=quantize_a, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
            )  # fmt: skip
            report.append(
                _compile(
                    int8_gemm._int8_gemm_kernel,
                    {
                        **operands,
                        "a_scale_ptr": "*fp32",
                        "w_scale_ptr": "*fp32",
                        "bias_ptr": bf16,
                        "c_ptr": bf16,
                        "stream_ptr": bf16,
                        "gate_ptr": "*fp32",
                        "stats_ptr": "*fp32",
                    },
                    {**constexprs, "GROUP_M": launch.group_m, "TMA": launch.tma},
                    launch.num_warps,
                    launch.num_stages,
                    arch=gpu.capability,
                    divisible=(
                        "K",
                    ),  # Wan's feature counts are multiples of 16, and Triton specialises on it
                )
            )
    # The fused LayerNorm passes every DiT block runs (their int8 output also on the 24 GB cards), each
    # with the residual add: norm3's affine bf16 output at 1.3B's width, norm2's modulated statistics
    # at 14B's, then the quantized-tile pass.
    norm_types = dict.fromkeys(("x_ptr", "update_ptr", "x_out_ptr", "out_ptr"), bf16)
    fp32_args = ("gate_ptr", "stats_ptr", "out_scale_ptr", "weight_ptr", "bias_ptr", "shift_ptr", "scale_ptr")
    norm_types.update(dict.fromkeys(fp32_args, "*fp32"), eps="fp32")
    for gpu in gpus:
        for dim, affine, stats_only in ((1536, True, False), (5120, False, True)):
            rows, chunk = norms._row_pass_shape(dim)
            constexprs = dict(
                RESIDUAL=True, HAS_GATE=affine, AFFINE=affine, MODULATE=not affine, SHARED_MOD=True
            )
            constexprs.update(STATS_ONLY=stats_only, BLOCK_ROWS=rows, CHUNK=chunk)
            report.append(
                _compile(
                    norms._layer_norm_kernel, norm_types, constexprs, norms._ROW_WARPS, 3, arch=gpu.capability
                )
            )
        # The row statistics from the moments an int8 GEMM wrote, at 14B's width (40 chunks).
        report.append(
            _compile(
                norms._moments_statistics_kernel,
                {"moments_ptr": "*fp32", "stats_ptr": "*fp32", "eps": "fp32"},
                dict(BLOCK_ROWS=64, CHUNKS=64, CHUNK=128),
                4,
                3,
                arch=gpu.capability,
            )
        )
        for shared_mod, warps in ((True, norms._TILE_WARPS), (False, norms._TILE_WARPS_GATHERED)):
            report.append(
                _compile(
                    norms._quantize_normed_kernel,
                    {**norm_types, "out_ptr": "*i8"},
                    dict(AFFINE=False, MODULATE=True, SHARED_MOD=shared_mod, BLOCK=128),
                    warps,
                    3,
                    arch=gpu.capability,
                    divisible=("D",),  # every Wan width is a multiple of 16: loads vectorize
                )
            )
    # The DiT head: normalization, modulation and the fp32 product as three bf16 ones.
    head_types = dict(x_ptr=bf16, weight_ptr=bf16, bias_ptr=bf16, out_ptr="*fp32")
    head_types.update(dict.fromkeys(("stats_ptr", "shift_ptr", "scale_ptr"), "*fp32"))
    for gpu in gpus:
        constexprs = dict(SHARED_MOD=True, BLOCK_M=head.BLOCK_M, BLOCK_K=head.BLOCK_K, BLOCK_N=64)
        report.append(_compile(head._head_kernel, head_types, constexprs, head.WARPS, 3, arch=gpu.capability))
    # RMSNorm + RoPE of q and k at both widths (each in column steps), and cross-attention's RMSNorm at 14B's.
    rope_types = dict(
        x_ptr=bf16, out_ptr=bf16, weight_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", eps="fp32"
    )
    for gpu in gpus:
        for dim, rotate in ((1536, True), (5120, True), (5120, False)):
            rows, chunk = rope._launch_shape(dim)
            constexprs = dict(ROTATE=rotate, HALF_HEAD=64 if rotate else 1, BLOCK_ROWS=rows, CHUNK=chunk)
            constexprs.update(WHOLE_ROWS=chunk >= dim)
            report.append(
                _compile(rope._rms_norm_rope_kernel, rope_types, constexprs, 4, 3, arch=gpu.capability)
            )
    # Cross-attention writing the o projection's int8 input, on every GPU.
    cross_types = dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, bias_ptr=bf16, out_ptr="*i8", scale_ptr="*fp32")
    cross_types.update(rstd_ptr="*fp32", qk_scale="fp32")
    for gpu in gpus:
        report.append(
            _compile(
                cross_attention._cross_attention_kernel,
                cross_types,
                dict(
                    HAS_BIAS=True,
                    BLOCK_M=128,
                    HEAD_DIM=128,
                    BLOCK_KEYS=cross_attention.block_keys(gpu),
                ),  # fmt: skip
                cross_attention.WARPS,
                cross_attention.STAGES,
                arch=gpu.capability,
            )
        )
    epilogues = ("plain", "residual", "wide-residual", "squares", "gelu", "column-amax")
    report.extend(_compile_warp_specialized_gemm(epilogue) for epilogue in epilogues)
    report.extend(_compile_warp_specialized_attention(has_linear) for has_linear in (True, False))
    return report


def _has_ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _has_ptxas(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_each_gpu_generation_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="tv-kernel-compile-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        result = subprocess.run(
            [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
        )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert len(report) == 71
    for kernel in report:
        # A few bytes on the stack are a register or two that ptxas parks outside the hot loop (the
        # sparse kernel's linear-branch epilogue, the 4-warp linear-state kernel, which still runs 40 %
        # faster than with 8 warps and none); hundreds would be a real spill.
        wide = kernel["constexprs"].get("HALVES") == 2  # the int8 GEMM's 128x256 tiles: see below
        assert kernel["stack"] <= (48 if wide else 32), f"{kernel['name']} spills registers: {kernel}"
        assert kernel["shared"] <= MAX_SHARED[kernel["arch"]], (
            f"{kernel['name']} needs too much shared memory: {kernel}"
        )
    # Operand tiles stream in ahead of their use: bulk tensor copies (TMA) on Hopper, async copies before.
    for name in ("_sparse_attention_kernel", "_int8_gemm_kernel"):
        launches = [k for k in report if k["name"] == name]
        assert {k["arch"] for k in launches} == set(MAX_SHARED), name
        assert all(k["tma_copies"] > 0 for k in launches if k["arch"] == 90), name
        assert all(k["async_copies"] > 0 for k in launches if k["arch"] < 90), name
    # The persistent linear-branch pass fetches its next tiles while it computes this one.
    (linear,) = [k for k in report if k["name"] == "_add_linear_quantized_kernel"]
    assert linear["async_copies"] > 0 and linear["stack"] == 0, linear
    warp_specialized = [k for k in report if k["name"] in ("_int8_gemm_ws_kernel", "_sparse_ws_kernel")]
    assert len(warp_specialized) == 8
    for kernel in warp_specialized:
        # The GEMM's 128x256 tiles leave their consumers a few registers short: ptxas parks some in the K
        # loop (16 bytes here, 10 registers with Triton 3.6's ptxas; 40 bytes with the residual and
        # moments), and they still ran 2-5 % faster than 128x128 tiles at the q/k/v/o shapes and 6-17 %
        # at ffn.2's (docs/performance.md, "Built since: 128x256 int8 GEMM tiles" and "... for ffn.2").
        wide = kernel["constexprs"].get("HALVES") == 2
        assert kernel["stack"] <= (48 if wide else 0) and kernel["tma_copies"] > 0, kernel
        assert not kernel["mma_serialized"], f"ptxas serializes a warp-specialized kernel's MMAs: {kernel}"


if __name__ == "__main__":
    print(json.dumps(_compile_report()))
