"""``python -m turbovideo generate``: a playable file for good input, one line and exit 2 for bad input."""

import io
import os
import subprocess
import sys

import imageio_ffmpeg
import pytest
from PIL import Image

from turbovideo.__main__ import main

GENERATE = [sys.executable, "-m", "turbovideo", "generate"]  # the command line, in a subprocess


def _frames(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return meta, sum(1 for _ in reader)


def test_tiny_default_run_in_a_subprocess(tmp_path):
    out = tmp_path / "fox.mp4"
    done = subprocess.run(
        [
            *GENERATE,
            "--model",
            "tiny",
            "--prompt",
            "a red fox",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    meta, count = _frames(out)
    assert meta["size"] == (112, 64) and meta["fps"] == pytest.approx(16) and count == 17
    assert "denoise" in done.stderr and "4/4" in done.stderr
    assert not [p for p in tmp_path.iterdir() if p != out]  # no scratch files left


def test_bad_value_in_a_subprocess_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [
            *GENERATE,
            "--prompt",
            "x",
            "--num_frames",
            "80",
            "--out",
            str(tmp_path / "x.mp4"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "turbovideo: --num_frames must be 4k+1 between 5 and 161, got 80"
    assert not list(tmp_path.iterdir())


def test_image_selects_tiny_i2v_and_samples_get_numbered_files(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (20, 200, 20)).save(image)
    out = tmp_path / "clip.mp4"
    argv = ["generate", "--model", "tiny", "--prompt", "grass", "--image", str(image), "--out", str(out)]
    argv += [
        "--num_frames",
        "5",
        "--num_steps",
        "2",
        "--num_samples",
        "2",
        "--aspect_ratio",
        "1:1",
        "--fps",
        "8",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "clip_0.mp4"), str(tmp_path / "clip_1.mp4")]
    for path in printed:
        meta, count = _frames(path)
        assert meta["size"] == (64, 64) and meta["fps"] == pytest.approx(8) and count == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_steps", "abc"], "argument --num_steps: invalid int value: 'abc'"),
        (["--num_steps", "5"], "--num_steps must be between 1 and 4, got 5"),
        (["--num_frames", "0"], "--num_frames must be 4k+1 between 5 and 161, got 0"),
        (["--aspect_ratio", "1:2"], "--aspect_ratio must be one of"),
        (["--model", "wan-9000"], "unknown model 'wan-9000'"),
        (
            ["--model", "TurboWan2.1-T2V-1.3B-480P"],
            "--dest DIR, then pass --checkpoint_dir DIR/models/TurboWan2.1-T2V-1.3B-480P-bf16",
        ),
        (
            ["--model", "TurboWan2.1-T2V-1.3B-480P", "--checkpoint_dir", "ckpt/models/typo"],
            "--checkpoint_dir ckpt/models/typo is not a folder: run python scripts/download_checkpoints.py",
        ),
        (["--image", "/nonexistent.png"], "cannot read image /nonexistent.png"),
        (
            ["--image", "https://example.com/a.jpg"],
            "--image takes an image file, got the URL https://example.com/a.jpg",
        ),
        (["--image", "__big__"], "image must have at most 50000000 pixels"),
        (["--model", "tiny-i2v"], "task 'i2v' needs an input image"),
        (["--attention_type", "flash"], "--attention_type must be one of"),
        (["--resolution", "720p"], "--resolution must be tiny for model tiny-t2v"),
        (["--out", "__tmp__/fox.gif"], "--out must name an .mp4 file"),
        (["--image", "/dev/zero"], "/dev/zero: image must be at most 20 MB"),
        (["--checkpoint_dir", "ckpt/models/x"], "--checkpoint_dir is for the published models; tiny-t2v"),
    ],
)
def test_bad_values_give_one_line_and_exit_2(argv, message, tmp_path, capsys):
    if "__big__" in argv:  # 8000 x 8000 is past the pixel limit and Pillow's own bomb check
        big = tmp_path.parent / f"{tmp_path.name}-big.png"
        Image.new("L", (8000, 8000)).save(big)
        argv = [str(big) if a == "__big__" else a for a in argv]
    argv = [a.replace("__tmp__", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.mp4"), *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_out_naming_a_directory_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert (
        capsys.readouterr().err
        == f"turbovideo: --out {tmp_path} is a directory; name the video file, e.g. {tmp_path / 'video.mp4'}\n"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tail", ["/", "/."])
def test_out_ending_in_a_separator_is_a_directory_too(tmp_path, capsys, tail):
    with pytest.raises(SystemExit) as exited:  # it used to write a file named "new" there
        main(["generate", "--model", "tiny", "--prompt", "x", "--out", f"{tmp_path / 'new'}{tail}"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(f"turbovideo: --out {tmp_path / 'new'} is a directory;")
    assert not list(tmp_path.iterdir())


def test_an_image_is_used_upright_by_its_exif_orientation(tmp_path, capsys):
    image = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it to portrait
    Image.new("RGB", (128, 64), (200, 20, 20)).save(image, exif=exif)
    out = tmp_path / "clip.mp4"
    argv = ["generate", "--model", "tiny", "--prompt", "p", "--image", str(image), "--out", str(out)]
    assert main([*argv, "--num_frames", "5", "--num_steps", "1", "--adaptive_resolution"]) == 0
    meta, _ = _frames(str(out))
    width, height = meta["size"]
    assert height > width


def test_an_out_name_too_long_for_the_file_system_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--out", str(tmp_path / ("a" * 300 + ".mp4"))])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("turbovideo: --out ") and err.count("\n") == 1


def test_an_unwritable_out_folder_fails_before_the_models_load(tmp_path, capsys, monkeypatch):
    from turbovideo.pipeline import VideoPipeline

    def load(*args, **kwargs):
        raise AssertionError("loaded the models for an --out that cannot be written")

    monkeypatch.setattr(VideoPipeline, "load", load)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "file" / "x.mp4")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"turbovideo: cannot write --out {tmp_path / 'file' / 'x.mp4'}: {tmp_path / 'file'} is a file, not a folder\n"
    )


def test_every_option_reaches_the_generation(tmp_path, monkeypatch):
    # Each value differs from its default, so an option left out of the request shows.
    from turbovideo.pipeline import VideoPipeline

    seen = []

    def generate(self, request, *args, **kwargs):
        seen.append(request)
        raise KeyboardInterrupt  # recorded; the run needs to go no further

    monkeypatch.setattr(VideoPipeline, "generate", generate)
    options = {
        "num_steps": ("2", 2),
        "sigma_max": ("123", 123.0),
        "resolution": ("tiny", "tiny"),
        "aspect_ratio": ("3:4", "3:4"),
        "num_frames": ("9", 9),
        "seed": ("17", 17),
        "num_samples": ("3", 3),
        "fps": ("24", 24),
        "sla_topk": ("0.25", 0.25),
        "boundary": ("0.5", 0.5),
    }
    argv = [arg for name, (text, _) in options.items() for arg in (f"--{name}", text)]
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.mp4"), *argv, "--ode"])
    assert exited.value.code == 130
    (request,) = seen
    assert {name: getattr(request, name) for name in options} == {k: v for k, (_, v) in options.items()}
    assert request.ode is True


def test_seed_minus_one_draws_a_random_seed_and_says_which(tmp_path, capsys):
    seeds = set()
    for n in range(2):
        argv = ["generate", "--prompt", "x", "--num_frames", "5", "--num_steps", "1", "--seed", "-1"]
        assert main([*argv, "--out", str(tmp_path / f"{n}.mp4")]) == 0
        summary = capsys.readouterr().err.splitlines()[-1]
        seed = int(summary.split(", seed ")[1].split(",")[0])
        assert 0 <= seed <= 2**32 - 1
        seeds.add(seed)
    assert len(seeds) == 2  # two draws of 2**32 values: equal once in four billion runs


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (KeyboardInterrupt(), 130, "turbovideo: interrupted"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), 1, "CUDA out of memory"),
    ],
)
def test_interrupts_and_runtime_failures_are_one_line(tmp_path, capsys, monkeypatch, error, code, message):
    from turbovideo.pipeline import VideoPipeline

    def generate(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(VideoPipeline, "generate", generate)
    try:
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.mp4")])
    except SystemExit as exited:
        assert exited.code == code
    except BaseException as escaped:  # a KeyboardInterrupt escaping would stop the whole test run
        pytest.fail(f"{type(escaped).__name__} escaped main() as a traceback")
    else:
        pytest.fail("main() returned")
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_a_failed_run_leaves_no_folder_it_made_for_out(tmp_path, capsys, monkeypatch):
    from turbovideo.pipeline import VideoPipeline

    def generate(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(VideoPipeline, "generate", generate)
    (tmp_path / "kept").mkdir()
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "kept" / "new" / "deeper" / "x.mp4")])
    assert exited.value.code == 1
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


def test_a_video_ffmpeg_cannot_encode_is_one_line_naming_out(tmp_path, capfd, monkeypatch):
    from turbovideo.pipeline import video

    real = video.ffmpeg_command
    monkeypatch.setattr(
        video, "ffmpeg_command", lambda *args: [a.replace("libx264", "no_such_encoder") for a in real(*args)]
    )
    out = tmp_path / "x.mp4"
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--num_frames", "5", "--out", str(out)])
    assert exited.value.code == 1
    err = capfd.readouterr().err.splitlines()[-1]  # after the progress bar's line
    assert (
        err.startswith(f"turbovideo: could not write the video for --out {out}: ")
        and "no_such_encoder" in err
    )
    assert not list(tmp_path.iterdir())


class _Terminal(io.StringIO):
    """stderr on a terminal, where Ctrl-C arrives while the bar of ``stage`` reaches ``step``."""

    def __init__(self, stage: str, step: str) -> None:
        super().__init__()
        self.stage, self.step = stage, step

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.stage in text and self.step in text:
            raise KeyboardInterrupt
        return super().write(text)


def test_a_run_stopped_mid_stage_on_a_terminal_says_so_on_a_line_of_its_own(tmp_path, monkeypatch):
    terminal = _Terminal("denoise", "3/4")
    monkeypatch.setattr(sys, "stderr", terminal)
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--num_frames", "5", "--out", str(tmp_path / "x.mp4")])
    assert exited.value.code == 130
    lines = terminal.getvalue().split("\n")
    assert lines[-2] == "turbovideo: interrupted; no video was written"
    assert lines[-3].startswith("\rdenoise") and lines[-3].endswith("2/4")  # the bar so far, ended
    assert not list(tmp_path.iterdir())


class _ClosedPipe(io.StringIO):
    """stderr piped into a reader that has gone (``generate ... 2>&1 | head``)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stderr_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", _ClosedPipe())
    out = tmp_path / "x.mp4"
    assert main(["generate", "--prompt", "x", "--num_frames", "5", "--out", str(out)]) == 0
    assert _frames(out)[1] == 5


def test_output_read_by_a_reader_that_stops_early_still_succeeds(tmp_path):
    # `generate ... 2>&1 | head -c 1`: both streams close under the run; the video is written all the same.
    out = tmp_path / "x.mp4"
    argv = [
        *GENERATE,
        "--prompt",
        "x",
        "--num_frames",
        "5",
        "--out",
        str(out),
    ]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run.stdout.read(1)
    run.stdout.close()
    assert run.wait(timeout=300) == 0
    assert _frames(out)[1] == 5


def test_an_interrupt_with_stderr_closed_still_exits_130(tmp_path, monkeypatch):
    class ClosedTerminal(_Terminal):
        """Closed by the reader together with the Ctrl-C (at denoise 3/4): later writes fail."""

        interrupted = False

        def write(self, text: str) -> int:
            if self.interrupted:
                raise BrokenPipeError(32, "Broken pipe")
            self.interrupted = self.stage in text and self.step in text
            return super().write(text)

    monkeypatch.setattr(sys, "stderr", ClosedTerminal("denoise", "3/4"))
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--num_frames", "5", "--out", str(tmp_path / "x.mp4")])
    assert exited.value.code == 130


def test_an_interrupt_while_torch_imports_is_not_lost(tmp_path, monkeypatch, ctrl_c_handled):
    # torch catches a failed numpy import (a Ctrl-C landing inside it) and runs on: the run went on to
    # write the video and exit 0. The interrupt now waits for the imports to end, then stops the run.
    import builtins
    import signal

    real_import = builtins.__import__

    def import_catching_the_interrupt(name, *args, **kwargs):
        if name == "turbovideo.pipeline":
            try:
                # Ctrl-C, delivered inside the import (to this thread: os.kill lets the kernel pick any of
                # the process's threads, and the main thread may then see it only after the import) ...
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass  # ... which swallows it, as torch does around numpy
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_catching_the_interrupt)
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--num_frames", "5", "--out", str(tmp_path / "x.mp4")])
    assert exited.value.code == 130
    assert not list(tmp_path.iterdir())


def test_a_run_started_with_stderr_closed_writes_its_video_and_only_paths_on_stdout(tmp_path):
    # `generate ... 2>&-`: Python has no sys.stderr. The run failed at the progress bar (exit 1, no word),
    # and a bad value's one line went to stdout, where scripts read the video paths.
    out = tmp_path / "x.mp4"
    argv = [*GENERATE, "--prompt", "x", "--num_frames", "5", "--out", str(out)]
    done = subprocess.run(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        timeout=300,
        text=True,
        preexec_fn=lambda: os.close(2),
    )
    assert done.returncode == 0 and done.stdout == f"{out}\n"
    assert _frames(out)[1] == 5
    bad = subprocess.run(
        [*argv, "--num_steps", "9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        timeout=120,
        text=True,
        preexec_fn=lambda: os.close(2),
    )
    assert bad.returncode == 2 and bad.stdout == ""


def test_a_sample_name_taken_by_a_directory_is_refused_before_the_models_load(tmp_path, capsys, monkeypatch):
    # It was found after the run: exit 1 naming the scratch file, with clip_0.mp4 written and clip_1 not.
    from turbovideo.pipeline import VideoPipeline

    def load(*args, **kwargs):
        raise AssertionError("loaded the models for samples that cannot be written")

    monkeypatch.setattr(VideoPipeline, "load", load)
    (tmp_path / "clip_1.mp4").mkdir()
    out = tmp_path / "clip.mp4"
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--num_samples", "2", "--out", str(out)])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"turbovideo: --out {out}: a sample's file {tmp_path / 'clip_1.mp4'} is a directory; name another file\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["clip_1.mp4"]


def test_another_users_file_in_a_sticky_folder_is_refused_before_the_models_load(
    tmp_path, capsys, monkeypatch
):
    # os.replace gets EPERM there (a shared /tmp): found only after the whole run, exit 1, before.
    from turbovideo.pipeline import VideoPipeline

    def load(*args, **kwargs):
        raise AssertionError("loaded the models for an --out that cannot be replaced")

    monkeypatch.setattr(VideoPipeline, "load", load)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    theirs = shared / "x.mp4"
    theirs.write_bytes(b"")
    if os.geteuid() != 0:
        pytest.skip("making another user's file needs root")
    os.chown(theirs, 4321, 4321)
    monkeypatch.setattr(os, "geteuid", lambda: 1234)  # this user: neither root nor an owner
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--out", str(theirs)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"turbovideo: --out {theirs}: {theirs} is another user's file")
        and err.count("\n") == 1
    )


def test_a_video_path_that_is_not_text_in_the_terminals_encoding_is_printed_as_its_bytes(tmp_path):
    out = tmp_path / os.fsdecode(b"clip\xff.mp4")
    done = subprocess.run(
        [*GENERATE, "--prompt", "x", "--num_frames", "5", "--out", str(out)],
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},  # strict, as under an en_US.UTF-8 locale
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout == bytes(tmp_path) + b"/clip\xff.mp4\n"
    assert _frames(out)[1] == 5


def test_a_prompt_too_long_for_the_text_encoder_is_said_once(tmp_path):
    # The tokenizer's log line said it first ("WARNING turbovideo.models.tokenizer: prompt 0 has ...").
    out = tmp_path / "x.mp4"
    argv = [*GENERATE, "--prompt", "fox " * 600, "--num_frames", "5", "--num_steps", "1", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "tokens" in line]
    assert len(said) == 1 and said[0].startswith("turbovideo: warning: the prompt has ")


def test_a_terminated_run_is_one_line_and_leaves_no_scratch_folder(tmp_path):
    # `timeout 60 python -m turbovideo ...` or `kill`: the run died where it stood and left its hidden
    # scratch folder (.turbovideo-*) in the output folder.
    import signal

    out = tmp_path / "x.mp4"
    run = subprocess.Popen(
        [*GENERATE, "--prompt", "x", "--num_frames", "5", "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in run.stderr:  # the models are loaded and the run is under way
        if line.startswith("encode"):
            break
    run.send_signal(signal.SIGTERM)
    rest = run.stderr.read()
    assert run.wait(timeout=120) == 128 + signal.SIGTERM
    assert rest.splitlines()[-1] == "turbovideo: terminated; no video was written"
    assert not list(tmp_path.iterdir())


def test_help_names_the_defaults_a_run_would_surprise_with(capsys):
    # --out and --seed had no help: a run without --out wrote output/generated_video.mp4 unannounced,
    # and every run without --seed drew seed 0 (the endpoint draws a random one).
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--out OUT the .mp4 to write; default: output/generated_video.mp4" in text
    assert "--seed SEED 0 to 4294967295, or -1 for a random one" in text and "default 0" in text
