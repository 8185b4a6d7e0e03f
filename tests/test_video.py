"""Frames to mp4 and thumbnail (upstream-spec §11)."""

import threading
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from turbovideo.pipeline.video import (
    CRF,
    EncodeError,
    Mp4Stream,
    SampleMuxer,
    check_finished,
    to_uint8_frames,
    write_mp4,
    write_thumbnail,
)


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


def test_the_stream_carries_the_quality_and_speed_settings_chosen(tmp_path):
    # x264 writes its settings into the stream (an SEI message): crf 25, upstream's quality, and the
    # "veryfast" preset's one reference frame, fast subpixel search and short lookahead ("medium", its
    # default, encodes with ref=3 subme=7 rc_lookahead=40 and takes twice as long).
    path = tmp_path / "clip.mp4"
    write_mp4(_clip(), path, fps=16)
    data = path.read_bytes()
    start = data.index(b"options: ") + len(b"options: ")
    options = dict(item.split("=", 1) for item in data[start : data.index(b"\x00", start)].decode().split())
    assert float(options["crf"]) == CRF == 25
    assert {key: options[key] for key in ("ref", "subme", "me", "trellis", "rc_lookahead")} == {
        "ref": "1",
        "subme": "2",
        "me": "hex",
        "trellis": "0",
        "rc_lookahead": "10",
    }


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


def test_writing_over_an_existing_video_replaces_it(tmp_path):
    # A rerun with the same --out: ffmpeg without -y refuses to overwrite, exits 0, and the old video
    # would pass for the new one.
    path = tmp_path / "clip.mp4"
    write_mp4(_clip(5), path, fps=16)
    write_mp4(_clip(3), path, fps=16)
    assert len(_read(path)[1]) == 3


def test_the_reason_is_ffmpeg_s_first_message_without_its_stream_tag(tmp_path):
    # The first message names the cause and the file; its "[out#0/mp4 @ 0x...]" tag means nothing to a user.
    with pytest.raises(EncodeError) as failed:
        write_mp4(_clip(2), tmp_path / "missing" / "clip.mp4", fps=16)
    reason = failed.value.reason
    assert "clip.mp4" in reason and "No such file or directory" in reason and not reason.startswith("[")


def test_frames_that_are_not_rgb_are_refused_and_start_no_encoder(tmp_path):
    # RGBA frames (e.g. from a PNG) are refused before an ffmpeg process and its thread exist: a stream
    # started and then refused would never be closed.
    with pytest.raises(ValueError, match="need RGB frames"):
        write_mp4(np.zeros((2, 16, 16, 4), np.uint8), tmp_path / "rgba.mp4", fps=16)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("mux-")]


def _check_finished_within(path: Path, seconds: float = 10) -> list[BaseException]:
    # check_finished walks the file's boxes; a walk that never ends must fail the test, not hang it.
    raised: list[BaseException] = []

    def check():
        try:
            check_finished(path)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"check_finished({path}) did not return"
    return raised


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file or directory"),  # ffmpeg said it finished, but there is no file
        (b"", "no index"),
        (bytes(64), "no index"),  # zeros (a crash before the data reached the disk): a box of size 0
        # cut short: the media data's box runs past the end, and the index never came
        (b"\x00\x00\x00\x10ftypisom\x00\x00\x02\x00\x00\x00\x10\x00mdat" + bytes(16), "no index"),
        # finished, but with its index after the media data (no +faststart): a browser must download
        # the whole file before it can play
        (
            b"\x00\x00\x00\x10ftypisom\x00\x00\x02\x00\x00\x00\x00\x10mdat"
            + bytes(8)
            + b"\x00\x00\x00\x08moov",
            "no index",
        ),
    ],
    ids=["missing", "empty", "zeros", "cut-short", "index-last"],
)
def test_a_file_that_is_not_a_finished_mp4_is_an_encode_error(tmp_path, content, reason):
    path = tmp_path / "clip.mp4"
    if content is not None:
        path.write_bytes(content)
    (raised,) = _check_finished_within(path)
    assert isinstance(raised, EncodeError) and reason in raised.reason


def test_a_finished_mp4_passes_the_check(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(_clip(2), path, fps=16)
    assert _check_finished_within(path) == []


def _colour(rgb: tuple[int, int, int], frames: int) -> torch.Tensor:
    # [1, 3, frames, 16, 16] of one colour, in the VAE decoder's [-1, 1].
    return (torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1, 1) * 2 - 1).expand(1, 3, frames, 16, 16)


def test_the_thumbnail_is_the_first_frame_of_the_first_sample(tmp_path):
    # The pipeline hands over the samples one after the other; the thumbnail must be sample 0's first
    # frame, not that of a later chunk or sample.
    muxer = SampleMuxer(tmp_path, samples=2, width=16, height=16, fps=16)
    muxer.add(torch.cat([_colour((1, 0, 0), 1), _colour((0, 1, 0), 2)], dim=2), 0)  # red, then green
    muxer.add(_colour((0, 0, 1), 3), 1)  # blue
    muxed = []
    paths = muxer.close(lambda done, total: muxed.append((done, total)))
    assert paths == [tmp_path / "sample_0.mp4", tmp_path / "sample_1.mp4"]
    assert muxed == [(1, 2), (2, 2)]
    assert [len(_read(path)[1]) for path in paths] == [3, 3]
    with Image.open(muxer.thumbnail) as image:
        assert np.abs(np.asarray(image).astype(int) - (255, 0, 0)).max() < 16


def test_the_first_failing_sample_is_raised_and_the_others_are_logged(tmp_path, caplog):
    # Two samples ffmpeg cannot write: the error names the first; the second is a warning in the log,
    # and the sample between them is still finished.
    (tmp_path / "sample_0.mp4").mkdir()
    (tmp_path / "sample_2.mp4").mkdir()
    muxer = SampleMuxer(tmp_path, samples=3, width=16, height=16, fps=16)
    for index in range(3):
        muxer.add(_colour((0, 0, 0), 2), index)
    with pytest.raises(EncodeError, match="sample_0.mp4"):
        muxer.close(lambda done, total: None)
    assert "another sample failed as well" in caplog.text and "sample_2.mp4" in caplog.text
    assert len(_read(tmp_path / "sample_1.mp4")[1]) == 2


def test_an_encoder_that_cannot_start_leaves_the_others_ended(tmp_path, monkeypatch):
    # Sample 1's encoder fails to start (ffmpeg gone, no processes left): sample 0's, already running,
    # must be ended too, or its process and thread outlive the failed request.
    from turbovideo.pipeline import video

    commands = iter([video.ffmpeg_command, lambda *args: [str(tmp_path / "no-ffmpeg")]])
    monkeypatch.setattr(video, "ffmpeg_command", lambda *args: next(commands)(*args))
    with pytest.raises(FileNotFoundError):
        SampleMuxer(tmp_path, samples=2, width=16, height=16, fps=16)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("mux-")]


def test_the_thumbnail_keeps_the_frame_s_detail(tmp_path):
    # A flat colour survives any JPEG quality; a gradient shows a blocky low-quality thumbnail
    # (mean error 0.6 at quality 90, 2 at 50, 10 at 5).
    frame = _clip(1)[0]
    path = tmp_path / "thumb.jpg"
    write_thumbnail(frame, path)
    with Image.open(path) as image:
        assert np.abs(np.asarray(image).astype(int) - frame).mean() < 1.2


def test_a_stream_that_fails_midway_leaves_no_file_that_looks_finished(tmp_path):
    # The frames of a later chunk never arrive (their copy from the GPU failed): the encoder is stopped,
    # not left to finish a shorter video that would pass for the whole one.
    path = tmp_path / "clip.mp4"
    stream = Mp4Stream(path, 16, 16, 16)
    stream.add(np.zeros((2, 16, 16, 3), np.uint8))

    def copy_failed():
        raise RuntimeError("the frames' copy failed")

    stream.add(np.zeros((2, 16, 16, 3), np.uint8), copy_failed)
    with pytest.raises(RuntimeError, match="copy failed"):
        stream.close()
    (raised,) = _check_finished_within(path)
    assert isinstance(raised, EncodeError)
