"""I2V conditioning: the input image as the first frame of a video the VAE encodes, plus a mask.

Preprocessing follows upstream's torchvision chain without torchvision: uint8 CHW, bilinear resize
with antialiasing on the uint8 tensor (torch's uint8 kernel rounds to uint8, as torchvision does on
the CPU), times 1/255, then normalised with mean 0.5 and std 0.5.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from turbovideo.images import to_rgb

# The mask has 4 channels: one per pixel frame folded into each latent frame by the VAE's 4x time compression.
MASK_CHANNELS = 4


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> [1, 3, height, width] float32 in [-1, 1], resized without cropping."""
    pixels = torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1)[None]
    resized = F.interpolate(
        pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    unit = resized.to(torch.float32).mul_(1.0 / 255)
    return unit.sub_(0.5).div_(0.5)


def first_frame_video(image: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[1, 3, H, W] image -> [1, 3, num_frames, H, W]: the image, then zero (mid-grey) frames."""
    video = image.new_zeros((image.shape[0], 3, num_frames, *image.shape[-2:]))
    video[:, :, 0] = image
    return video


def first_frame_mask(latent: torch.Tensor) -> torch.Tensor:
    """Mask [B, 4, T, h, w] for a latent [B, 16, T, h, w]: 1 on latent frame 0, 0 elsewhere."""
    batch, _, frames, height, width = latent.shape
    mask = latent.new_zeros((batch, MASK_CHANNELS, frames, height, width))
    mask[:, :, 0] = 1
    return mask


def image_condition(
    encode: Callable[[torch.Tensor], torch.Tensor],
    image: Image.Image,
    width: int,
    height: int,
    num_frames: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The DiT's ``y`` [1, 20, T, height/8, width/8] in bf16: mask channels, then the image latent.

    ``encode`` maps a video in [-1, 1] (in ``dtype`` on ``device``) to its normalised latent.
    """
    video = first_frame_video(image_to_tensor(image, width, height), num_frames)
    latent = encode(video.to(device=device, dtype=dtype)).to(torch.bfloat16)
    return torch.cat([first_frame_mask(latent), latent], dim=1)
