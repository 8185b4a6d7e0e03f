"""handler.py as RunPod runs it: --test_input (one job, exit code) and the local HTTP API with a bucket."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import imageio_ffmpeg
import pytest
from job_api import job_api
from s3_server import loopback_s3

REPO = Path(__file__).resolve().parents[1]
ACCESS_KEY = "AKIAHANDLERTEST00001"
SECRET_KEY = "handler-test-secret-key-0a1b2c3d4e5f"
HF_TOKEN = "hf_handlerTestTokenNotReal12345"
JOB = {"input": {"prompt": "a red fox", "num_frames": 5, "num_steps": 1, "seed": 3}}


def worker_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test process's environment minus anything that would make the worker think it is on RunPod."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "BUCKET_", "MODELS"))}
    defaults = {
        "MODELS": "tiny-t2v",
        "CACHE_DIR": str(tmp_path / "cache"),
        "OUTPUT_DIR": str(tmp_path / "outputs"),
    }
    env.update({**defaults, "OMP_NUM_THREADS": "2", **extra})
    return env


def run_in_production(tmp_path: Path, timeout: float = 180, **extra: str) -> tuple[list[dict], str]:
    """``python handler.py`` in RunPod's job loop (the SDK's fitness checks run first) against a loopback
    job API holding one job: the answers the worker posted, and its output. The worker is stopped once
    it has answered, or has exited."""
    with job_api([{"id": "job-1", "input": JOB["input"]}]) as api:
        log = (tmp_path / "worker.log").open("w+")
        env = worker_env(tmp_path, **api.env(), **extra)
        worker = subprocess.Popen(
            [sys.executable, "handler.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + timeout
            while worker.poll() is None and not api.answered.wait(0.5):
                assert time.monotonic() < deadline, "the worker neither answered nor exited"
        finally:
            worker.terminate()
            worker.wait(30)
        log.seek(0)
        return api.results, log.read()


def run_in_repo(argv: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``argv`` run from the repository root as a user would, output captured as text."""
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_video(path) -> tuple[int, tuple[int, int]]:
    frames = imageio_ffmpeg.read_frames(str(path))
    meta = next(frames)
    return sum(1 for _ in frames), tuple(meta["size"])


def test_quickstart_runs_handler_test_input_and_copies_a_playable_video(tmp_path):
    # The script a user runs: handler.py --test_input on the tiny model, no bucket.
    out = tmp_path / "fox.mp4"
    fields = json.dumps({k: v for k, v in JOB["input"].items() if k != "prompt"})
    mine = tmp_path / "outputs" / "quickstart" / "mine.txt"  # a user's folder that happens to be named so
    mine.parent.mkdir(parents=True)
    mine.write_text("keep")
    run = run_in_repo(
        ["bash", "scripts/runpod_quickstart.sh", "a red fox", str(out), fields],
        worker_env(tmp_path, MODELS="", BUCKET_NAME="ignored"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert read_video(out) == (5, (112, 64))
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["quickstart"]  # its job folder went
    assert mine.read_text() == "keep"
    assert "'seed': 3" in run.stdout and "'model': 'tiny-t2v'" in run.stdout


def test_quickstart_keeps_the_tiny_models_it_was_given(tmp_path):
    # Was: MODELS=tiny-t2v on a CPU was called a model that needs a GPU and widened to both tiny models.
    out = tmp_path / "fox.mp4"
    fields = json.dumps({k: v for k, v in JOB["input"].items() if k != "prompt"})
    run = run_in_repo(
        ["bash", "scripts/runpod_quickstart.sh", "a red fox", str(out), fields],
        worker_env(tmp_path, MODELS=" tiny-t2v"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "needs a CUDA GPU" not in run.stderr and "serving tiny-t2v\n" in run.stderr


def test_quickstart_copies_only_this_runs_videos_and_finds_a_padded_output_dir(tmp_path):
    # A container's shell gets the same pid every run, so an earlier run's folder (a failed copy, an
    # interrupt) can bear this run's name; and OUTPUT_DIR pasted with a space is trimmed by the worker.
    out = tmp_path / "fox.mp4"
    fields = json.dumps({"num_frames": 5, "num_steps": 1})
    script = (
        'mkdir -p "$OUTPUT_DIR/quickstart-$$" && echo stale > "$OUTPUT_DIR/quickstart-$$/sample_1.mp4" && '
        'OUTPUT_DIR="$OUTPUT_DIR " exec bash scripts/runpod_quickstart.sh "a red fox" "$0" "$1"'
    )
    run = run_in_repo(["bash", "-c", script, str(out), fields], worker_env(tmp_path, MODELS=""))
    assert run.returncode == 0, run.stdout + run.stderr
    assert read_video(out) == (5, (112, 64))
    assert not (tmp_path / "fox_1.mp4").exists()


def test_quickstart_writes_every_sample_into_a_new_folder(tmp_path):
    # A real model asked for where no GPU is usable: the script runs the tiny ones instead.
    out = tmp_path / "new" / "fox.mp4"
    fields = json.dumps({"num_frames": 5, "num_steps": 1, "num_samples": 2})
    run = run_in_repo(
        ["bash", "scripts/runpod_quickstart.sh", "a red fox", str(out), fields],
        worker_env(tmp_path, MODELS="TurboWan2.1-T2V-1.3B-480P", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["fox_0.mp4", "fox_1.mp4"]
    assert "needs a CUDA GPU and none is usable here; running the tiny CPU models instead" in run.stderr


@pytest.mark.parametrize("fields", ['{"seed": 7', "[1, 2]"])
def test_quickstart_with_bad_extra_fields_says_so_in_one_line(tmp_path, fields):
    run = run_in_repo(
        ["bash", "scripts/runpod_quickstart.sh", "a red fox", str(tmp_path / "x.mp4"), fields],
        worker_env(tmp_path, MODELS=""),
        timeout=60,
    )
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert run.stderr.startswith("the extra request fields")
    assert list((tmp_path / "outputs").iterdir()) == []  # the job folder it made is gone


def test_quickstart_without_the_project_installed_says_so_in_one_line(tmp_path):
    # A fresh checkout run before its setup: the script said MODELS needed a GPU, then a traceback.
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {
        k: v for k, v in worker_env(tmp_path, MODELS="TurboWan2.1-T2V-1.3B-480P").items() if k != "PYTHONPATH"
    }
    for python, expected in (
        (bare / "bin" / "python", "cannot import torch runpod turbovideo"),
        (bare / "nope", "does not run"),
    ):
        run = run_in_repo(
            ["bash", "scripts/runpod_quickstart.sh", "a red fox", str(tmp_path / "x.mp4")],
            {**env, "PYTHON": str(python)},
            timeout=60,
        )
        assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
        assert expected in run.stderr and "First two commands" in run.stderr


def test_test_input_with_a_failed_start_prints_the_error_and_exits_1(tmp_path):
    run = run_in_repo(
        [sys.executable, "handler.py", "--test_input", json.dumps(JOB)],
        worker_env(tmp_path, MODELS="wan-9000"),
        timeout=120,
    )
    assert run.returncode == 1
    assert "E_STARTUP: MODELS='wan-9000' is not valid" in run.stdout


def test_a_log_level_the_sdk_refuses_is_a_failed_start_not_a_crash(tmp_path):
    # The SDK raises on it when imported, before any handler exists: the worker crash-looped.
    run = run_in_repo(
        [sys.executable, "handler.py", "--test_input", json.dumps(JOB)],
        worker_env(tmp_path, RUNPOD_LOG_LEVEL="WARNING"),
        timeout=120,
    )
    assert run.returncode == 1
    assert "E_STARTUP: RUNPOD_LOG_LEVEL='WARNING' is not valid; use one of" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


@pytest.mark.parametrize(("level", "sdk_info"), [("", True), (" warn\n", False)])
def test_an_empty_or_padded_log_level_is_taken_as_the_others_are(tmp_path, level, sdk_info):
    run = run_in_repo(
        [sys.executable, "handler.py", "--test_input", json.dumps(JOB)],
        worker_env(tmp_path, RUNPOD_LOG_LEVEL=level),
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # Empty: INFO; padded WARN: the SDK's own INFO lines are gone.
    assert ("Job local_test completed successfully" in run.stdout + run.stderr) is sdk_info


@pytest.mark.parametrize("job", ["not json", '"a red fox"', "{}", "[]", '{"input": null}'])
def test_a_malformed_test_input_is_one_line_before_any_model_loads(tmp_path, job):
    # MODELS names a checkpoint that is not there: reaching the start would fail differently.
    run = run_in_repo(
        [sys.executable, "handler.py", "--test_input", job],
        worker_env(tmp_path, MODELS="TurboWan2.1-T2V-1.3B-480P", HF_HUB_OFFLINE="1"),
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.startswith("--test_input ") and run.stderr.count("\n") == 1, run.stderr
    assert "Traceback" not in run.stdout + run.stderr


def test_handler_py_where_there_is_no_test_input_json_says_so_before_any_model_loads(tmp_path):
    # The SDK said "test_input.json not found" only once every model had loaded (minutes on a GPU).
    run = subprocess.run(
        [sys.executable, str(REPO / "handler.py")],
        cwd=tmp_path,
        env=worker_env(tmp_path, MODELS="TurboWan2.1-T2V-1.3B-480P", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.startswith(f"no test_input.json in {tmp_path}") and run.stderr.count("\n") == 1, (
        run.stderr
    )


def test_test_input_json_is_a_valid_request():
    from turbovideo.worker.schema import parse_request

    parse_request(json.loads((REPO / "test_input.json").read_text())["input"])


@pytest.fixture
def bucket():
    with loopback_s3() as server:
        yield server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=180) as answer:
        return json.loads(answer.read())


def test_local_api_uploads_to_the_bucket_and_logs_no_secrets(tmp_path, bucket):
    endpoint, admin = bucket
    port = free_port()
    env = worker_env(
        tmp_path,
        BUCKET_ENDPOINT_URL=endpoint,
        BUCKET_ACCESS_KEY_ID=ACCESS_KEY,
        BUCKET_SECRET_ACCESS_KEY=SECRET_KEY,
        BUCKET_NAME="videos",
        BUCKET_PREFIX="api",
        HF_TOKEN=HF_TOKEN,
    )
    log = (tmp_path / "worker.log").open("w+")
    worker = subprocess.Popen(
        [
            sys.executable,
            "handler.py",
            "--rp_serve_api",
            "--rp_api_host",
            "127.0.0.1",
            "--rp_api_port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert worker.poll() is None, "the worker exited"
            try:
                urllib.request.urlopen(f"{base}/openapi.json", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the worker did not start serving"
                time.sleep(0.5)

        done = post(f"{base}/runsync", JOB)
        assert done["status"] == "COMPLETED", done
        output = done["output"]
        job_id = done["id"]
        for url, key, content_type in [
            (output["video_url"], f"api/{job_id}/sample_0.mp4", "video/mp4"),
            (output["thumbnail_url"], f"api/{job_id}/thumbnail.jpg", "image/jpeg"),
        ]:
            stored = admin.get_object(Bucket="videos", Key=key)
            with urllib.request.urlopen(url, timeout=10) as answer:
                fetched = answer.read()
                assert answer.headers["Content-Type"] == content_type == stored["ContentType"]
            assert fetched == stored["Body"].read()
        (tmp_path / "fetched.mp4").write_bytes(urllib.request.urlopen(output["video_url"], timeout=10).read())
        assert read_video(tmp_path / "fetched.mp4") == (5, (112, 64))

        failed = post(f"{base}/runsync", {"input": {"prompt": "a", "num_frames": 80}})
        assert failed["status"] == "FAILED"
        assert failed["error"] == "E_INPUT: num_frames must be 4k+1 between 5 and 161, got 80"
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    log.seek(0)
    logged = log.read()
    assert "worker ready: serving tiny-t2v" in logged
    signature = output["video_url"].split("X-Amz-Signature=")[1].split("&")[0]
    for secret in (ACCESS_KEY, SECRET_KEY, HF_TOKEN, signature):
        assert secret not in logged


def test_a_failed_start_is_answered_even_where_a_runpod_system_check_would_stop_the_worker(tmp_path):
    # The SDK's checks run after the start: one that failed (here too little free memory) stopped the
    # worker with os._exit before it took a job, so RunPod restarted it into the same failure, unanswered.
    results, log = run_in_production(tmp_path, MODELS="wan-9000", RUNPOD_MIN_MEMORY_GB="1000000")
    assert len(results) == 1, log
    assert results[0]["error"].startswith("E_STARTUP: MODELS='wan-9000' is not valid"), results
    assert "Fitness check failed" not in log


def test_a_worker_that_asks_to_be_replaced_takes_no_further_job(tmp_path):
    # A real model on a pod without CUDA asks for a fresh worker (a newer host driver may be elsewhere).
    # The answer's refresh_worker only marks that job: the worker took and failed every queued job.
    jobs = [{"id": f"job-{i}", "input": JOB["input"]} for i in (1, 2)]
    with job_api(jobs) as api:
        env = worker_env(tmp_path, **api.env(), MODELS="TurboWan2.1-T2V-1.3B-480P", CUDA_VISIBLE_DEVICES="")
        worker = subprocess.Popen(
            [sys.executable, "handler.py"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            assert worker.wait(timeout=120) == 0
        finally:
            worker.kill()
    assert [r["error"].split(":")[0] for r in api.results] == ["E_STARTUP"]
    assert api.results[0]["stopPod"] is True and [job["id"] for job in api.jobs] == ["job-2"]


def test_a_fitness_check_setting_the_sdk_cannot_read_is_answered_not_a_crash_after_loading(tmp_path):
    # The SDK reads it with float() once the models have loaded: the worker stopped with a traceback.
    results, log = run_in_production(tmp_path, RUNPOD_MIN_MEMORY_GB="4GB")
    assert len(results) == 1, log
    assert results[0]["error"].startswith("E_STARTUP: RUNPOD_MIN_MEMORY_GB='4GB' is not valid"), results
    assert "Traceback" not in log


def test_a_worker_the_sdk_memory_check_would_stop_answers_why(tmp_path):
    # The SDK checks free memory only after the start: with the models loaded it found too little and
    # stopped the worker with os._exit, which RunPod restarted into the same wall, no job ever answered.
    results, log = run_in_production(tmp_path, RUNPOD_MIN_MEMORY_GB="1000000")
    assert len(results) == 1, log
    assert results[0]["error"].startswith(
        "E_STARTUP: RunPod's memory check would stop this worker before its first job: with the models loaded "
    ), results
    assert "needs 1000000 GiB (RUNPOD_MIN_MEMORY_GB)" in results[0]["error"]
    assert "Fitness check failed" not in log


@pytest.mark.parametrize("name", ["RUNPOD_GPU_TEST_TIMEOUT", "RUNPOD_GPU_MAX_ERROR_MESSAGES"])
def test_a_gpu_check_setting_the_sdk_cannot_read_is_answered_not_a_crash_after_loading(tmp_path, name):
    # The SDK imports its GPU check, which reads these with int(), in its job loop after the start, even
    # with its system checks skipped: the worker stopped with a traceback, no job answered.
    results, log = run_in_production(tmp_path, **{name: "60s"})
    assert len(results) == 1, log
    assert results[0]["error"].startswith(f"E_STARTUP: {name}='60s' is not valid"), results
    assert "Traceback" not in log
