"""The models this worker can serve: public names, Hub files and per-model defaults.

One table read by the pipeline (which DiT config, task and defaults), the checkpoint cache (which
files to fetch) and the worker (which names a request may ask for).
"""

from __future__ import annotations

from dataclasses import dataclass

# The VAE, the umT5 encoder and its tokenizer are shared by every TurboDiffusion model.
WAN_ASSETS_REPO = "Wan-AI/Wan2.1-T2V-1.3B"
VAE_FILE = "Wan2.1_VAE.pth"
TEXT_ENCODER_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")

# Frame limits: 4k+1 frames; 161 frames (10 s at 16 fps) is the most we serve at 720p on one GPU.
MIN_FRAMES = 5
MAX_FRAMES = 161
DEFAULT_FRAMES = 81
DEFAULT_FPS = 16
# Request limits the endpoint and the command line share.
MAX_STEPS = 4  # rCM's schedule has three intermediate angles (pipeline.sampler.MID_ANGLES)
DEFAULT_STEPS = MAX_STEPS
ATTENTION_CHOICES = ("auto", "sagesla", "sla", "dense")  # "auto": the best that runs here
DEFAULT_SLA_TOPK = 0.1  # the share of key blocks SLA attends to (upstream's default)
DEFAULT_BOUNDARY = 0.9  # I2V: the time at which the low-noise expert takes over
MAX_SAMPLES = 4
MAX_FPS = 60
# Upstream suggests sigma_max above the defaults (80 T2V, 200 I2V), e.g. 1600, for less diverse output.
SIGMA_MAX_RANGE = (0.1, 10000.0)
# torch's CPU generator keeps only the low 32 bits of a seed (2**32 draws seed 0's noise there), so a
# seed is a 32-bit number: the same seed then means the same noise wherever it runs.
MAX_SEED = 2**32 - 1
# Cards at least this large run the unquantized DiT files (upstream's README guidance).
UNQUANTIZED_MIN_BYTES = 40 * 10**9


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str


@dataclass(frozen=True)
class ModelSpec:
    """One servable model. ``experts`` are DiT file stems: one for T2V, (high-noise, low-noise) for I2V."""

    name: str
    task: str  # "t2v" or "i2v"
    dit_config: str
    repo: str | None  # None: seeded random weights, nothing to download
    experts: tuple[str, ...]
    default_resolution: str
    default_sigma_max: float
    vae_config: str = "wan2.1-vae"
    text_encoder_config: str = "umt5-xxl"

    @property
    def is_random(self) -> bool:
        return self.repo is None

    def dit_files(self, quantized: bool) -> tuple[HubFile, ...]:
        if self.repo is None:
            return ()
        suffix = "-quant.pth" if quantized else ".pth"
        return tuple(HubFile(self.repo, stem + suffix) for stem in self.experts)

    def shared_files(self) -> tuple[HubFile, ...]:
        if self.repo is None:
            return ()
        tokenizer = tuple(HubFile(WAN_ASSETS_REPO, f"{TOKENIZER_DIR}/{f}") for f in TOKENIZER_FILES)
        return (HubFile(WAN_ASSETS_REPO, VAE_FILE), HubFile(WAN_ASSETS_REPO, TEXT_ENCODER_FILE), *tokenizer)

    def files(self, quantized: bool) -> tuple[HubFile, ...]:
        return self.dit_files(quantized) + self.shared_files()


def _turbo(name: str, task: str, dit_config: str, resolution: str, experts: tuple[str, ...]) -> ModelSpec:
    sigma_max = 80.0 if task == "t2v" else 200.0
    return ModelSpec(name, task, dit_config, f"TurboDiffusion/{name}", experts, resolution, sigma_max)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _turbo("TurboWan2.1-T2V-1.3B-480P", "t2v", "wan2.1-t2v-1.3b", "480p", ("TurboWan2.1-T2V-1.3B-480P",)),
        _turbo("TurboWan2.1-T2V-14B-480P", "t2v", "wan2.1-t2v-14b", "480p", ("TurboWan2.1-T2V-14B-480P",)),
        _turbo("TurboWan2.1-T2V-14B-720P", "t2v", "wan2.1-t2v-14b", "720p", ("TurboWan2.1-T2V-14B-720P",)),
        _turbo(
            "TurboWan2.2-I2V-A14B-720P",
            "i2v",
            "wan2.2-i2v-a14b",
            "720p",
            ("TurboWan2.2-I2V-A14B-high-720P", "TurboWan2.2-I2V-A14B-low-720P"),
        ),
        # Embedded defaults: the real code path on CPU with seeded random weights.
        ModelSpec("tiny-t2v", "t2v", "tiny-t2v", None, ("tiny-t2v",), "tiny", 80.0, "tiny", "tiny"),
        ModelSpec(
            "tiny-i2v",
            "i2v",
            "tiny-i2v",
            None,
            ("tiny-i2v-high", "tiny-i2v-low"),
            "tiny",
            200.0,
            "tiny",
            "tiny",
        ),
    )
}

# Names that stand for several models (MODELS=tiny serves both tiny tasks, T2V first).
ALIASES: dict[str, tuple[str, ...]] = {"tiny": ("tiny-t2v", "tiny-i2v")}


def resolve_models(value: str, setting: str = "MODELS") -> list[ModelSpec]:
    """Parse a comma-separated model list into specs, expanding aliases; ``setting`` (the ``MODELS``
    variable, a script's ``--model``) is what an empty list is blamed on."""
    names: list[str] = []
    for raw in value.split(","):
        name = raw.strip()
        if not name:
            continue
        for expanded in ALIASES.get(name, (name,)):
            if expanded not in MODELS:
                known = ", ".join([*MODELS, *ALIASES])
                raise ValueError(f"unknown model {name!r}; known models: {known}")
            if expanded not in names:
                names.append(expanded)
    if not names:
        raise ValueError(f"{setting} names no model; use one of " + ", ".join([*MODELS, *ALIASES]))
    return [MODELS[n] for n in names]


def prefer_quantized(total_device_bytes: int | None) -> bool:
    """Int8 DiT files below 40 GB cards; unquantized on larger cards and on CPU (``None``)."""
    return total_device_bytes is not None and total_device_bytes < UNQUANTIZED_MIN_BYTES
