"""What a generation asks for and gets back, and the value checks run before any model work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from turbovideo.catalog import (
    ATTENTION_CHOICES,
    DEFAULT_BOUNDARY,
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_SLA_TOPK,
    DEFAULT_STEPS,
    MAX_FPS,
    MAX_FRAMES,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_STEPS,
    MIN_FRAMES,
    SIGMA_MAX_RANGE,
    ModelSpec,
)
from turbovideo.errors import InputError
from turbovideo.models.tokenizer import is_blank
from turbovideo.pipeline.resolution import (
    ASPECT_RATIOS,
    MAX_SIDE,
    SIZES,
    STRIDE,
    adaptive_size,
    is_valid_frame_count,
    table_size,
)


@dataclass
class GenerationRequest:
    """One generation. Field types are trusted; ``VideoPipeline.validate`` checks the values."""

    prompt: str
    task: str = "t2v"
    image: Image.Image | None = None
    resolution: str | None = None
    aspect_ratio: str = "16:9"
    adaptive_resolution: bool = False
    num_frames: int = DEFAULT_FRAMES
    num_steps: int = DEFAULT_STEPS
    sigma_max: float | None = None
    seed: int = 0
    num_samples: int = 1
    attention: str = "auto"
    sla_topk: float = DEFAULT_SLA_TOPK
    ode: bool = False
    boundary: float = DEFAULT_BOUNDARY
    fps: int = DEFAULT_FPS


@dataclass
class ProgressEvent:
    stage: str  # "encode" | "denoise" | "decode" | "mux"
    step: int  # 1-based within the stage
    total: int


@dataclass
class GenerationResult:
    videos: list[Path]
    thumbnail: Path
    width: int
    height: int
    num_frames: int
    fps: int
    duration_s: float
    seed: int
    attention_backend: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the caller should know about a finished run


def check_request(request: GenerationRequest, spec: ModelSpec) -> None:
    """Raise ``InputError`` (one line naming the field and the limit) for the first invalid value."""
    if not request.prompt or is_blank(request.prompt):
        raise InputError("prompt must not be empty")
    if request.task not in ("t2v", "i2v"):
        raise InputError(f"task must be 't2v' or 'i2v', got {request.task!r}")
    if request.task != spec.task:
        raise InputError(f"model {spec.name} does {spec.task} only, got task {request.task!r}")
    if request.task == "i2v" and request.image is None:
        raise InputError("task 'i2v' needs an input image")
    if request.task == "t2v" and request.image is not None:
        raise InputError("task 't2v' takes no input image; use an i2v model for image-to-video")
    if request.image is not None and not isinstance(request.image, Image.Image):
        raise InputError(f"image must be a PIL image, got {type(request.image).__name__}")
    if request.image is not None and min(request.image.size) < 1:  # Pillow makes 0x0 images
        raise InputError(f"image must have pixels, got {request.image.width}x{request.image.height}")
    resolution = request.resolution or spec.default_resolution
    allowed = supported_resolutions(spec)
    if resolution not in allowed:
        choices = allowed[0] if len(allowed) == 1 else f"one of {', '.join(allowed)}"
        raise InputError(f"resolution must be {choices} for model {spec.name}, got {resolution!r}")
    if request.aspect_ratio not in ASPECT_RATIOS:
        raise InputError(
            f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, got {request.aspect_ratio!r}"
        )
    if request.adaptive_resolution and request.image is None:
        raise InputError("adaptive_resolution needs an input image (task 'i2v')")
    if not is_valid_frame_count(request.num_frames, MIN_FRAMES, MAX_FRAMES):
        raise InputError(
            f"num_frames must be 4k+1 between {MIN_FRAMES} and {MAX_FRAMES}, got {request.num_frames}"
        )
    if not 1 <= request.num_steps <= MAX_STEPS:
        raise InputError(f"num_steps must be between 1 and {MAX_STEPS}, got {request.num_steps}")
    low, high = SIGMA_MAX_RANGE
    if request.sigma_max is not None and not low <= request.sigma_max <= high:  # NaN fails both
        raise InputError(f"sigma_max must be between {low} and {high}, got {request.sigma_max}")
    if not 0 <= request.seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and {MAX_SEED}, got {request.seed}")
    if not 1 <= request.num_samples <= MAX_SAMPLES:
        raise InputError(f"num_samples must be between 1 and {MAX_SAMPLES}, got {request.num_samples}")
    if request.attention not in ATTENTION_CHOICES:
        raise InputError(
            f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {request.attention!r}"
        )
    if not 0 < request.sla_topk <= 1:
        raise InputError(f"sla_topk must be in (0, 1], got {request.sla_topk}")
    if not 0 < request.boundary < 1:
        raise InputError(f"boundary must be strictly between 0 and 1, got {request.boundary}")
    if not 1 <= request.fps <= MAX_FPS:
        raise InputError(f"fps must be between 1 and {MAX_FPS}, got {request.fps}")
    width, height = frame_size(request, spec)
    if not (STRIDE <= width <= MAX_SIDE and STRIDE <= height <= MAX_SIDE):
        raise InputError(
            f"the image's aspect ratio gives a {width}x{height} video; adaptive_resolution needs both sides "
            f"between {STRIDE} and {MAX_SIDE}"
        )


def supported_resolutions(spec: ModelSpec) -> tuple[str, ...]:
    """Every published checkpoint runs 480p and 720p; tiny models run the tiny sizes only."""
    return ("tiny",) if spec.default_resolution == "tiny" else tuple(r for r in SIZES if r != "tiny")


def frame_size(request: GenerationRequest, spec: ModelSpec) -> tuple[int, int]:
    """(width, height) of the video: the table entry, or the adaptive size for the input image."""
    resolution = request.resolution or spec.default_resolution
    if request.adaptive_resolution and request.image is not None:
        return adaptive_size(resolution, request.aspect_ratio, *request.image.size)
    return table_size(resolution, request.aspect_ratio)
