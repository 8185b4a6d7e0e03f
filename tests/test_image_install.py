"""The image's file set installs with builder/install.sh into a fresh venv, and the worker runs there.

This is the image build minus Docker and CUDA: exactly the paths the Dockerfile COPYs, the same
install script and pins (with CI's CPU torch), then the worker's local smoke test. It downloads the
runtime requirements (about 2 minutes here), so it is marked slow; CI runs it anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_image import (
    SPARGEATTN_IMPORTS,
    copy_sources,
    dockerfile_instructions,
    normalize,
    requirement_pins,
)

ROOT = Path(__file__).resolve().parents[1]
# Installed by the venv itself or by the install script, not pinned by the requirement files.
UNPINNED = {"pip", "setuptools", "torch", "triton", "turbovideo"}


def copy_build_context(dest: Path) -> None:
    for source in sorted(set(copy_sources(dockerfile_instructions()))):  # builder/ is copied by both stages
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, dest / source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (dest / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / source)


def clean_env(home: Path) -> dict[str, str]:
    """No RunPod, worker or Triton settings from the calling shell; pip keeps its configuration."""
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(("PIP_", "HTTP", "NO_PROXY"))}
    return {**env, "HOME": str(home)}


# What the venv takes with CI's torch (2.4 GB measured) plus pip's unpacked wheels while it installs.
VENV_BYTES = 3 << 30


@pytest.fixture
def venv(tmp_path):
    """A fresh venv, deleted afterwards: pytest keeps the last three runs' tmp_path, and three venvs
    would leave 7 GB behind, enough to fill a CI disk for the tests after this one."""
    free = shutil.disk_usage(tmp_path).free
    if free < VENV_BYTES:
        pytest.skip(
            f"needs {VENV_BYTES >> 30} GiB free for a venv with torch; {tmp_path} has {free >> 20} MiB"
        )
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_install_script_builds_a_working_worker(tmp_path, venv):
    app, home = tmp_path / "app", tmp_path / "home"
    home.mkdir()
    copy_build_context(app)
    python = venv / "bin" / "python"
    env = clean_env(home)

    started = time.monotonic()
    install = subprocess.run(
        ["bash", str(app / "builder" / "install.sh"), "--cpu"],
        env={**env, "PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    install_s = time.monotonic() - started
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    print(f"install.sh --cpu into a fresh venv: {install_s:.0f} s")

    # The worker must come from the venv, not from a source tree on sys.path.
    located = subprocess.run(
        [str(python), "-c", "import turbovideo.kernels, sys; print(turbovideo.kernels.__file__)"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert located.stdout.startswith(str(venv)), located.stdout

    frozen = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all"], env=env, capture_output=True, text=True, check=True
    )
    pins = {}
    for name in (
        "requirements-runtime.txt",
        "requirements-cpu.txt",
        "requirements-spargeattn.txt",
        "constraints.txt",
    ):
        pins.update(requirement_pins(ROOT / "builder" / name))
    for line in frozen.stdout.splitlines():
        name, _, version = line.partition("==")
        name = normalize(name.split(" @ ")[0])
        if name in UNPINNED:
            continue
        assert pins.get(name) == version, f"{name} {version} installed but pinned as {pins.get(name)}"

    # What the SpargeAttn wheel imports (the image installs that wheel with --no-deps).
    subprocess.run(
        [str(python), "-c", "import " + ", ".join(sorted(SPARGEATTN_IMPORTS))], cwd=home, env=env, check=True
    )

    started = time.monotonic()
    smoke = subprocess.run(
        [str(python), "handler.py", "--test_input", json.dumps({"input": {"prompt": "a red fox"}})],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(f"handler.py --test_input: {time.monotonic() - started:.0f} s")
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    videos = list((app / "outputs").rglob("*.mp4"))
    assert videos and videos[0].stat().st_size > 0
