"""The benchmark scripts' shared argument checks: one line, before any benchmark runs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turbovideo.benchmark import benchmark_device, peak_gib


def test_a_device_that_is_not_one_is_a_one_line_exit():
    with pytest.raises(SystemExit, match=r"bench\.py: --device must be cuda, cuda:N or cpu, got 'gpu'"):
        benchmark_device("bench.py", "gpu", cpu_smoke=True)


@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_a_device_type_torch_knows_but_the_benchmarks_do_not_run_on_is_a_one_line_exit(device):
    # torch.device accepts these; the benchmarks then failed with a traceback minutes later.
    with pytest.raises(SystemExit, match=rf"bench\.py: --device must be cuda, cuda:N or cpu, got '{device}'"):
        benchmark_device("bench.py", device, cpu_smoke=True)


def test_the_results_file_is_checked_before_any_run(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"bench\.py: cannot write --out .*file/r\.json"):
        benchmark_device("bench.py", "cpu", cpu_smoke=True, out=tmp_path / "file" / "r.json")
    assert benchmark_device("bench.py", "cpu", out=tmp_path / "new" / "r.json").type == "cpu"
    assert (tmp_path / "new").is_dir()


def test_a_results_path_that_is_a_directory_is_refused_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match=r"bench\.py: cannot write --out .*: Is a directory"):
        benchmark_device("bench.py", "cpu", cpu_smoke=True, out=tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_peak_memory_is_the_benchmarked_device_s():
    torch.cuda.reset_peak_memory_stats("cuda:1")
    block = torch.empty(2**30, dtype=torch.uint8, device="cuda:1")
    assert peak_gib("cuda:1") >= 1.0
    del block


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_the_memory_benchmark_checks_its_cases_and_needs_a_gpu(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "bench_memory.py"

    def run(*args):
        return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)

    bad = run("--model", "tiny-t2v", "--case", "480p:81", "--out", str(tmp_path / "m.json"))
    assert bad.returncode == 2 and "expected resolution:num_frames:num_samples, got '480p:81'" in bad.stderr
    done = run("--model", "tiny-t2v", "--out", str(tmp_path / "m.json"))
    assert done.returncode == 1 and done.stderr.strip() == "bench_memory.py needs a CUDA GPU"


@pytest.mark.parametrize("flag", ["0", "-3", "two"])
def test_a_count_of_timed_calls_below_one_is_a_usage_error(flag):
    # --iters 0 ended in statistics' "no median for empty data" after the models were built.
    script = Path(__file__).parents[1] / "scripts" / "bench_vae.py"
    bad = subprocess.run(
        [sys.executable, script, "--iters", flag], capture_output=True, text=True, timeout=120
    )
    assert (
        bad.returncode == 2 and f"--iters: must be a whole number of at least 1, got '{flag}'" in bad.stderr
    )
