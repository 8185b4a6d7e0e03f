"""Make upstream TurboDiffusion's model modules importable outside its training cluster.

Upstream's network, VAE, umT5 and SLA files pull in packages the forward pass never uses (loguru
logging, NVML, megatron, a file-I/O layer over S3) and two compiled pieces (flash-attn's rotary kernel,
the ``turbo_diffusion_ops`` int8 extension). ``import_upstream`` puts small stand-ins for those in
``sys.modules`` and imports the upstream modules from a checkout given by path; nothing is copied.

Stand-ins never change numerics: the rotary stand-in is the interleaved RoPE of spec §3.4 (what
flash-attn computes; upstream hands it fp32), the int8 and file-I/O stand-ins raise (parity runs use
neither), ftfy's is only installed where ftfy is missing (text cleaning is not compared), and the rest
only log or report "rank 0 of 1". Third-party stand-ins are used only when the real package is absent.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    **unused: object,
) -> torch.Tensor:
    """flash-attn's ``apply_rotary_emb`` for x [B, L, H, D] and cos/sin [L, D/2], interleaved pairs only.

    Pair p is channels (2p, 2p+1): out = (x0 cos - x1 sin, x0 sin + x1 cos), in x's dtype.
    """
    if not interleaved:
        raise NotImplementedError("only interleaved rotary (what upstream Wan calls) is provided")
    if cos.shape[-1] * 2 != x.shape[-1]:
        raise NotImplementedError("partial rotary dimensions are not provided")
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    if inplace:
        return x.copy_(out)
    return out


def _int8_extension_absent(*args: object, **kwargs: object) -> None:
    raise RuntimeError("turbo_diffusion_ops (upstream's compiled int8 kernels) is not built here")


def _refuse_io(*args: object, **kwargs: object) -> None:
    raise RuntimeError("upstream's easy_io is stubbed: parity runs pass weights in memory")


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _stand_ins() -> tuple[dict[str, types.ModuleType], list[dict[str, types.ModuleType]]]:
    """Modules replaced always (upstream's own infrastructure) or only when missing (third-party)."""
    log = logging.getLogger("upstream.imaginaire")
    always = {
        "imaginaire.utils.log": _module(
            "imaginaire.utils.log",
            debug=log.debug,
            info=log.info,
            warning=log.warning,
            error=log.error,
            critical=log.critical,
        ),
        "imaginaire.utils.distributed": _module(
            "imaginaire.utils.distributed",
            get_rank=lambda *a, **k: 0,
            get_world_size=lambda *a, **k: 1,
            is_rank0=lambda: True,
            sync_model_states=lambda *a, **k: None,
        ),
        "imaginaire.utils.misc": _module("imaginaire.utils.misc"),
        "imaginaire.utils.easy_io": _module(
            "imaginaire.utils.easy_io", easy_io=types.SimpleNamespace(load=_refuse_io, dump=_refuse_io)
        ),
    }
    rotary = _module("flash_attn.layers.rotary", apply_rotary_emb=apply_rotary_emb)
    layers = _module("flash_attn.layers", rotary=rotary)
    # Each group is installed as a whole when its first module cannot be imported.
    if_missing = [
        {
            "flash_attn.layers.rotary": rotary,
            "flash_attn.layers": layers,
            "flash_attn": _module("flash_attn", layers=layers),
        },
        {
            "turbo_diffusion_ops": _module(
                "turbo_diffusion_ops", quant_cuda=_int8_extension_absent, gemm_cuda=_int8_extension_absent
            )
        },
        {"ftfy": _module("ftfy", fix_text=_refuse_io)},
    ]
    return always, if_missing


@dataclass
class Upstream:
    """The imported upstream modules; ``stubbed`` lists the stand-ins in use."""

    root: Path
    wan2pt1: types.ModuleType
    wan2pt2: types.ModuleType
    vae: types.ModuleType
    umt5: types.ModuleType
    modify_model: types.ModuleType
    stubbed: list[str]


def import_upstream(checkout: str | Path) -> Upstream:
    """Import upstream's DiT, VAE, umT5 and modify_model from ``checkout`` (the folder holding
    ``turbodiffusion/``, or that folder itself)."""
    root = Path(checkout).resolve()
    if (root / "turbodiffusion").is_dir():
        root = root / "turbodiffusion"
    if not (root / "rcm" / "networks" / "wan2pt1.py").is_file():
        raise FileNotFoundError(
            f"no upstream TurboDiffusion checkout at {checkout} (rcm/networks/wan2pt1.py)"
        )
    stubbed = _install_stand_ins()
    for path in (root / "inference", root):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    with _cuda_device_query_allowed():
        upstream = Upstream(
            root=root,
            wan2pt1=importlib.import_module("rcm.networks.wan2pt1"),
            wan2pt2=importlib.import_module("rcm.networks.wan2pt2"),
            vae=importlib.import_module("rcm.tokenizers.wan2pt1"),
            umt5=importlib.import_module("rcm.utils.umt5"),
            modify_model=importlib.import_module("modify_model"),
            stubbed=stubbed,
        )
    _let_sdpa_run_on_cpu(importlib.import_module("rcm.utils.attention"))
    return upstream


def _let_sdpa_run_on_cpu(attention: types.ModuleType) -> None:
    """Upstream's ``attention()`` allows only GPU SDPA kernels, so on a CPU no kernel qualifies.

    Its per-device choice is cached; seeding the CPU entries lets SDPA use its CPU kernels (the same
    math). CUDA entries are untouched.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for is_half in (False, True):
        attention._SDPA_CONFIG_CACHE[("cpu", None, is_half)] = (
            0,
            [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
            sdpa_kernel,
        )


_installed: dict[str, types.ModuleType] = {}


def _install_stand_ins() -> list[str]:
    """Install what is needed; the names of all stand-ins in use (also from an earlier call)."""
    always, if_missing = _stand_ins()
    chosen = {name: module for name, module in always.items() if name not in sys.modules}
    for group in if_missing:
        probe = next(iter(group))
        if probe not in sys.modules and not _importable(probe):
            chosen.update(group)
    sys.modules.update(chosen)
    _installed.update(chosen)
    return sorted(name for name, module in _installed.items() if sys.modules.get(name) is module)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _cuda_device_query_allowed() -> Iterator[None]:
    """umt5.py evaluates ``torch.cuda.current_device()`` as a default argument at import time."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = original


@contextlib.contextmanager
def cuda_calls_land_on(device: torch.device) -> Iterator[None]:
    """Run upstream code that hard-codes ``tensor.cuda()`` (RoPE tables) with ``device`` instead.

    Only needed off-GPU; on CUDA the upstream call runs untouched.
    """
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self.to(device)
    try:
        yield
    finally:
        torch.Tensor.cuda = original
