"""Request checks: one-line InputErrors naming the field and the limit; frame sizes."""

import pytest
from PIL import Image

from turbovideo.catalog import MODELS
from turbovideo.errors import InputError
from turbovideo.pipeline.request import GenerationRequest, check_request, frame_size
from turbovideo.pipeline.resolution import adaptive_size

T2V = MODELS["TurboWan2.1-T2V-1.3B-480P"]
I2V = MODELS["TurboWan2.2-I2V-A14B-720P"]
TINY_T2V = MODELS["tiny-t2v"]
TINY_I2V = MODELS["tiny-i2v"]
IMAGE = Image.new("RGB", (64, 48), (10, 20, 30))


@pytest.mark.parametrize(
    ("spec", "changes", "message"),
    [
        (T2V, {"num_frames": 80}, "num_frames must be 4k+1 between 5 and 161, got 80"),
        (T2V, {"num_frames": 1}, "num_frames must be 4k+1 between 5 and 161, got 1"),
        (T2V, {"num_frames": 165}, "num_frames must be 4k+1 between 5 and 161, got 165"),
        (T2V, {"aspect_ratio": "1:2"}, "aspect_ratio must be one of 16:9, 9:16, 4:3, 3:4, 1:1, got '1:2'"),
        (T2V, {"num_steps": 5}, "num_steps must be between 1 and 4, got 5"),
        (T2V, {"num_steps": 0}, "num_steps must be between 1 and 4, got 0"),
        (T2V, {"sigma_max": 0.0}, "sigma_max must be between 0.1 and 10000.0, got 0.0"),
        (T2V, {"sigma_max": float("nan")}, "sigma_max must be between 0.1 and 10000.0, got nan"),
        (T2V, {"sigma_max": 20000.0}, "sigma_max must be between 0.1 and 10000.0, got 20000.0"),
        (T2V, {"boundary": 1.0}, "boundary must be strictly between 0 and 1, got 1.0"),
        (T2V, {"boundary": 0.0}, "boundary must be strictly between 0 and 1, got 0.0"),
        (T2V, {"sla_topk": 0.0}, "sla_topk must be in (0, 1], got 0.0"),
        (T2V, {"sla_topk": 1.5}, "sla_topk must be in (0, 1], got 1.5"),
        (T2V, {"num_samples": 0}, "num_samples must be between 1 and 4, got 0"),
        (T2V, {"num_samples": 5}, "num_samples must be between 1 and 4, got 5"),
        (T2V, {"fps": 0}, "fps must be between 1 and 60, got 0"),
        (T2V, {"fps": 61}, "fps must be between 1 and 60, got 61"),
        (T2V, {"seed": -1}, "seed must be between 0 and 4294967295, got -1"),
        # torch's CPU generator reads 32 bits: 2**32 would repeat seed 0's video there
        (T2V, {"seed": 2**32}, "seed must be between 0 and 4294967295, got 4294967296"),
        (T2V, {"attention": "flash"}, "attention must be one of auto, sagesla, sla, dense, got 'flash'"),
        (T2V, {"prompt": "  "}, "prompt must not be empty"),
        (T2V, {"prompt": "&nbsp;\u200b"}, "prompt must not be empty"),
        (T2V, {"task": "i2v", "image": IMAGE}, "model TurboWan2.1-T2V-1.3B-480P does t2v only"),
        (T2V, {"image": IMAGE}, "task 't2v' takes no input image"),
        (
            T2V,
            {"resolution": "1080p"},
            "resolution must be one of 480p, 720p for model TurboWan2.1-T2V-1.3B-480P",
        ),
        (T2V, {"resolution": "tiny"}, "resolution must be one of 480p, 720p"),
        (TINY_T2V, {"resolution": "480p"}, "resolution must be tiny for model tiny-t2v, got '480p'"),
        (T2V, {"adaptive_resolution": True}, "adaptive_resolution needs an input image"),
        (I2V, {"task": "i2v"}, "task 'i2v' needs an input image"),
        (I2V, {"task": "i2v", "image": "photo.png"}, "image must be a PIL image, got str"),
        # Pillow makes empty images; they failed later (a division by zero, an empty resize).
        (I2V, {"task": "i2v", "image": Image.new("RGB", (0, 0))}, "image must have pixels, got 0x0"),
        (
            I2V,
            {"task": "i2v", "image": Image.new("RGB", (0, 9)), "adaptive_resolution": True},
            "image must have pixels, got 0x9",
        ),
        (
            I2V,
            {"task": "i2v", "image": Image.new("RGB", (4000, 10)), "adaptive_resolution": True},
            "adaptive_resolution needs both sides between 16 and 2048",
        ),
        (  # the tiny rows' small area: a tall thin image's width would round to nothing
            TINY_I2V,
            {"task": "i2v", "image": Image.new("RGB", (1, 400)), "adaptive_resolution": True},
            "gives a 0x1696 video; adaptive_resolution needs both sides between 16 and 2048",
        ),
    ],
)
def test_invalid_values_give_one_line(spec, changes, message):
    request = GenerationRequest(**{"prompt": "a red fox", "task": spec.task, **changes})
    with pytest.raises(InputError) as caught:
        check_request(request, spec)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("spec", [T2V, TINY_T2V])
def test_defaults_are_valid(spec):
    check_request(GenerationRequest(prompt="a red fox"), spec)


@pytest.mark.parametrize(
    "changes",
    [
        {"num_frames": 5},
        {"num_frames": 161},
        {"num_steps": 1},
        {"sigma_max": 0.1},
        {"sigma_max": 10000.0},
        {"seed": 0},
        {"seed": 2**32 - 1},
        {"num_samples": 4},
        {"sla_topk": 1.0},
        {"fps": 1},
        {"fps": 60},
    ],
)
def test_every_inclusive_limit_is_valid(changes):
    check_request(GenerationRequest(prompt="a red fox", **changes), T2V)


def test_valid_i2v():
    check_request(GenerationRequest(prompt="a red fox", task="i2v", image=IMAGE, num_frames=5), I2V)
    check_request(GenerationRequest(prompt="x", task="i2v", image=IMAGE, adaptive_resolution=True), TINY_I2V)


@pytest.mark.parametrize(
    ("spec", "resolution", "aspect", "expected"),
    [
        (T2V, None, "16:9", (832, 480)),
        (T2V, "720p", "9:16", (720, 1280)),
        (T2V, "480p", "1:1", (640, 640)),
        (I2V, None, "4:3", (960, 720)),
        (TINY_T2V, None, "16:9", (112, 64)),
        (TINY_T2V, "tiny", "3:4", (64, 80)),
    ],
)
def test_fixed_sizes(spec, resolution, aspect, expected):
    request = GenerationRequest(prompt="p", resolution=resolution, aspect_ratio=aspect)
    assert frame_size(request, spec) == expected


# The spec's table (upstream's VIDEO_RES_SIZE_INFO, width x height), every entry.
SPEC_TABLE = {
    "480p": {"1:1": (640, 640), "4:3": (640, 480), "3:4": (480, 640), "16:9": (832, 480), "9:16": (480, 832)},
    "720p": {
        "1:1": (960, 960),
        "4:3": (960, 720),
        "3:4": (720, 960),
        "16:9": (1280, 720),
        "9:16": (720, 1280),
    },
}


@pytest.mark.parametrize("resolution", sorted(SPEC_TABLE))
@pytest.mark.parametrize("aspect", ["1:1", "4:3", "3:4", "16:9", "9:16"])
def test_every_table_size_is_the_specs(resolution, aspect):
    request = GenerationRequest(prompt="p", resolution=resolution, aspect_ratio=aspect)
    assert frame_size(request, T2V) == SPEC_TABLE[resolution][aspect]


def test_adaptive_sizes_by_hand():
    def size(image_w, image_h, resolution="720p", aspect="16:9"):
        request = GenerationRequest(
            prompt="p",
            task="i2v",
            image=Image.new("RGB", (image_w, image_h)),
            resolution=resolution,
            aspect_ratio=aspect,
            adaptive_resolution=True,
        )
        return frame_size(request, I2V)

    # 720p 16:9 area 921,600. A 4:3 image: w = sqrt(921600 * 4/3) = 1108.51 -> 69.28 * 16 -> 1104;
    # h = sqrt(921600 * 3/4) = 831.38 -> 51.96 * 16 -> 832.
    assert size(640, 480) == (1104, 832)
    # A 16:9 image keeps the table size exactly.
    assert size(1920, 1080) == (1280, 720)
    # Portrait 9:16 at 480p 16:9 (area 399,360): w = sqrt(399360 * 9/16) = 473.97 -> 29.62 -> 480;
    # h = 842.6 -> 52.66 -> 848.
    assert size(900, 1600, resolution="480p") == (480, 848)
    # Square image at 720p 4:3 (area 691,200): side 831.38 -> 51.96 -> 832.
    assert size(500, 500, aspect="4:3") == (832, 832)
    # 720p 1:1 (area 921,600) with a 2:1 image: w = 1357.65 (84.85 -> 85), h = 678.82 (42.43 -> 42).
    assert size(1000, 500, aspect="1:1") == (1360, 672)


def test_adaptive_rounding_is_half_to_even():
    # h/w = (120/169)^2 puts the ideal width exactly on 84.5 strides: half-to-even gives 84, not 85.
    assert adaptive_size("720p", "1:1", 28561, 14400) == (84 * 16, 43 * 16)
