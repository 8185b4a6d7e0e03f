"""scripts/bench_passes.py's smoke run: every pass it times runs, at a tiny shape, on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_smoke_run_times_every_pass_that_runs_without_cuda(tmp_path):
    out = tmp_path / "passes.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [
        sys.executable,
        str(ROOT / "scripts" / "bench_passes.py"),
        "--device",
        "cpu",
        "--shape",
        "tiny",
    ]
    result = subprocess.run(
        [*command, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = [row["name"] for row in rows]
    assert len(names) == 8 and not any("copy" in name or "fp8" in name for name in names)  # CUDA only
    assert all(row["shape"] == "tiny" and row["ms"] > 0 and row["moved_mb"] > 0 for row in rows)
    assert "RMSNorm + RoPE" in result.stdout.splitlines()[1]  # the table


def test_a_cpu_run_without_the_interpreter_is_a_one_line_exit(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / "scripts" / "bench_passes.py"), "--device", "cpu"]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "p.json")], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "bench_passes.py: --device cpu runs the Triton kernels interpreted: set TRITON_INTERPRET=1"
    )
