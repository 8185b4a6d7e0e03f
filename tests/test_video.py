"""Frames to mp4 and thumbnail (upstream-spec §11)."""

from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from turbovideo.pipeline.video import Mp4Stream, to_uint8_frames, write_mp4, write_thumbnail


def test_uint8_rounding_matches_upstream_saver():
    # [3, F=1, H=1, W=6]: clamp, (1+x)/2, floor(v*255+0.5)
    values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, -0.5]).reshape(1, 1, 1, 6).expand(3, 1, 1, 6)
    frames, ready = to_uint8_frames(values)
    ready()
    assert frames.shape == (1, 1, 6, 3) and frames.dtype == np.uint8
    assert frames[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 64]


def test_frame_layout_is_time_height_width_channel():
    video = torch.zeros(3, 2, 4, 6)
    video[0, 1, 2, 5] = 1.0  # red channel, second frame, row 2, column 5
    frames, ready = to_uint8_frames(video)
    ready()
    assert frames.shape == (2, 4, 6, 3)
    assert frames[1, 2, 5].tolist() == [255, 128, 128]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous copy needs a GPU")
def test_gpu_frames_arrive_in_pinned_memory_once_ready():
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    expected, _ = to_uint8_frames(video)
    frames, ready = to_uint8_frames(video.cuda())
    ready()
    np.testing.assert_array_equal(frames, expected)


def _read(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for f in reader]
    return meta, frames


def _clip(num_frames: int = 9) -> np.ndarray:
    # Smooth gradients that brighten over time: easy for x264, and every frame differs.
    rows, cols = np.meshgrid(np.linspace(40, 160, 48), np.linspace(0, 60, 80), indexing="ij")
    frames = np.stack([np.stack([rows + cols + 5 * t, rows, cols + 100], axis=-1) for t in range(num_frames)])
    return frames.astype(np.uint8)


def test_mp4_round_trip(tmp_path):
    frames = _clip()
    path = tmp_path / "clip.mp4"
    write_mp4(frames, path, fps=12)

    meta, decoded = _read(path)
    assert meta["size"] == (80, 48)
    assert meta["fps"] == pytest.approx(12)
    assert meta["codec"].startswith("h264")
    assert meta["pix_fmt"].startswith("yuv420p")
    assert len(decoded) == 9
    # crf 25 is lossy but close on smooth content.
    assert np.abs(decoded[4].astype(int) - frames[4].astype(int)).mean() < 3
    # +faststart moves the moov atom in front of the media data.
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")


def test_streaming_in_chunks_writes_the_same_file_as_all_at_once(tmp_path):
    # The pipeline feeds each latent frame's pixel frames (1, then 4 at a time) as they decode.
    frames = _clip(9)
    write_mp4(frames, tmp_path / "whole.mp4", fps=16)
    stream = Mp4Stream(tmp_path / "chunks.mp4", 80, 48, fps=16)
    for chunk in (frames[:1], frames[1:5], frames[5:]):
        stream.add(chunk)
    assert stream.close() == tmp_path / "chunks.mp4"
    assert (tmp_path / "chunks.mp4").read_bytes() == (tmp_path / "whole.mp4").read_bytes()


def test_a_chunk_of_the_wrong_size_is_refused_and_the_stream_still_closes(tmp_path):
    stream = Mp4Stream(tmp_path / "clip.mp4", 80, 48, fps=16)
    stream.add(_clip(2))
    with pytest.raises(ValueError, match="do not fit"):
        stream.add(np.zeros((1, 48, 82, 3), np.uint8))
    stream.close()
    assert len(_read(tmp_path / "clip.mp4")[1]) == 2


def test_an_encoder_that_cannot_write_its_file_is_an_error(tmp_path):
    # A full disk: every write fails with ENOSPC, after ffmpeg took all the frames.
    path = tmp_path / "full.mp4"
    path.symlink_to("/dev/full")
    with pytest.raises(OSError, match="ffmpeg could not write .*: .*No space left on device"):
        write_mp4(_clip(5), path, fps=16)


def test_an_output_ffmpeg_cannot_open_is_an_error(tmp_path):
    with pytest.raises(OSError, match="ffmpeg could not write .*No such file"):
        write_mp4(_clip(5), tmp_path / "missing" / "clip.mp4", fps=16)


def test_odd_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(np.zeros((1, 15, 16, 3), np.uint8), tmp_path / "odd.mp4", fps=16)


def test_thumbnail_is_a_jpeg_of_the_frame(tmp_path):
    frame = np.full((32, 48, 3), (200, 30, 90), np.uint8)
    path = tmp_path / "thumb.jpg"
    write_thumbnail(frame, path)
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == (48, 32)
        assert np.abs(np.asarray(image).astype(int) - frame).max() < 8


def test_an_encoder_that_stops_taking_frames_is_an_encode_error(tmp_path):
    # Frames larger than the pipe's buffer: ffmpeg, unable to open its output (or a full disk
    # mid-stream), exits and the next write is a broken pipe, not a missing index.
    from turbovideo.pipeline.video import EncodeError

    with pytest.raises(EncodeError, match="ffmpeg could not write .*: .*No such file or directory"):
        write_mp4(np.zeros((5, 480, 832, 3), np.uint8), tmp_path / "missing" / "clip.mp4", fps=16)


@pytest.mark.parametrize("folder", ["-clips", "take:2"])
def test_a_relative_path_ffmpeg_could_read_as_an_option_or_a_protocol(tmp_path, monkeypatch, folder):
    # `turbovideo generate --out=-clips/v.mp4` (or take:2/v.mp4) writes through a relative scratch folder;
    # ffmpeg took "-clips/..." for an option and "take:..." for a protocol and wrote nothing.
    monkeypatch.chdir(tmp_path)
    (tmp_path / folder).mkdir()
    path = Path(folder) / "clip.mp4"
    write_mp4(_clip(5), path, fps=16)
    assert len(_read(tmp_path / folder / "clip.mp4")[1]) == 5


def test_an_encoder_ffmpeg_lacks_is_one_sentence_and_nothing_on_the_terminal(tmp_path, monkeypatch, capfd):
    # A system ffmpeg without libx264 (IMAGEIO_FFMPEG_EXE): its own first message is the cause.
    from turbovideo.pipeline import video

    real = video.ffmpeg_command
    monkeypatch.setattr(
        video, "ffmpeg_command", lambda *args: [a.replace("libx264", "no_such_encoder") for a in real(*args)]
    )
    with pytest.raises(video.EncodeError) as failed:
        write_mp4(_clip(5), tmp_path / "clip.mp4", fps=16)
    assert "no_such_encoder" in failed.value.reason and "\n" not in str(failed.value)
    assert capfd.readouterr() == ("", "")
