"""Decoded video tensors to mp4 files (one per sample, fed while the VAE decodes) and a JPEG thumbnail."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from turbovideo.errors import one_line

log = logging.getLogger(__name__)

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

    ffmpeg (imageio-ffmpeg's) encodes in its own process, fed by a thread, so the caller (the VAE decode
    loop) hands over frames and goes on computing the next ones instead of waiting for the encoder.
    ffmpeg's messages go to a file, not to the terminal or the log: a failure becomes one sentence
    ending in ffmpeg's own account of its cause ("No space left on device").
    """

    def __init__(self, path: Path, width: int, height: int, fps: int) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"need even width and height for yuv420p, got {width}x{height}")
        self.path = path
        self._shape = (height, width, 3)
        self._chunks: queue.Queue[tuple[np.ndarray, Callable[[], None]] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._messages = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            ffmpeg_command(path, width, height, fps),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._messages,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not ffmpeg's
        )
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
                try:
                    self._process.stdin.write(np.ascontiguousarray(frames).data)
                except OSError:  # ffmpeg exited: an output it cannot open, a full disk
                    self._wait()
                    raise EncodeError(self.path, "ffmpeg stopped taking frames") from None
            finished = True
            self._wait()
            check_finished(self.path)
        except BaseException as exc:  # surfaced by close() on the caller's thread
            self._error = exc
            self._process.kill()
            while not finished and self._chunks.get() is not None:  # drain so close() never blocks
                pass
        finally:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            self._process.wait()
            self._messages.close()

    def _wait(self) -> None:
        """End ffmpeg's input and wait for it; raise EncodeError with its first message if it failed."""
        with contextlib.suppress(OSError):  # a pipe ffmpeg has already closed
            self._process.stdin.close()
        if status := self._process.wait():
            self._messages.seek(0)
            lines = self._messages.read().decode(errors="replace").splitlines()
            # The first message names the cause, the rest its consequences, each behind a stream tag:
            # "[out#0/mp4 @ 0x5616...] Could not write header (...): No space left on device".
            first = next((line for line in lines if line.strip()), f"exit status {status}")
            raise EncodeError(self.path, one_line(re.sub(r"^\[[^]]*\]\s*", "", first), 200))


def ffmpeg_command(path: Path, width: int, height: int, fps: int) -> list[str]:
    """Raw rgb24 frames on stdin -> H.264 yuv420p at ``CRF`` / ``PRESET`` with +faststart, errors only."""
    return [
        imageio_ffmpeg.get_ffmpeg_exe(),
        *("-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}"),
        *("-r", str(fps), "-i", "-", "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p"),
        *("-crf", str(CRF), "-preset", PRESET, "-movflags", "+faststart", ffmpeg_output_name(path)),
    ]


def ffmpeg_output_name(path: Path) -> str:
    """``path`` as ffmpeg must be given it: absolute, so that a relative name starting with "-" is not
    read as an option, nor one with a ":" before its first "/" as a protocol (e.g. "take:2/clip.mp4")."""
    return os.path.abspath(path)


class EncodeError(OSError):
    """ffmpeg did not finish a video file (a full or failing disk under it, an encoder it lacks)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"ffmpeg could not write {path}: {reason}")
        self.reason = reason


def check_finished(path: Path) -> None:
    """Raise EncodeError unless ``path`` is an mp4 with its index ("moov") ahead of the media data.

    ffmpeg's exit status covers the failures it notices; a file without its index is one no player
    opens, whatever the status said. +faststart moves the index to the front when the file is
    finished, so a look at the top-level boxes tells.
    """
    try:
        with path.open("rb") as file:
            while len(header := file.read(8)) == 8:
                size, kind = struct.unpack(">I4s", header)
                if kind == b"moov":
                    return
                if kind == b"mdat" or size < 8:  # media data first, or a box running to the end
                    break
                file.seek(size - 8, os.SEEK_CUR)
    except OSError as exc:
        raise EncodeError(path, exc.strerror or str(exc)) from None
    raise EncodeError(path, "the file has no index (is the disk full?)")


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


class SampleMuxer:
    """One mp4 per sample, fed chunk by chunk while the VAE decodes (the "mux" stage is what is left
    after the decode), plus the thumbnail from the first frame of sample 0."""

    def __init__(self, out_dir: Path, samples: int, width: int, height: int, fps: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.thumbnail = out_dir / "thumbnail.jpg"
        self._first_frame: tuple[np.ndarray, Callable[[], None]] | None = None
        self._streams: list[Mp4Stream] = []
        try:
            for i in range(samples):
                self._streams.append(Mp4Stream(out_dir / f"sample_{i}.mp4", width, height, fps))
        except BaseException:
            self._close_all()
            raise

    def add(self, chunk: torch.Tensor, first_sample: int = 0) -> None:
        """Frames of samples ``first_sample``, ``first_sample + 1``, ... (``chunk`` is [b, 3, n, H, W])."""
        frames, ready = to_uint8_frames(chunk)  # [b, n, H, W, 3]
        if self._first_frame is None:
            self._first_frame = frames[0, 0], ready
        streams = self._streams[first_sample : first_sample + len(frames)]
        for stream, sample_frames in zip(streams, frames, strict=True):
            stream.add(sample_frames, ready)

    def close(self, on_muxed: Callable[[int, int], None]) -> list[Path]:
        """Finish the thumbnail and every stream, then raise the first failure: each stream holds an ffmpeg
        process and a thread, which a long-lived worker must not leak. An interrupt (KeyboardInterrupt,
        SystemExit) is raised once the rest are closed. ``on_muxed(done, total)`` is called per sample once
        all are done."""
        errors: list[Exception] = []
        try:
            if self._first_frame is not None:
                frame, ready = self._first_frame
                try:
                    ready()
                    write_thumbnail(frame, self.thumbnail)
                except Exception as exc:
                    errors.append(exc)
            for stream in self._streams:
                try:
                    stream.close()
                except Exception as exc:
                    errors.append(exc)
        except BaseException:
            self._close_all()
            raise
        for extra in errors[1:]:
            log.warning("another sample failed as well: %s", one_line(str(extra)))
        if errors:
            raise errors[0]
        for index in range(len(self._streams)):
            on_muxed(index + 1, len(self._streams))
        return [stream.path for stream in self._streams]

    def _close_all(self) -> None:
        for stream in self._streams:
            with contextlib.suppress(BaseException):
                stream.close()
