"""Frame sizes: the upstream resolution table, a tiny row for CPU models, and the adaptive I2V rule."""

from __future__ import annotations

import math

# (width, height) per resolution and aspect ratio, as upstream's VIDEO_RES_SIZE_INFO. The "tiny" row is
# ours: small multiples of 16 so seeded-random tiny models run the whole path on a CPU in seconds.
SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "4:3": (640, 480), "3:4": (480, 640), "1:1": (640, 640)},
    "720p": {
        "16:9": (1280, 720),
        "9:16": (720, 1280),
        "4:3": (960, 720),
        "3:4": (720, 960),
        "1:1": (960, 960),
    },
    "tiny": {"16:9": (112, 64), "9:16": (64, 112), "4:3": (80, 64), "3:4": (64, 80), "1:1": (64, 64)},
}
ASPECT_RATIOS = ("16:9", "9:16", "4:3", "3:4", "1:1")

# Frame sizes are multiples of 16: 8x VAE compression times the 2x2 DiT patch.
STRIDE = 16
# RoPE tables cover at most 128 tokens per axis (upstream asserts it).
MAX_TOKENS_PER_SIDE = 128
MAX_SIDE = STRIDE * MAX_TOKENS_PER_SIDE


def table_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(width, height) of the fixed table entry."""
    return SIZES[resolution][aspect_ratio]


def adaptive_size(resolution: str, aspect_ratio: str, image_width: int, image_height: int) -> tuple[int, int]:
    """(width, height) keeping the table entry's area and the image's aspect ratio, on a 16-pixel grid.

    Upstream rounds with Python's round (half to even) after dividing by the stride.
    """
    width, height = table_size(resolution, aspect_ratio)
    area = width * height
    ratio = image_height / image_width
    ideal_w = math.sqrt(area / ratio)
    ideal_h = math.sqrt(area * ratio)
    return round(ideal_w / STRIDE) * STRIDE, round(ideal_h / STRIDE) * STRIDE


def is_valid_frame_count(num_frames: int, low: int, high: int) -> bool:
    return low <= num_frames <= high and (num_frames - 1) % 4 == 0
