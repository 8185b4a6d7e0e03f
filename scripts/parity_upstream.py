"""Side-by-side parity of our models with upstream TurboDiffusion, same random weights, one script.

    python scripts/parity_upstream.py --out parity.json                 # real sizes, bf16, on one H100
    python scripts/parity_upstream.py --out tiny.json --tiny --device cpu  # tiny configs, fp32 (tests)

Upstream is imported from a checkout (``--upstream``, default third_party/TurboDiffusion, never tracked)
through scripts/_upstream_stubs.py. Each case builds the upstream module, fills it with seeded random
weights, writes them in the layout of the published files (a plain state dict: Linear patch embedding,
fp32 qk/cross-attention norms, bf16 everything else) and loads that file with our loader, so a case
proves the loader as well as the forward. Cases:

* dit       Wan2.1-T2V-1.3B on a 16x21x60x104 latent, t=988, context [1, 512, 4096] with zero rows
            after token 40 (ours gets the 40 rows and attends to the padding as biased keys): upstream ``original`` vs our ``dense``, then upstream SLA vs our ``sla``
            (topk 0.1, BLKQ 128 / BLKK 64, as modify_model.py builds it); upstream uses its Triton
            "fast" norms like the published pipeline.
* dit14b    the first 2 of 40 blocks of Wan2.1-T2V-14B (embeddings and head included) at 720p
            (21x90x160 latent, 75,600 tokens): model error and the time of one block.
* i2v14b    the same for one Wan2.2-I2V-A14B expert (wan2pt2; 36 input channels, y given).
* vae       Wan2.1 VAE in bf16: decode of a 16x21x60x104 latent, encode of a 9-frame 480x832 clip.
* umt5      umT5-XXL encoder in bf16 on 512 random ids, 40 of them unmasked; upstream's padded rows
            are zeroed as its UMT5EncoderModel does, ours come out zero.

Errors are relative L2 norms ``|ours - upstream| / |upstream|``, computed in float64. In bf16 the DiT
and VAE records add ``upstream_vs_fp32`` / ``ours_vs_fp32``: both sides against upstream run in fp32
with the same weights, the yardstick for what bf16 rounding alone costs. Off-GPU, upstream's SLA
(a bf16 Triton kernel) is built and loaded but not run: Triton's CPU interpreter gets bf16 wrong.
Times are medians of ``--repeats`` calls after one warm-up (CUDA events on a GPU); ``peak_extra_gib``
is the most memory a call allocated above what was already held. Every case records its own failure
and the rest go on; a table is printed and the JSON written to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _upstream_stubs import Upstream, cuda_calls_land_on, import_upstream  # noqa: E402

CASES = ("dit", "dit14b", "i2v14b", "vae", "umt5")
# Published dtypes (spec §2.1): the Fast-norm weights are fp32, the rest of a DiT file bf16; proj_l is
# always computed in bf16 (SLA casts under autocast), so it is stored that way.
FP32_DIT_KEYS = ("norm_q.weight", "norm_k.weight", "norm3.weight", "norm3.bias")
PROJ_L = "attn_op.local_attn.proj_l."
TIMESTEP = 988.0
PROMPT_TOKENS = 40


@dataclass(frozen=True)
class Setting:
    """Sizes and precision of one run: the real models on a GPU, or tiny ones on any device."""

    device: torch.device
    dtype: torch.dtype
    dit: str
    dit_latent: tuple[int, int, int]  # latent T, H, W
    big_t2v: str
    big_i2v: str
    big_blocks: int
    big_latent: tuple[int, int, int]
    vae: str
    vae_latent: tuple[int, int, int]
    vae_clip: tuple[int, int, int]  # frames, height, width
    text: str
    repeats: int
    topk: float = 0.1
    # Expected bound of the relative error per case kind; informational (the lead judges).
    bounds: tuple[tuple[str, float], ...] = ()

    def bound(self, kind: str) -> float | None:
        return dict(self.bounds).get(kind)


def real_setting(device: torch.device, repeats: int) -> Setting:
    return Setting(
        device=device,
        dtype=torch.bfloat16,
        dit="wan2.1-t2v-1.3b",
        dit_latent=(21, 60, 104),
        big_t2v="wan2.1-t2v-14b",
        big_i2v="wan2.2-i2v-a14b",
        big_blocks=2,
        big_latent=(21, 90, 160),
        vae="wan2.1-vae",
        vae_latent=(21, 60, 104),
        vae_clip=(9, 480, 832),
        text="umt5-xxl",
        repeats=repeats,
        bounds=(("dense", 2e-2), ("sla", 2e-2), ("vae", 3e-2), ("umt5", 1e-2)),
    )


def tiny_setting(device: torch.device, repeats: int) -> Setting:
    # 5x16x32 latent -> 640 tokens: 10 key blocks of 64, so SLA's topk 0.1 keeps exactly one. Token
    # counts must be multiples of 32: at dims <= 512 upstream's fast-norm kernels process rows in
    # blocks of 32 without masking the last one (out-of-bounds access; real dims use blocks of 1).
    return Setting(
        device=device,
        dtype=torch.float32,
        dit="tiny-t2v",
        dit_latent=(5, 16, 32),
        big_t2v="tiny-t2v",
        big_i2v="tiny-i2v",
        big_blocks=1,
        big_latent=(5, 16, 32),
        vae="tiny",
        vae_latent=(3, 4, 6),
        vae_clip=(5, 32, 48),
        text="tiny",
        repeats=repeats,
        bounds=(("dense", 1e-5), ("sla", 2e-2), ("vae", 1e-5), ("umt5", 1e-5)),
    )


# ----------------------------------------------------------------------------------------------
# measurement


@dataclass
class Measured:
    output: torch.Tensor
    ms: float
    peak_extra_gib: float | None


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> Measured:
    """One warm-up call, then ``repeats`` timed calls; the output of the last one.

    Under ``no_grad`` like upstream's inference scripts (inference_mode could change how its
    checkpoint-wrapped blocks dispatch)."""
    with torch.no_grad():
        output = fn()
        del output
        if device.type == "cuda":
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            output = None
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                output = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                output = fn()
                times.append((time.perf_counter() - begin) * 1e3)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - held) / 2**30
    return Measured(output, statistics.median(times), peak)


def rel_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _record(case: str, variant: str, setting: Setting, kind: str, shape: str) -> dict:
    return {
        "case": case,
        "variant": variant,
        "shape": shape,
        "bound": setting.bound(kind),
        "rel_l2": None,
        "upstream_ms": None,
        "ours_ms": None,
        "upstream_peak_extra_gib": None,
        "ours_peak_extra_gib": None,
        "notes": [],
        "error": None,
    }


@contextlib.contextmanager
def _catching(record: dict) -> Iterator[None]:
    """A failure ends this record only; the message and the last frames go into the JSON."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every case must survive every other case's failure
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=-6)


def _fill(record: dict, upstream: Measured, ours: Measured) -> None:
    record["rel_l2"] = rel_l2(ours.output, upstream.output)
    record["upstream_ms"] = upstream.ms
    record["ours_ms"] = ours.ms
    record["upstream_peak_extra_gib"] = upstream.peak_extra_gib
    record["ours_peak_extra_gib"] = ours.peak_extra_gib
    if record["bound"] is not None:
        record["within_bound"] = record["rel_l2"] <= record["bound"]


# ----------------------------------------------------------------------------------------------
# our package (also from a bare checkout, where it is not pip-installed)


# ----------------------------------------------------------------------------------------------
# DiT


def triton_runs_on(device: torch.device) -> bool:
    """Upstream's fast norms and SLA are Triton kernels: a GPU, or Triton's CPU interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def upstream_dit(up: Upstream, config, attention: str, setting: Setting, fast_norms: bool):
    """Upstream's WanModel on ``meta``, with SLA and norms swapped in as modify_model.create_model does."""
    network = up.wan2pt2 if config.task == "i2v" else up.wan2pt1
    with torch.device("meta"):
        net = network.WanModel(
            model_type=config.task,
            patch_size=config.patch_size,
            text_len=512,
            in_dim=config.in_dim,
            dim=config.dim,
            ffn_dim=config.ffn_dim,
            freq_dim=config.freq_dim,
            text_dim=config.text_dim,
            out_dim=config.out_dim,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            eps=config.eps,
        )
    if attention == "sla":
        up.modify_model.replace_attention(net, attention_type="sla", sla_topk=setting.topk)
    up.modify_model.replace_linear_norm(net, replace_linear=False, replace_norm=fast_norms, quantize=False)
    return net


def published_dit_state(up: Upstream, config, setting: Setting, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights of upstream's SLA model, in the published files' keys and dtypes."""
    from turbovideo.models.random_init import materialize

    net = upstream_dit(up, config, "sla", setting, fast_norms=False)
    materialize(net, setting.device, seed)
    state = {}
    for key, tensor in net.state_dict().items():
        if key.endswith(FP32_DIT_KEYS):
            dtype = torch.float32
        elif PROJ_L in key:
            dtype = torch.bfloat16
        else:
            dtype = setting.dtype
        state[key] = tensor.to(dtype)
    del net
    _free(setting.device)
    return state


def upstream_dit_loaded(up: Upstream, config, attention: str, state: dict, setting: Setting):
    """The upstream model holding ``state`` (strict, assign: the tensors are shared, not copied)."""
    net = upstream_dit(up, config, attention, setting, fast_norms=triton_runs_on(setting.device))
    if attention != "sla":
        # Upstream's `original` attention cannot take proj_l (issues #67, #122): the one change a
        # published file needs to run without SLA.
        state = {k: v for k, v in state.items() if PROJ_L not in k}
    net.load_state_dict(state, strict=True, assign=True)
    return net.to(setting.device).eval()


def our_dit(path: Path, config, setting: Setting):
    """Our loader on the saved file; a block subset of a named config goes through load_into."""
    from turbovideo.models import DIT_CONFIGS, load_dit
    from turbovideo.models.checkpoint import load_into, read_state_dict
    from turbovideo.models.dit import WanDiT

    if DIT_CONFIGS.get(config.name) == config:
        return load_dit(path, attention="dense", device=setting.device, dtype=setting.dtype)
    with torch.device("meta"):
        model = WanDiT(config, setting.dtype)
    load_into(model, read_state_dict(path), source=path.name, expected=config.label)
    model = model.to(setting.device).eval().requires_grad_(False)
    model.set_attention("dense")
    return model


def dit_inputs(config, latent: tuple[int, int, int], setting: Setting, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator(setting.device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=setting.device).to(setting.dtype)

    context = randn(1, 512, config.text_dim)
    context[:, PROMPT_TOKENS:] = 0
    inputs = {
        "x": randn(1, config.out_dim, *latent),
        "t": torch.full((1, 1), TIMESTEP, device=setting.device, dtype=setting.dtype),
        "context": context,
    }
    if config.task == "i2v":
        inputs["y"] = randn(1, config.cond_dim, *latent)
    return inputs


class FirstBlockCall:
    """Captures the arguments of a model's first block during a forward, to time that block alone. Ours
    gets the prompt's text keys made (a request makes them once); upstream's block projects them itself,
    a few hundred rows against the block's tens of thousands (well under 1 % of its time)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.block = model.blocks[0]
        self.args: tuple = ()
        self.kwargs: dict = {}
        self._handle = self.block.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        self.args, self.kwargs = args, kwargs
        self._handle.remove()

    def __call__(self) -> torch.Tensor:
        return self.block(*self.args, **self.kwargs)


def dit_case(
    up: Upstream, setting: Setting, config, latent, case: str, time_block: bool, workdir: Path
) -> list[dict]:
    """Dense then SLA, upstream vs ours, on one saved checkpoint of ``config``."""
    shape = "latent 16x" + "x".join(map(str, latent))
    seed = 1234
    records = []
    setup = _record(case, "setup", setting, "none", shape)
    with _catching(setup):
        state = published_dit_state(up, config, setting, seed)
        path = workdir / f"{config.name}.pth"
        torch.save(state, path)
        ours = our_dit(path, config, setting)
        inputs = dit_inputs(config, latent, setting, seed + 1)
    if setup["error"] is not None:
        return [setup]
    upstream_out = {}
    for attention in ("dense", "sla"):
        record = _record(case, attention, setting, attention, shape)
        records.append(record)
        with _catching(record):
            upstream_out[attention] = _compare_dit(
                up, setting, config, attention, state, ours, inputs, time_block, record
            )
    if upstream_out.get("dense") is not None and upstream_out.get("sla") is not None:
        change = rel_l2(upstream_out["sla"], upstream_out["dense"])
        records[-1]["notes"].append(f"for scale: upstream sla vs upstream dense differ by {change:.3g}")
    path.unlink(missing_ok=True)
    return records


def _compare_dit(
    up: Upstream,
    setting: Setting,
    config,
    attention: str,
    state,
    ours,
    inputs,
    time_block: bool,
    record: dict,
):
    """Fill ``record`` with one attention mode's comparison; returns upstream's output (None if skipped)."""
    device = setting.device
    net = upstream_dit_loaded(up, config, attention, state, setting)
    ours.set_attention(attention, topk=setting.topk)
    kind = "SLA (Triton, BLKQ 128, BLKK 64)" if attention == "sla" else "original (SDPA)"
    norms = "fast (Triton)" if triton_runs_on(device) else "plain"
    record["notes"].append(
        f"upstream {kind} with {norms} norms, blocks inside its selective-checkpoint wrapper as its"
        f" inference scripts build them; ours {ours.attention_backend}, topk {setting.topk}"
    )
    if attention == "sla" and device.type != "cuda":
        # Measured: in Triton's CPU interpreter upstream's kernel agrees with SDPA to 5e-4 in fp16 but
        # returns garbage (~1e9) in bf16, the only dtype its SLA module uses.
        record["skipped"] = "upstream's bf16 SLA kernel runs only on CUDA (model built and loaded, not run)"
        return None
    blocks = (FirstBlockCall(net), FirstBlockCall(ours)) if time_block else None
    up_measured = measure(functools.partial(upstream_forward, net, inputs, device), device, setting.repeats)
    # Ours gets the prompt's rows only, as the pipeline passes them: it attends to upstream's zero
    # padding as a few biased keys (models/text_padding.py), upstream to the 512 rows.
    prompt = inputs["context"][:, :PROMPT_TOKENS]
    our_call = functools.partial(ours, inputs["x"], inputs["t"], prompt, inputs.get("y"))
    our_measured = measure(our_call, device, setting.repeats)
    _fill(record, up_measured, our_measured)
    if setting.dtype != torch.float32:
        reference = fp32_reference(up, config, attention, state, inputs, setting)
        record["upstream_vs_fp32"] = rel_l2(up_measured.output, reference)
        record["ours_vs_fp32"] = rel_l2(our_measured.output, reference)
        del reference
    if blocks is not None:
        record["upstream_block_ms"] = measure(blocks[0], device, setting.repeats).ms
        record["ours_block_ms"] = measure(blocks[1], device, setting.repeats).ms
        record["notes"].append(f"{config.label}; *_block_ms times one block")
    return up_measured.output


def fp32_reference(up: Upstream, config, attention: str, state, inputs, setting: Setting) -> torch.Tensor:
    """Upstream's model with fp32 weights and inputs: the yardstick for both bf16 errors.

    Its SLA module still computes in bf16 (it casts q, k, v itself), so proj_l stays bf16.
    """
    state32 = {k: v if PROJ_L in k else v.float() for k, v in state.items()}
    net = upstream_dit_loaded(up, config, attention, state32, setting)
    with torch.no_grad():
        return upstream_forward(net, {k: v.float() for k, v in inputs.items()}, setting.device)


def upstream_forward(net, inputs: dict, device: torch.device) -> torch.Tensor:
    extra = {"y_B_C_T_H_W": inputs["y"]} if "y" in inputs else {}
    with cuda_calls_land_on(device):
        return net(inputs["x"], inputs["t"], inputs["context"], **extra)


# ----------------------------------------------------------------------------------------------
# VAE


def vae_case(up: Upstream, setting: Setting, workdir: Path) -> list[dict]:
    from turbovideo.models import load_vae
    from turbovideo.models.random_init import materialize
    from turbovideo.models.vae import VAE_CONFIGS

    device, dtype = setting.device, setting.dtype
    config = VAE_CONFIGS[setting.vae]
    setup = _record("vae", "setup", setting, "none", setting.vae)
    with _catching(setup):
        # Upstream fixes dim=96 inside WanVAE; the tiny config passes its base_dim through the same call.
        build = functools.partial(up.vae._video_vae, dim=config.base_dim)
        weights = build(pretrained_path=None, z_dim=config.z_dim, device=device)
        materialize(weights, device, seed=99)
        state = weights.state_dict()
        path = workdir / "vae.pth"
        torch.save(state, path)  # Wan2.1_VAE.pth is fp32
        upstream = upstream_vae(up, build, dtype, state, setting)
        ours = load_vae(path, device=device, dtype=dtype, name=setting.vae)
        generator = torch.Generator(device).manual_seed(7)
        latent = torch.randn((1, config.z_dim, *setting.vae_latent), generator=generator, device=device)
        frames, height, width = setting.vae_clip
        clip = torch.rand((1, 3, frames, height, width), generator=generator, device=device) * 2 - 1
        latent, clip = latent.to(dtype), clip.to(dtype)
    if setup["error"] is not None:
        return [setup]
    reference = None
    records = []
    for variant, shape in (("decode", _shape(latent)), ("encode", _shape(clip))):
        record = _record("vae", variant, setting, "vae", shape)
        records.append(record)
        with _catching(record):
            record["notes"].append(f"both {str(dtype).removeprefix('torch.')}; ours fast={ours.fast}")
            data = latent if variant == "decode" else clip
            up_measured = measure(
                functools.partial(getattr(upstream, variant), data), device, setting.repeats
            )
            our_measured = measure(functools.partial(getattr(ours, variant), data), device, setting.repeats)
            _fill(record, up_measured, our_measured)
            if dtype != torch.float32:
                reference = reference or upstream_vae(up, build, torch.float32, state, setting)
                with torch.no_grad():
                    expected = getattr(reference, variant)(data.float())
                record["upstream_vs_fp32"] = rel_l2(up_measured.output, expected)
                record["ours_vs_fp32"] = rel_l2(our_measured.output, expected)
                del expected
            del up_measured, our_measured
            _free(device)
    path.unlink(missing_ok=True)
    return records


def upstream_vae(up: Upstream, build: Callable, dtype: torch.dtype, state: dict, setting: Setting):
    """Upstream's WanVAE wrapper in ``dtype`` holding ``state`` (upstream loads the fp32 file, then
    casts the module; copying into the cast module gives the same values)."""
    with _patched(up.vae, "_video_vae", build):
        wrapper = up.vae.WanVAE(
            z_dim=state["conv2.weight"].shape[0],
            vae_pth=None,
            dtype=dtype,
            device=setting.device,
            is_amp=False,
        )
    wrapper.model.load_state_dict(state)
    return wrapper


@contextlib.contextmanager
def _patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape))


# ----------------------------------------------------------------------------------------------
# umT5


def umt5_case(up: Upstream, setting: Setting) -> list[dict]:
    from turbovideo.models import build_text_encoder
    from turbovideo.models.text_encoder import TEXT_ENCODER_CONFIGS

    device, dtype = setting.device, setting.dtype
    config = TEXT_ENCODER_CONFIGS[setting.text]
    record = _record(
        "umt5", "encode 512 ids", setting, "umt5", f"{setting.text}, {PROMPT_TOKENS} tokens unmasked"
    )
    with _catching(record):
        ours = build_text_encoder(setting.text, device=device, dtype=dtype, seed=5)
        upstream = up.umt5.umt5_xxl(
            encoder_only=True,
            dtype=dtype,
            device="meta",
            vocab_size=config.vocab_size,
            dim=config.dim,
            dim_attn=config.dim,
            dim_ffn=config.ffn_dim,
            num_heads=config.num_heads,
            encoder_layers=config.num_layers,
            num_buckets=config.num_buckets,
        )
        # Our state dict must be upstream's key set exactly; assign shares the tensors (no copy).
        upstream.load_state_dict(ours.state_dict(), strict=True, assign=True)
        upstream = upstream.to(device).eval()
        generator = torch.Generator(device).manual_seed(11)
        ids = torch.randint(2, config.vocab_size, (1, 512), generator=generator, device=device)
        ids[:, PROMPT_TOKENS - 1] = 1  # </s>
        ids[:, PROMPT_TOKENS:] = 0  # padding
        mask = (torch.arange(512, device=device) < PROMPT_TOKENS).long()[None]

        def upstream_call() -> torch.Tensor:
            # UMT5EncoderModel keeps the first sum(mask) rows and pads with zeros.
            out = upstream(ids, mask)
            out[:, PROMPT_TOKENS:] = 0
            return out

        up_measured = measure(upstream_call, device, setting.repeats)
        our_measured = measure(lambda: ours(ids, mask), device, setting.repeats)
        _fill(record, up_measured, our_measured)
        record["notes"].append(
            f"our {len(ours.state_dict())} tensors loaded strictly into upstream's encoder"
        )
    return [record]


# ----------------------------------------------------------------------------------------------
# driver


def run_cases(
    up: Upstream,
    setting: Setting,
    cases: tuple[str, ...],
    workdir: Path,
    done: Callable[[list[dict]], None],
) -> list[dict]:
    """Run the cases in order; ``done(records so far)`` after each, so a cut-off run keeps its results."""
    from turbovideo.models import DIT_CONFIGS

    records: list[dict] = []
    for case in cases:
        begin = time.perf_counter()
        try:
            if case == "dit":
                found = dit_case(
                    up, setting, DIT_CONFIGS[setting.dit], setting.dit_latent, "dit", False, workdir
                )
            elif case in ("dit14b", "i2v14b"):
                name = setting.big_t2v if case == "dit14b" else setting.big_i2v
                config = blocks_of(DIT_CONFIGS[name], setting.big_blocks)
                found = dit_case(up, setting, config, setting.big_latent, case, True, workdir)
            elif case == "vae":
                found = vae_case(up, setting, workdir)
            else:
                found = umt5_case(up, setting)
        except Exception as exc:  # noqa: BLE001 - a case that fails outside its records still reports
            found = [_record(case, "case", setting, "none", "")]
            found[0]["error"] = f"{type(exc).__name__}: {exc}"
            found[0]["traceback"] = traceback.format_exc(limit=-6)
        seconds = time.perf_counter() - begin
        for record in found:
            record["case_seconds"] = round(seconds, 1)
        records.extend(found)
        _free(setting.device)
        print(f"[{case}] {seconds:.1f} s", flush=True)
        done(records)
    return records


def blocks_of(config, blocks: int):
    """``config`` cut to its first ``blocks`` blocks, named so that nobody mistakes it for the whole model."""
    return dataclasses.replace(
        config,
        name=f"{config.name}-first{blocks}",
        label=f"{config.label} ({blocks} of {config.num_layers} blocks)",
        num_layers=blocks,
    )


def table(records: list[dict]) -> str:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = f"{'case':<8} {'variant':<15} {'rel L2':>9} {'bound':>7} {'up ms':>9} {'our ms':>9} {'x':>5} "
    header += f"{'up GiB':>7} {'our GiB':>7}  shape / notes"
    lines = [header, "-" * len(header)]
    for r in records:
        speedup = r["upstream_ms"] / r["ours_ms"] if r["upstream_ms"] and r["ours_ms"] else None
        line = (
            f"{r['case']:<8} {r['variant']:<15} {fmt(r['rel_l2'], '.2e'):>9} {fmt(r['bound'], '.0e'):>7} "
            f"{fmt(r['upstream_ms'], '.1f'):>9} {fmt(r['ours_ms'], '.1f'):>9} {fmt(speedup, '.2f'):>5} "
            f"{fmt(r['upstream_peak_extra_gib'], '.2f'):>7} {fmt(r['ours_peak_extra_gib'], '.2f'):>7}  {r['shape']}"
        )
        lines.append(line)
        if "upstream_vs_fp32" in r:
            lines.append(
                f"{'':<25}against upstream in fp32: upstream {r['upstream_vs_fp32']:.2e}, ours {r['ours_vs_fp32']:.2e}"
            )
        if "upstream_block_ms" in r:
            lines.append(
                f"{'':<25}one block: upstream {r['upstream_block_ms']:.1f} ms, ours {r['ours_block_ms']:.1f} ms"
            )
        for note in r["notes"]:
            lines.append(f"{'':<25}{note}")
        if r.get("skipped"):
            lines.append(f"{'':<25}SKIPPED {r['skipped']}")
        if r["error"]:
            lines.append(f"{'':<25}ERROR {r['error'][:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--upstream", default=ROOT / "third_party" / "TurboDiffusion", type=Path)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--tiny", action="store_true", help="tiny configs in fp32 (CPU-sized)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    begin = time.perf_counter()
    try:
        up = import_upstream(args.upstream)  # first: its stand-ins (e.g. ftfy) also serve our imports
    except FileNotFoundError as exc:
        raise SystemExit(
            f"parity_upstream.py: {exc}; fetch thu-ml/TurboDiffusion there or pass --upstream"
        ) from None
    from turbovideo.benchmark import benchmark_device

    device = benchmark_device("parity_upstream.py", args.device, cpu_smoke=True, out=args.out)

    setting = (tiny_setting if args.tiny else real_setting)(device, args.repeats)
    # The fp32 yardsticks must be true fp32 (cuDNN convs default to TF32); bf16 work is unaffected.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "upstream": str(up.root),
        "stand_ins": up.stubbed,
        "setting": {k: str(v) for k, v in dataclasses.asdict(setting).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(records: list[dict]) -> None:
        report.update(seconds=round(time.perf_counter() - begin, 1), results=records)
        args.out.write_text(json.dumps(report, indent=2, default=str))

    with tempfile.TemporaryDirectory(prefix="parity_") as workdir:  # checkpoints written for our loaders
        records = run_cases(up, setting, tuple(args.cases), Path(workdir), write)
    print(table(records))
    print(f"total {report['seconds']} s; stand-ins: {', '.join(up.stubbed)}")
    return 1 if any(r["error"] for r in records) else 0


def _version(package: str) -> str | None:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
