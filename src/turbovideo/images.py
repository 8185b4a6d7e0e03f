"""Opening an image someone sent: bytes checked before they are decoded, then made upright 8-bit RGB.

Shared by the endpoint (which fetches or decodes the bytes first, worker/inputs.py) and the command line.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from turbovideo.errors import InputError, one_line

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000  # about 8K x 6K; a 48 MP phone photo still fits
# Longest side over shortest. Video frames are at most 16:9; a sliver of a few pixels by millions cost
# minutes and tens of GB in the antialiased resize while fitting the byte and pixel limits.
MAX_IMAGE_ASPECT = 8
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes without trusting their header: size checked first, then verified, then loaded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                width, height = probe.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InputError(
                        f"image must have at most {MAX_IMAGE_PIXELS} pixels, got {width}x{height}"
                    )
                if max(width, height) > MAX_IMAGE_ASPECT * min(width, height):
                    raise InputError(
                        f"image sides must be within {MAX_IMAGE_ASPECT}:1 of each other, got {width}x{height}"
                    )
                probe.verify()
            # verify() leaves the image unusable; decoding starts again from the bytes.
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                image.load()
                return to_rgb(_upright(image))
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(
            f"image is not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"image must have at most {MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"image could not be decoded ({reason(exc)})") from None


def _upright(image: Image.Image) -> Image.Image:
    """The image as it is displayed: phone photos store the camera's rotation in EXIF. An EXIF block that
    cannot be read (not TIFF data, or cut short) says no rotation; the pixels decoded all the same."""
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, OSError, EOFError, struct.error):
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, as upstream's ``convert("RGB")`` gives, except for 16-bit grayscale (PNG), which Pillow
    would clip at 255 (a mostly white frame): its values are scaled to 8 bits first. That covers mode
    ``I;16*`` and a 32-bit ``I`` image holding values above 255 (older Pillows open 16-bit PNGs so); an
    ``I`` image within 0-255 is plain 8-bit data. Alpha is dropped."""
    if image.mode == "RGB":  # already decoded so by the worker: no copy
        return image
    if image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.uint16) >> 8
    elif image.mode == "I" and image.getextrema()[1] > 255:
        values = np.clip(np.asarray(image), 0, 65535) >> 8
    else:
        return image.convert("RGB")
    return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")


def reason(exc: BaseException) -> str:
    """An exception's message as one short line (its type's name where it has none)."""
    return one_line(str(exc) or type(exc).__name__, 200)
