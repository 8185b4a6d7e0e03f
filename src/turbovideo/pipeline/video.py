"""Decoded video tensors to mp4 files and a JPEG thumbnail."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

# Upstream writes through imageio with quality 5, which imageio maps to x264 -crf 25 (the quality
# knob, kept). It leaves x264 at its default preset, "medium"; "veryfast" encodes an 81-frame 480p
# clip in half the time (0.47 vs 0.93 s on 2 cores) at a similar size (66 vs 79 KiB on smooth
# synthetic content), and the mux sits on the request's critical path.
CRF = 25
PRESET = "veryfast"


def to_uint8_frames(video: torch.Tensor) -> tuple[np.ndarray, Callable[[], None]]:
    """Decoded video [..., 3, F, H, W] in about [-1, 1] -> uint8 frames [..., F, H, W, 3] on the CPU,
    without waiting for the GPU: the array is valid once ``ready()`` has returned.

    Same rounding as upstream's saver: v = (1 + clamp(x, -1, 1)) / 2, then floor(v * 255 + 0.5).
    The conversion runs where the video is (the GPU), so only uint8 bytes cross to the host, and they
    cross into pinned memory on the copy engine while the GPU goes on (the decode loop never stalls).
    """
    v = (1.0 + video.float().clamp(-1.0, 1.0)) / 2.0
    frames = torch.floor(v * 255.0 + 0.5).to(torch.uint8).movedim(-4, -1).contiguous()
    if frames.device.type != "cuda":
        return frames.numpy(), _nothing_to_wait_for
    host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(frames, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host.numpy(), copied.synchronize


def _nothing_to_wait_for() -> None:
    pass


class Mp4Stream:
    """An H.264 yuv420p mp4 (+faststart) written while its frames arrive.

    ffmpeg encodes in its own process, fed by a thread, so the caller (the VAE decode loop) hands
    over frames and goes on computing the next ones instead of waiting for the encoder.
    """

    def __init__(self, path: Path, width: int, height: int, fps: int) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"need even width and height for yuv420p, got {width}x{height}")
        self.path = path
        self._shape = (height, width, 3)
        self._chunks: queue.Queue[tuple[np.ndarray, Callable[[], None]] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._writer = imageio_ffmpeg.write_frames(
            str(path),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            output_params=["-crf", str(CRF), "-preset", PRESET, "-movflags", "+faststart"],
        )
        self._writer.send(None)  # start the ffmpeg process
        self._thread = threading.Thread(target=self._feed, name=f"mux-{path.name}", daemon=True)
        self._thread.start()

    def add(self, frames: np.ndarray, ready: Callable[[], None] = _nothing_to_wait_for) -> None:
        """Queue uint8 frames [n, H, W, 3]; the encoder thread calls ``ready()`` before reading them."""
        if frames.shape[1:] != self._shape:
            raise ValueError(f"frames of shape {frames.shape[1:]} do not fit a {self._shape} stream")
        self._chunks.put((frames, ready))

    def close(self) -> Path:
        """Wait until every queued frame is encoded and the file is finished."""
        self._chunks.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.path

    def _feed(self) -> None:
        finished = False
        try:
            while (chunk := self._chunks.get()) is not None:
                frames, ready = chunk
                ready()
                for frame in frames:
                    self._writer.send(np.ascontiguousarray(frame))
            finished = True
            self._writer.close()
        except BaseException as exc:  # surfaced by close() on the caller's thread
            self._error = exc
            with contextlib.suppress(BaseException):
                self._writer.close()  # stops ffmpeg
            while not finished and self._chunks.get() is not None:  # drain so close() never blocks
                pass


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """Encode uint8 frames [F, H, W, 3] as one mp4 (see Mp4Stream)."""
    _, height, width, channels = frames.shape
    if channels != 3:
        raise ValueError(f"need RGB frames, got {frames.shape}")
    stream = Mp4Stream(path, width, height, fps)
    stream.add(frames)
    stream.close()


def write_thumbnail(frame: np.ndarray, path: Path) -> None:
    """Save one uint8 frame [H, W, 3] as a JPEG."""
    Image.fromarray(frame).save(path, format="JPEG", quality=90)
