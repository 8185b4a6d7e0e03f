"""scripts/download_checkpoints.py against the loopback Hub, run the way an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer, Served

from turbovideo.catalog import MODELS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download_checkpoints.py"
SPEC = MODELS["TurboWan2.1-T2V-1.3B-480P"]


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


@pytest.fixture
def hub():
    names = {(f.repo, f.filename) for q in (False, True) for f in SPEC.files(q)}
    files = {
        key: Served(os.urandom(1000 + i), lfs=key[1].endswith(".pth")) for i, key in enumerate(sorted(names))
    }
    with HubServer(files) as server:
        yield server


def test_both_variants_are_fetched_and_summed(hub, tmp_path):
    args = ("--model", SPEC.name, "--variant", "both", "--dest", str(tmp_path), "--token", "hf_script")
    done = run(*args, HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_from_env")
    assert done.returncode == 0, done.stderr
    assert {r.authorization for r in hub.requests if r.server == "hub" and r.file} == {"Bearer hf_script"}
    for quantized, variant in ((False, "bf16"), (True, "quant")):
        model_dir = tmp_path / "models" / f"{SPEC.name}-{variant}"
        for f in SPEC.files(quantized):
            assert (model_dir / f.filename).read_bytes() == hub.files[(f.repo, f.filename)].content
            assert f"{f.repo}/{f.filename}" in done.stdout
    total = sum(len(s.content) for s in hub.files.values())  # shared files once
    assert f"total {total / 1e9:.3f} GB" in done.stdout

    # A pre-seeded cache satisfies an offline check without a single request.
    seen = len(hub.requests)
    again = run("--model", SPEC.name, "--dest", str(tmp_path), HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="1")
    assert again.returncode == 0, again.stderr
    assert len(hub.requests) == seen


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("--model", "no-such-model"), {}, "unknown model"),
        (("--model", ""), {}, "error: --model names no model; use one of TurboWan"),  # said "set MODELS"
        (("--model", SPEC.name), {"HF_HUB_OFFLINE": "1"}, f"{SPEC.name}.pth is not in the cache"),
    ],
)
def test_failure_is_one_line_and_exit_1(tmp_path, args, env, expected):
    done = run(*args, "--dest", str(tmp_path), **env)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and expected in done.stderr


def test_random_weight_models_need_nothing(tmp_path):
    done = run("--model", "tiny", "--dest", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "tiny-t2v: seeded random weights" in done.stdout and "tiny-i2v" in done.stdout
    assert not (tmp_path / "cache").exists()


def test_dest_is_read_as_the_worker_reads_cache_dir(tmp_path):
    # An empty --dest (a "$VAR" that is unset) meant the current directory, and a "~" was taken
    # literally (--dest=~/x): the files landed where no worker looks for them.
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    for dest, expected in (("", tmp_path / "from-env"), ("~/cache ", home / "cache")):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--model", "tiny", f"--dest={dest}"],
            capture_output=True,
            text=True,
            cwd=work,
            env={**os.environ, "HOME": str(home), "CACHE_DIR": str(tmp_path / "from-env")},
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"in {expected}\n" in done.stdout


@pytest.mark.parametrize(
    ("name", "value"), [("HF_ENDPOINT", "https://huggingface.co "), ("HF_HUB_DOWNLOAD_TIMEOUT", "")]
)
def test_hub_settings_huggingface_hub_would_misread_are_one_line_as_at_the_worker(tmp_path, name, value):
    # Were: five retries against a host name ending in a space; an import-time traceback line for the timeout.
    done = run("--model", SPEC.name, "--dest", str(tmp_path), **{name: value})
    assert done.returncode == 1 and done.stderr.startswith(f"error: {name}={value!r} is not")
    assert done.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("below", ["", "cache"])
def test_a_dest_that_is_or_sits_under_a_file_is_named(hub, tmp_path, below):
    blocking = tmp_path / "file"
    blocking.write_text("x")
    dest = blocking / below if below else blocking
    done = run("--model", SPEC.name, "--dest", str(dest), HF_ENDPOINT=hub.endpoint)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert (
        f": {blocking} is a file, not a folder (CACHE_DIR; --dest of download_checkpoints.py)" in done.stderr
    )
