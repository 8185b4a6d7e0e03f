"""Compile caches go to the volume when it can take them, to local disk otherwise, and never raise."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hub_server import read_only_dir

from turbovideo.worker import compile_cache
from turbovideo.worker.compile_cache import configure_compile_cache


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    # The local fallback lives under the temp dir; keep it inside this test's directory.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "local"))
    (tmp_path / "local").mkdir()


def test_writable_volume_is_used(tmp_path, caplog):
    volume = tmp_path / "volume"
    with caplog.at_level(logging.WARNING):
        assert configure_compile_cache(volume) == volume / "triton"
    assert os.environ["TRITON_CACHE_DIR"] == str(volume / "triton")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(volume / "inductor")
    assert list((volume / "triton").iterdir()) == []  # the probe cleaned up after itself
    assert caplog.records == []


def test_read_only_volume_falls_back_with_one_log_line(tmp_path, caplog):
    with read_only_dir(tmp_path / "volume") as volume, caplog.at_level(logging.WARNING):
        used = configure_compile_cache(volume)
    assert used == tmp_path / "local" / "turbovideo-compile" / "triton"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(
        tmp_path / "local" / "turbovideo-compile" / "inductor"
    )
    assert [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()] != []
    assert len(caplog.records) == 1


def test_nearly_full_volume_falls_back(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        used = configure_compile_cache(tmp_path / "volume", min_free_bytes=1 << 62)
    assert used == tmp_path / "local" / "turbovideo-compile" / "triton"
    assert "nearly full" in caplog.records[0].getMessage()


@pytest.mark.parametrize(("free_mib", "on_volume"), [(900, False), (1536, True)])
def test_the_default_free_space_line_is_one_gib(tmp_path, monkeypatch, free_mib, on_volume):
    # No nearly full filesystem can be made here without root, so the volume's free space is reported
    # as free_mib; the write probe still runs on the real disk.
    volume = tmp_path / "volume"
    real = shutil.disk_usage

    def usage(path):
        found = real(path)
        if Path(path).is_relative_to(volume):
            return found._replace(free=free_mib << 20)
        return found

    monkeypatch.setattr(compile_cache.shutil, "disk_usage", usage)
    used = configure_compile_cache(volume)
    assert used == (volume / "triton" if on_volume else tmp_path / "local" / "turbovideo-compile" / "triton")


def test_existing_triton_cache_dir_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert configure_compile_cache(tmp_path / "volume") == tmp_path / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "volume" / "inductor")


def test_a_chosen_triton_cache_dir_that_refuses_writes_is_replaced(tmp_path, monkeypatch, caplog):
    with read_only_dir(tmp_path / "mine") as mine, caplog.at_level(logging.WARNING):
        monkeypatch.setenv("TRITON_CACHE_DIR", str(mine))
        assert configure_compile_cache(tmp_path / "volume") == tmp_path / "volume" / "triton"
    assert (
        caplog.records[0].getMessage().startswith(f"compile cache: TRITON_CACHE_DIR={mine} is not writable")
    )


def test_nothing_usable_leaves_defaults_and_does_not_raise(tmp_path):
    with read_only_dir(tmp_path / "volume") as volume, read_only_dir(tmp_path / "local"):
        assert configure_compile_cache(volume) is None
    assert "TRITON_CACHE_DIR" not in os.environ and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert not Path(tmp_path / "local" / "turbovideo-compile").exists()


@pytest.mark.parametrize("value", [" ", "\t"])
def test_a_blank_cache_dir_setting_counts_as_unset(tmp_path, monkeypatch, value):
    # An endpoint field left as a blank: taken as set, it cached kernels in a folder named " " in the
    # working directory (the container's disk), not on the volume every worker shares.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRITON_CACHE_DIR", value)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", value)
    assert configure_compile_cache(tmp_path / "volume") == tmp_path / "volume" / "triton"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "volume" / "inductor")
    assert not (tmp_path / value).exists()


def test_a_chosen_cache_dir_is_trimmed(tmp_path, monkeypatch):
    # A pasted trailing space would make a second cache folder "triton " beside the one meant.
    monkeypatch.setenv("TRITON_CACHE_DIR", f"{tmp_path / 'mine'} ")
    assert configure_compile_cache(tmp_path / "volume") == tmp_path / "mine"
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")


def test_a_chosen_cache_dir_that_refuses_writes_is_unset_when_nothing_else_works(tmp_path, monkeypatch):
    # Left set, Triton would still write into it and fail at the first compile.
    with (
        read_only_dir(tmp_path / "mine") as mine,
        read_only_dir(tmp_path / "volume") as volume,
        read_only_dir(tmp_path / "local"),
    ):
        monkeypatch.setenv("TRITON_CACHE_DIR", str(mine))
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mine))
        assert configure_compile_cache(volume) is None
    assert "TRITON_CACHE_DIR" not in os.environ and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


_FULL_DISK_CHILD = """
import resource, signal, sys
from pathlib import Path
from turbovideo.worker import compile_cache
from turbovideo.worker.compile_cache import configure_compile_cache
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
print(configure_compile_cache(Path(sys.argv[1]), min_free_bytes=0))
"""


def test_a_volume_that_takes_an_empty_file_but_no_data_is_not_used(tmp_path):
    # A full volume or a spent quota still creates empty files: the probe must write real blocks.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path / "volume")],
        capture_output=True,
        text=True,
        env={**env, "TMPDIR": str(tmp_path / "local")},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert "not writable" in done.stderr
