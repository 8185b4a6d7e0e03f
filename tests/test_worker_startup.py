"""A failed start answers every job with one actionable E_STARTUP sentence instead of crash-looping."""

import asyncio
import inspect
import io
import logging
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch

from turbovideo.models.checkpoint import CheckpointError
from turbovideo.parallel import ParallelError
from turbovideo.pipeline import HostMemoryError
from turbovideo.pipeline.host_memory import GIB, HostMemory, read_host_memory
from turbovideo.worker.checkpoints import CheckpointDownloadError
from turbovideo.worker.config import ConfigError
from turbovideo.worker.logs import RedactSecrets, configure_logging, secret_values
from turbovideo.worker.startup import (
    MemoryCheckError,
    check_memory_fitness,
    check_test_input,
    create_handler,
    describe_startup_error,
)

JOB = {"id": "job-1", "input": {"prompt": "a red fox"}}


def test_bad_models_are_answered_to_every_job(tmp_path):
    handler = create_handler({"MODELS": "wan-9000", "CACHE_DIR": str(tmp_path)})
    for _ in range(3):
        answer = handler(dict(JOB))
        assert set(answer) == {"error"}
        assert answer["error"].startswith(
            "E_STARTUP: MODELS='wan-9000' is not valid: unknown model 'wan-9000'"
        )


@pytest.mark.parametrize(
    "env, skipped",
    [
        ({}, False),  # local: the SDK runs no checks, and a user's own setting stays untouched
        ({"RUNPOD_WEBHOOK_GET_JOB": "https://api/job-take/$ID"}, True),
    ],
)
def test_a_failed_start_skips_the_sdk_system_checks_that_would_stop_it(tmp_path, monkeypatch, env, skipped):
    monkeypatch.delenv("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", raising=False)
    create_handler({"MODELS": "wan-9000", "CACHE_DIR": str(tmp_path), **env})
    assert (os.environ.get("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS") == "true") is skipped


def test_a_started_worker_keeps_the_sdk_system_checks(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", raising=False)
    env = {"MODELS": "tiny-t2v", "CACHE_DIR": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "out")}
    create_handler({**env, "RUNPOD_WEBHOOK_GET_JOB": "https://api/job-take/$ID"})
    assert "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS" not in os.environ


def test_a_worker_runpods_memory_check_would_stop_answers_why_instead(tmp_path, monkeypatch):
    # The check runs after the start (the models loaded) and stopped the worker with os._exit: a crash loop.
    monkeypatch.delenv("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", raising=False)
    env = {"MODELS": "tiny-t2v", "CACHE_DIR": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "out")}
    on_runpod = {**env, "RUNPOD_WEBHOOK_GET_JOB": "https://api/job-take/$ID"}
    available = read_host_memory().available / GIB
    answer = create_handler({**on_runpod, "RUNPOD_MIN_MEMORY_GB": str(round(available + 1000))})(dict(JOB))
    assert re.fullmatch(
        r"E_STARTUP: RunPod's memory check would stop this worker before its first job: with the models loaded "
        # (on a GPU, other tests' pipelines may still hold pinned copies)
        r"\d+\.\d GiB of memory is available(?: \(the pinned copies of their idle weights take \d+\.\d GiB\))? "
        r"and it needs \d+ GiB \(RUNPOD_MIN_MEMORY_GB\); deploy on a GPU type "
        r"with more RAM, serve fewer MODELS, lower RUNPOD_MIN_MEMORY_GB, or set RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true",
        answer["error"],
    ), answer
    assert "refresh_worker" not in answer
    assert os.environ["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == "true"  # so that this answer reaches the jobs
    # Within the minimum, or with the checks off (or not running: locally), the worker serves.
    for served in (
        {**on_runpod, "RUNPOD_MIN_MEMORY_GB": "0.5"},
        {**on_runpod, "RUNPOD_MIN_MEMORY_GB": "1000000", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true"},
        {**env, "RUNPOD_MIN_MEMORY_GB": "1000000"},
    ):
        assert inspect.iscoroutinefunction(create_handler(served))  # the service's; a failed start's is not


def test_the_memory_check_compares_what_runpods_check_compares():
    check_memory_fitness(
        4.0, HostMemory(available=4 * GIB, limit_room=1 * GIB)
    )  # the cgroup is not its concern
    check_memory_fitness(0.0, HostMemory(available=0, limit_room=None))  # 0: the check does not run
    check_memory_fitness(4.0, None)  # nothing to read
    with pytest.raises(
        MemoryCheckError, match=r"available \(the pinned copies of their idle weights take 14\.0 GiB\)"
    ):
        check_memory_fitness(4.0, HostMemory(available=GIB, limit_room=None), held=14 * GIB)
    with pytest.raises(MemoryCheckError, match=r"3\.9 GiB of memory is available and it needs 4 GiB"):
        check_memory_fitness(4.0, HostMemory(available=4 * GIB - 100 * (1 << 20), limit_room=None))


def test_a_bucket_that_is_not_there_is_answered_before_any_model_loads(tmp_path, monkeypatch):
    from s3_server import loopback_s3

    from turbovideo.pipeline import VideoPipeline

    loads = []
    monkeypatch.setattr(VideoPipeline, "load", lambda *a, **k: loads.append(a))
    with loopback_s3("AKIASTARTUPTEST00001", "startup-secret-0123456789") as (endpoint, _):
        env = {
            "MODELS": "tiny-t2v",
            "CACHE_DIR": str(tmp_path),
            "BUCKET_ENDPOINT_URL": endpoint,
            "BUCKET_ACCESS_KEY_ID": "AKIASTARTUPTEST00001",
            "BUCKET_SECRET_ACCESS_KEY": "startup-secret-0123456789",
            "BUCKET_NAME": "renders",  # the server has only "videos"
        }
        answer = create_handler(env)(dict(JOB))
    assert answer == {
        "error": f"E_STARTUP: BUCKET_NAME 'renders' is not a bucket at {endpoint}: create it or correct "
        "BUCKET_NAME (NoSuchBucket)"
    }
    assert loads == []


def test_missing_models_on_runpod_is_answered(tmp_path):
    handler = create_handler({"RUNPOD_POD_ID": "pod", "CACHE_DIR": str(tmp_path)})
    assert handler(dict(JOB))["error"].startswith("E_STARTUP: MODELS is not set")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_real_models_without_cuda_on_runpod_ask_for_another_worker(tmp_path):
    env = {"RUNPOD_POD_ID": "pod", "MODELS": "TurboWan2.1-T2V-1.3B-480P", "CACHE_DIR": str(tmp_path)}
    answer = create_handler(env)(dict(JOB))
    # What to change, not only that CUDA is missing: a CPU endpoint, or hosts whose driver predates CUDA 12.8.
    assert answer["error"].startswith("E_STARTUP: no usable CUDA GPU on this worker")
    assert "GPU endpoint" in answer["error"] and "CUDA 12.8 or newer" in answer["error"]
    assert answer["refresh_worker"] is True
    assert not any(tmp_path.iterdir())  # failed before downloading anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failed_start_that_asks_for_another_worker_makes_the_sdk_take_no_further_job(tmp_path):
    sdk_config: dict = {}
    env = {"RUNPOD_POD_ID": "pod", "MODELS": "TurboWan2.1-T2V-1.3B-480P", "CACHE_DIR": str(tmp_path)}
    handler = create_handler(env, sdk_config)
    assert sdk_config == {}  # set with the first answer, which must still reach its job
    assert handler(dict(JOB))["refresh_worker"] is True
    assert sdk_config == {"refresh_worker": True}


def test_a_job_that_asks_for_another_worker_after_a_good_start_makes_the_sdk_take_no_further_job(
    tmp_path, monkeypatch
):
    # A disk too full to take a video: the answer asks for a fresh worker, and the service started by
    # create_handler passes that on to the SDK's config, as a failed start does.
    from turbovideo.pipeline import VideoPipeline
    from turbovideo.pipeline.video import EncodeError

    def full(*args, **kwargs):
        raise EncodeError(tmp_path / "sample_0.mp4", "Error writing trailer: No space left on device")

    sdk_config: dict = {}
    handler = create_handler({"MODELS": "tiny-t2v", "CACHE_DIR": str(tmp_path)}, sdk_config)
    monkeypatch.setattr(VideoPipeline, "generate", full)
    assert sdk_config == {}
    answer = asyncio.run(
        handler({"id": "job-full", "input": {"prompt": "a", "num_frames": 5, "num_steps": 1}})
    )
    assert answer["refresh_worker"] is True and answer["error"].startswith(
        "E_INTERNAL: ffmpeg could not write"
    )
    assert sdk_config == {"refresh_worker": True}


def test_a_gpu_check_setting_the_sdk_cannot_read_is_dropped_after_a_failed_start(tmp_path, monkeypatch):
    # The SDK imports its GPU check in every job loop and stopped with a traceback on it: the failed
    # start's answer (naming the setting) never reached a job.
    monkeypatch.setenv("RUNPOD_GPU_TEST_TIMEOUT", "1.5")
    monkeypatch.setenv("RUNPOD_GPU_MAX_ERROR_MESSAGES", "10")
    env = {
        "MODELS": "tiny",
        "CACHE_DIR": str(tmp_path),
        "RUNPOD_WEBHOOK_GET_JOB": "https://api/job-take/$ID",
        "RUNPOD_GPU_TEST_TIMEOUT": "1.5",
        "RUNPOD_GPU_MAX_ERROR_MESSAGES": "10",
    }
    answer = create_handler(env)(dict(JOB))
    assert answer["error"].startswith("E_STARTUP: RUNPOD_GPU_TEST_TIMEOUT='1.5' is not valid")
    assert "RUNPOD_GPU_TEST_TIMEOUT" not in os.environ
    assert os.environ["RUNPOD_GPU_MAX_ERROR_MESSAGES"] == "10"  # a readable one stays


def test_the_start_hands_sigterm_back_as_it_found_it(tmp_path):
    # Once started, a SIGTERM must reach whatever handled it before (the SDK's), not raise SystemExit
    # in the middle of a job.
    def before(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, before)
    try:
        create_handler({"MODELS": "wan-9000", "CACHE_DIR": str(tmp_path)})
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_io_error_anywhere_under_a_checkpoint_error_counts_as_a_failed_read():
    # torch raises its own errors while handling the file system's (implicitly chained, not "from").
    from turbovideo.worker.startup import _read_failed

    def checkpoint_error(*chain: BaseException) -> CheckpointError:
        error = CheckpointError("x.pth is truncated", path=Path("/c/x.pth"))
        below = error
        for exc in chain:
            below.__context__ = exc
            below = exc
        return error

    io_error = OSError(5, "Input/output error")
    assert _read_failed(checkpoint_error(io_error))
    assert _read_failed(checkpoint_error(RuntimeError("PytorchStreamReader failed"), io_error))
    assert not _read_failed(checkpoint_error(RuntimeError("PytorchStreamReader failed")))


def test_offline_without_a_cached_checkpoint_is_answered(tmp_path, caplog):
    env = {"MODELS": "TurboWan2.1-T2V-1.3B-480P", "HF_HUB_OFFLINE": "1", "CACHE_DIR": str(tmp_path)}
    error = create_handler(env)(dict(JOB))["error"]
    assert error.startswith("E_STARTUP: ") and "HF_HUB_OFFLINE" in error and "\n" not in error
    if not torch.cuda.is_available():  # off RunPod a real model on the CPU is allowed, and said to be slow
        assert "no usable CUDA GPU here: TurboWan2.1-T2V-1.3B-480P will run on the CPU" in caplog.text


@pytest.mark.parametrize(
    "exc, start, refresh",
    [
        (ConfigError("BUCKET_NAME missing"), "BUCKET_NAME missing", False),
        (
            CheckpointDownloadError("TurboDiffusion/x is gated; set HF_TOKEN"),
            "TurboDiffusion/x is gated",
            False,
        ),
        (
            CheckpointDownloadError("the Hub answered HTTP 503 for x.pth", transient=True),
            "the Hub answered HTTP 503 for x.pth; the worker asks to be replaced",
            True,
        ),
        (
            CheckpointError("checkpoint file /c/x.pth is truncated", path=Path("/c/x.pth")),
            "checkpoint file /c/x.pth is truncated; delete that file so the next start downloads it again",
            False,
        ),
        (  # whole bytes of another model: a new download would bring the same
            CheckpointError("x.pth does not fit Wan2.1-1.3B: it looks like a Wan2.1-14B checkpoint"),
            "x.pth does not fit Wan2.1-1.3B: it looks like a Wan2.1-14B checkpoint; downloading the file again "
            "would bring the same bytes",
            False,
        ),
        (torch.OutOfMemoryError("CUDA out of memory"), "the models do not fit in GPU memory", False),
        (  # the pipeline's own advice is for the command line: the worker names its settings
            HostMemoryError("model m moves its text encoder to host memory while idle, ...", "use a machine"),
            "model m moves its text encoder to host memory while idle, ...; deploy on a GPU type with more RAM (or "
            "more GPU memory, which keeps more of the model there), serve fewer MODELS, or set CHECKPOINT_VARIANT=quant",
            False,
        ),
        (  # a follower holds every served DiT: a fresh worker would run out the same way
            ParallelError(
                "GPU rank 1 failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 270 MiB"
            ),
            "the models do not fit in the memory of every GPU",
            False,
        ),
        (
            ParallelError("GPU rank 1 exited unexpectedly (exit code 7)"),
            "the multi-GPU group did not start",
            True,
        ),
        (RuntimeError("CUDA error: no kernel image is available\nfor execution"), "CUDA is unusable", True),
        (ImportError("No module named 'spas_sage_attn'"), "the worker could not start (ImportError:", False),
    ],
)
def test_startup_errors_become_one_sentence(exc, start, refresh):
    failure = describe_startup_error(exc)
    assert failure.message.startswith(start)
    assert "\n" not in failure.message
    assert failure.refresh is refresh


def test_the_startup_sentence_carries_no_secret(monkeypatch, tmp_path):
    # A library quoting the token in its error (huggingface_hub quoted a bad header) must not reach clients.
    def failing(env):
        raise ConfigError("request failed: Illegal header value b'Bearer hf_SECRETTOKEN123'")

    monkeypatch.setattr("turbovideo.worker.startup.load_config", failing)
    answer = create_handler({"HF_TOKEN": "hf_SECRETTOKEN123 ", "CACHE_DIR": str(tmp_path)})(dict(JOB))
    assert answer["error"] == "E_STARTUP: request failed: Illegal header value b'Bearer ***'"


def test_secret_values_include_what_clients_send():
    # Every process that logs (also the other GPUs' workers) must blank the trimmed token too.
    assert secret_values({"HF_TOKEN": "hf_SECRETTOKEN123\n", "OTHER": "x"}) == [
        "hf_SECRETTOKEN123\n",
        "hf_SECRETTOKEN123",
    ]


def test_redaction_blanks_secrets_and_signed_queries():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets(["hf_SECRETTOKEN123", "short"]))
    logger = logging.getLogger("test_worker_startup.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("token %s", "hf_SECRETTOKEN123")
        logger.warning(
            "url https://a.r2.cloudflarestorage.com/v/k.mp4?X-Amz-Algorithm=AWS4&X-Amz-Signature=abc123 done"
        )
        try:
            raise ValueError("bad token hf_SECRETTOKEN123")
        except ValueError:
            logger.exception("failed")
        logger.warning("a short word stays")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "hf_SECRETTOKEN123" not in text and "abc123" not in text
    assert "token ***" in text and "k.mp4?<signature redacted> done" in text
    assert "a short word stays" in text


def test_huggingface_hub_logs_once_through_the_redacting_handler(monkeypatch, capfd):
    import huggingface_hub.utils.logging  # noqa: F401  (adds its own stream handler at import)

    hub_logger = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hub_logger, "handlers", [logging.StreamHandler()])  # as its import leaves it
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    configure_logging([])
    logging.getLogger("huggingface_hub.file_download").warning(
        "Error while downloading from https://cdn/x?Expires=1&Signature=SECRETSIG: peer closed"
    )
    err = capfd.readouterr().err
    assert err.count("Error while downloading") == 1 and "SECRETSIG" not in err


def test_one_redacting_handler_prints_each_line(monkeypatch, capfd):
    root = logging.getLogger()
    sdk_style = logging.StreamHandler()  # what the runpod SDK's logging.basicConfig leaves on the root
    monkeypatch.setattr(root, "handlers", [sdk_style])
    configure_logging(["hf_SECRETTOKEN123"])
    configure_logging(["hf_SECRETTOKEN123"])
    assert [getattr(h, "turbovideo", False) for h in root.handlers] == [True]
    logging.getLogger("turbovideo.test").warning("token hf_SECRETTOKEN123")
    err = capfd.readouterr().err
    assert err.count("token ***") == 1 and "hf_SECRETTOKEN123" not in err


def test_a_line_logged_with_arguments_prints_once_redacted_and_whole(monkeypatch, capfd):
    # The redacted message replaces msg and args both: left with its args, the record fails to format,
    # and logging's own error report prints the arguments (the token among them) unredacted.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    configure_logging(["hf_SECRETTOKEN123"])
    logging.getLogger("turbovideo.test").warning("token %s, %d of %d files", "hf_SECRETTOKEN123", 3, 7)
    err = capfd.readouterr().err
    assert "turbovideo.test: token ***, 3 of 7 files" in err
    assert "hf_SECRETTOKEN123" not in err and "Logging error" not in err


def test_configuring_the_log_again_takes_the_new_secrets(monkeypatch, capfd):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    configure_logging(["hf_FIRSTTOKEN123"])
    configure_logging(["hf_SECONDTOKEN456"])
    logging.getLogger("turbovideo.test").warning("token hf_SECONDTOKEN456")
    err = capfd.readouterr().err
    assert "token ***" in err and "hf_SECONDTOKEN456" not in err


@pytest.mark.parametrize(
    ("level", "after"), [(logging.WARNING, logging.INFO), (logging.DEBUG, logging.DEBUG)]
)
def test_the_log_shows_info_lines_and_keeps_a_lower_level_already_set(monkeypatch, capfd, level, after):
    # Download progress and warm-up lines are INFO: the root logger's default (WARNING) would hide them.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    previous = root.level
    root.setLevel(level)
    try:
        configure_logging([])
        assert root.level == after
        logging.getLogger("turbovideo.test").info("fetched a file")
        assert "INFO turbovideo.test: fetched a file" in capfd.readouterr().err
    finally:
        root.setLevel(previous)  # setLevel, not an attribute: it also clears the loggers' level caches


@pytest.mark.parametrize(
    "query",
    [
        "?X-Amz-Algorithm=AWS4&X-Amz-Signature=abc123",
        "?x-amz-signature=abc123",
        "?Expires=1&Signature=abc123",
    ],
)
def test_signed_query_strings_are_redacted_whatever_their_case(query):
    text = RedactSecrets([]).redact(f"put https://bucket.example/v/k.mp4{query} failed")
    assert text == "put https://bucket.example/v/k.mp4?<signature redacted> failed"


@pytest.mark.parametrize("value", ["10s", "", "60.0"])
def test_a_hub_timeout_huggingface_hub_cannot_read_is_answered_not_a_crash(tmp_path, value):
    # huggingface_hub int()s these at import; the worker imports it before load_config. Fresh process:
    # this one has imported huggingface_hub already.
    import os
    import subprocess
    import sys

    code = (
        "from turbovideo.worker.startup import create_handler\n"
        "print(create_handler()({'id': 'j', 'input': {'prompt': 'a'}})['error'])"
    )
    env = {**os.environ, "HF_HUB_DOWNLOAD_TIMEOUT": value, "CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(f"E_STARTUP: HF_HUB_DOWNLOAD_TIMEOUT={value!r} is not valid")


@pytest.mark.parametrize(
    "contents, message",
    [
        (None, "no test_input.json in "),
        ("not json", "test_input.json is not valid JSON"),
        ("[]", 'test_input.json must be a JSON object with an "input" field'),
        ('{"input": null}', 'test_input.json must be a JSON object with an "input" field'),
    ],
)
def test_a_local_run_without_a_usable_test_input_json_stops_before_loading(
    tmp_path, monkeypatch, contents, message
):
    monkeypatch.chdir(tmp_path)
    if contents is not None:
        (tmp_path / "test_input.json").write_text(contents)
    with pytest.raises(SystemExit) as stopped:
        check_test_input([], {})
    assert str(stopped.value.code).startswith(message)


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--rp_serve_api", "--rp_api_port", "0"], {}),  # 0: any free port (8000 may be taken here)
        (["--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", "0"], {}),
        ([], {"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take"}),
        ([], {"RUNPOD_REALTIME_PORT": "8080"}),
        (["--test_input", '{"input": {"prompt": "a fox"}}'], {}),
    ],
)
def test_test_input_json_is_only_required_where_the_sdk_reads_it(tmp_path, monkeypatch, argv, env):
    monkeypatch.chdir(tmp_path)  # no test_input.json here
    check_test_input(argv, env)


def test_a_local_api_that_could_not_listen_stops_before_loading(tmp_path):
    # The SDK's server binds only once every model has loaded (minutes on a GPU), then exits 3 with
    # uvicorn's "address already in use"; a port past 65535 was announced as it was, and bound modulo 65536.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for argv, message in [
            (
                ["--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
                f"--rp_serve_api cannot listen on 127.0.0.1:{port} (Address already in use); another server "
                "holds that port: stop it or pick another --rp_api_port",
            ),
            (
                ["--rp_api_port", "99999"],
                "--rp_serve_api cannot listen on localhost:99999: --rp_api_port must be",
            ),
            (
                ["--rp_api_host", "no-such-host.invalid"],
                "--rp_serve_api cannot listen on no-such-host.invalid:8000: ",
            ),
        ]:
            with pytest.raises(SystemExit) as stopped:
                check_test_input(["--rp_serve_api", *argv], {})
            assert str(stopped.value.code).startswith(message)


def test_a_local_api_given_a_test_input_too_is_checked_before_loading():
    # The SDK serves the API when --rp_serve_api is given, --test_input or not (it ignores the job): the
    # port was not checked then, and uvicorn failed on it once every model had loaded.
    job = '{"input": {"prompt": "a fox"}}'
    with pytest.raises(SystemExit) as stopped:
        check_test_input(["--rp_serve_api", "--test_input", job, "--rp_api_port", "99999"], {})
    assert str(stopped.value.code).startswith("--rp_serve_api cannot listen on localhost:99999: ")


def test_a_local_api_with_several_workers_is_refused_before_loading():
    # The SDK hands uvicorn an app object, which it cannot run in several workers: it stopped after the load.
    with pytest.raises(SystemExit) as stopped:
        check_test_input(["--rp_serve_api", "--rp_api_port", "0", "--rp_api_concurrency", "2"], {})
    assert str(stopped.value.code).startswith("--rp_api_concurrency 2: the runpod SDK's local API serves one")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "host",
    [
        "",  # every interface, as uvicorn takes it
        pytest.param("::", marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 here")),
        pytest.param("::1", marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 here")),
    ],
)
def test_a_host_uvicorn_listens_on_is_not_refused(host):
    # The check bound IPv4 only, and refused "" as a name that does not resolve: "--rp_api_host ::" exited
    # with "(Unknown error -9)" where the SDK's server would have listened.
    check_test_input(["--rp_serve_api", "--rp_api_host", host, "--rp_api_port", "0"], {})


def test_a_memory_shortfall_never_reads_as_enough():
    # 3.96 GiB available against 4 needed read "4.0 GiB of memory is available and it needs 4 GiB".
    with pytest.raises(MemoryCheckError, match=r" 3\.9 GiB of memory is available and it needs 4 GiB "):
        check_memory_fitness(4.0, HostMemory(available=4 * GIB - 40 * (1 << 20), limit_room=None))


def test_port_flags_without_the_local_api_are_not_checked():
    # Without --rp_serve_api the SDK runs the job and opens no port: a port in use there is no reason to stop.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        check_test_input(
            ["--rp_api_host", "127.0.0.1", "--rp_api_port", str(port), "--test_input", '{"input": {}}'], {}
        )


def test_a_negative_local_api_port_is_one_line():
    with pytest.raises(SystemExit) as stopped:
        check_test_input(["--rp_serve_api", "--rp_api_port", "-1"], {})
    assert (
        str(stopped.value.code)
        == "--rp_serve_api cannot listen on localhost:-1: --rp_api_port must be between 0 and 65535"
    )
