"""I2V image preprocessing and the conditioning tensor y (upstream-spec §10)."""

import numpy as np
import torch
from PIL import Image

from turbovideo.pipeline.conditioning import (
    first_frame_mask,
    first_frame_video,
    image_condition,
    image_to_tensor,
)


def test_uniform_image_maps_to_its_normalised_value():
    image = Image.new("RGB", (97, 61), (0, 255, 51))
    tensor = image_to_tensor(image, 32, 16)
    assert tensor.shape == (1, 3, 16, 32) and tensor.dtype == torch.float32
    expected = torch.tensor([0, 255, 51]) / 255 * 2 - 1
    assert torch.allclose(tensor[0, :, 5, 7], expected, atol=1e-6)


def test_resize_is_antialiased_bilinear_on_uint8():
    # Stripes one pixel wide: antialiased downscaling averages them to grey.
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    tensor = image_to_tensor(Image.fromarray(stripes), 16, 16)
    assert tensor.abs().max() < 0.1
    # Values stay on the uint8 grid (the resize rounds to uint8 before scaling).
    levels = (tensor + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    # Two-pixel stripes average to grey under plain bilinear too (it samples between each pair); one
    # lit column in four does not: plain bilinear samples only unlit columns, antialiasing averages.
    sparse = np.zeros((64, 64, 3), np.uint8)
    sparse[:, ::4] = 255
    levels = (image_to_tensor(Image.fromarray(sparse), 16, 16) + 1) / 2 * 255
    assert (levels[..., 1:-1] - 255 / 4).abs().max() < 1  # the edge columns weigh fewer pixels


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased bilinear resampling as a matrix: a triangle filter widened by the downscale factor."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out)[:, None] + 0.5) * scale
    weights = np.maximum(0.0, 1 - np.abs(np.arange(n_in)[None, :] + 0.5 - centres) / support)
    return weights / weights.sum(axis=1, keepdims=True)


def test_resize_matches_an_antialiased_bilinear_filter_written_out():
    # Against the filter in float64: within the uint8 rounding (area averaging is 34 levels off here,
    # plain bilinear 108).
    image = np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    levels = (image_to_tensor(Image.fromarray(image), 16, 10)[0] + 1) / 2 * 255
    exact = np.einsum(
        "ih,hwc,jw->cij", _triangle_weights(23, 10), image.astype(np.float64), _triangle_weights(37, 16)
    )
    assert np.abs(levels.double().numpy() - exact).max() < 1


def test_grey_and_rgba_images_become_rgb():
    assert image_to_tensor(Image.new("L", (20, 20), 128), 16, 16).shape == (1, 3, 16, 16)
    assert image_to_tensor(Image.new("RGBA", (20, 20)), 16, 16).shape == (1, 3, 16, 16)


def test_first_frame_video_and_mask():
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    video = first_frame_video(image, 9)
    assert video.shape == (1, 3, 9, 8, 8)
    assert torch.equal(video[:, :, 0], image) and not video[:, :, 1:].any()
    mask = first_frame_mask(torch.zeros(2, 16, 3, 4, 5))
    assert mask.shape == (2, 4, 3, 4, 5)
    assert mask[:, :, 0].eq(1).all() and not mask[:, :, 1:].any()


def test_image_condition_layout():
    seen = {}

    def encode(video):
        seen["video"] = video
        # A stand-in encoder with the VAE's shape rule: 8x space, 1 + (F-1)/4 frames.
        frames = 1 + (video.shape[2] - 1) // 4
        return video[:, :1, ::4].repeat(1, 16, 1, 1, 1)[..., ::8, ::8][:, :, :frames] + 3

    image = Image.new("RGB", (40, 30), (255, 0, 0))
    y = image_condition(encode, image, 32, 16, 9, torch.device("cpu"), torch.float32)
    assert seen["video"].shape == (1, 3, 9, 16, 32)
    assert y.shape == (1, 20, 3, 2, 4) and y.dtype == torch.bfloat16
    assert y[:, :4, 0].eq(1).all() and not y[:, :4, 1:].any()
    assert y[:, 4:, 0].eq(4).all()  # encoded red frame 0 (1.0) + 3
    assert y[:, 4:, 1:].eq(3).all()
