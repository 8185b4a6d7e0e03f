"""One job through the real tiny pipeline, in process: answers, hostile inputs, faults, secrets.

The tiny models load once for the module; every generation asks for 5 frames and 1 step so a job
takes a few seconds on two CPU cores.
"""

import asyncio
import base64
import io
import json
import logging
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import imageio_ffmpeg
import pytest
import torch
from botocore.exceptions import EndpointConnectionError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from s3_server import dead_endpoint, loopback_s3, silent_endpoint
from test_inputs import bomb_png

from turbovideo.catalog import MODELS
from turbovideo.errors import InputError
from turbovideo.parallel import ParallelError
from turbovideo.pipeline import GenerationResult, HostMemoryError, ProgressEvent, VideoPipeline
from turbovideo.worker import inputs, service
from turbovideo.worker.config import BucketConfig, load_config
from turbovideo.worker.schema import VideoRequest, parse_request
from turbovideo.worker.service import VideoService
from turbovideo.worker.storage import BucketStorage, LocalStorage, UploadError

FAST = {"num_frames": 5, "num_steps": 1}
ACCESS_KEY = "AKIASERVICETEST00001"
SECRET_KEY = "service-test-secret-key-9f8e7d6c5b4a"
CODES = ("E_INPUT", "E_MODEL", "E_UPLOAD", "E_OOM", "E_CUDA", "E_STARTUP", "E_STOPPED", "E_INTERNAL")


def read_video(path) -> tuple[int, tuple[int, int]]:
    """(frame count, (width, height)) decoded back with ffmpeg: proof the file plays."""
    frames = imageio_ffmpeg.read_frames(str(path))
    meta = next(frames)
    return sum(1 for _ in frames), tuple(meta["size"])


def png_b64(size=(48, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def pipelines():
    return {name: VideoPipeline.load(MODELS[name], None, device="cpu") for name in ("tiny-t2v", "tiny-i2v")}


@pytest.fixture
def local(pipelines, tmp_path):
    return VideoService(pipelines, LocalStorage(tmp_path / "outputs"))


@pytest.fixture(scope="module")
def s3():
    with loopback_s3() as server:
        yield server


def bucket_service(pipelines, endpoint, durable: Path) -> VideoService:
    bucket = BucketConfig(endpoint, ACCESS_KEY, SECRET_KEY, "videos", "out")
    return VideoService(pipelines, BucketStorage(bucket, durable, attempts=2))


class _Images(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        port = self.server.server_address[1]
        if self.path == "/image.png":
            body = base64.b64decode(png_b64((40, 40)))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:  # looks like an ordinary image URL, but sends the worker to loopback
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/image.png")
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def allowed_first_hop(image_server, monkeypatch):
    monkeypatch.setattr(inputs, "ALLOWED_PRIVATE_NETLOCS", {image_server})
    return f"http://{image_server}"


def test_every_request_field_reaches_the_generation():
    # Each value differs from its default, so a field left out of the mapping shows.
    payload = {
        "prompt": "a red fox",
        "task": "i2v",
        "resolution": "tiny",
        "aspect_ratio": "3:4",
        "adaptive_resolution": True,
        "num_frames": 9,
        "num_steps": 2,
        "sigma_max": 123.0,
        "seed": 17,
        "num_samples": 3,
        "attention": "sla",
        "sla_topk": 0.25,
        "ode": True,
        "boundary": 0.5,
        "fps": 24,
    }
    image = Image.new("RGB", (8, 8))
    generation = service._generation_request(parse_request(payload), MODELS["tiny-i2v"], image)
    assert generation.image is image
    assert {name: getattr(generation, name) for name in payload} == payload


def test_t2v_job_answers_a_playable_video(local):
    job = {"id": "job-t2v", "input": {"prompt": "a red fox", "seed": 7, "return_base64": True, **FAST}}
    answer = local.handle(job)
    assert "error" not in answer, answer
    assert answer["seed"] == 7 and answer["model"] == "tiny-t2v"
    assert (answer["width"], answer["height"], answer["num_frames"], answer["fps"]) == (112, 64, 5, 16)
    assert answer["duration_s"] == pytest.approx(5 / 16)
    assert {"input", "encode", "denoise", "decode", "mux", "upload", "total"} <= set(answer["timings"])
    assert answer["attention_backend"]
    path = Path(answer["video_path"])
    assert path.parent.name == "job-t2v" and path.name == "sample_0.mp4"
    assert read_video(path) == (5, (112, 64))
    assert Path(answer["thumbnail_path"]).read_bytes()[:2] == b"\xff\xd8"
    assert base64.b64decode(answer["video_base64"]) == path.read_bytes()
    assert base64.b64decode(answer["thumbnail_base64"]) == Path(answer["thumbnail_path"]).read_bytes()
    json.dumps(answer)  # RunPod sends it as JSON


def test_a_job_id_run_again_keeps_every_earlier_runs_videos(local, tmp_path):
    # --test_input always runs id local_test, and the local API runs a job again when its /status is asked
    # twice: the later run replaced the earlier's sample_0.mp4 under the path its answer named, and left
    # its sample_1.mp4 beside the new video.
    first = local.handle({"id": "local_test", "input": {"prompt": "a", "seed": 1, "num_samples": 2, **FAST}})
    earlier = {path: Path(path).read_bytes() for path in [*first["video_paths"], first["thumbnail_path"]]}
    second = local.handle({"id": "local_test", "input": {"prompt": "a", "seed": 2, **FAST}})
    assert "error" not in first and "error" not in second, (first, second)
    assert {path: Path(path).read_bytes() for path in earlier} == earlier
    outputs = (tmp_path / "outputs").resolve()
    assert Path(first["video_path"]).parent == outputs / "local_test"
    assert Path(second["video_path"]).parent == outputs / "local_test-2"
    assert sorted(p.name for p in (outputs / "local_test-2").iterdir()) == ["sample_0.mp4", "thumbnail.jpg"]
    assert read_video(second["video_path"]) == (5, (112, 64))


def test_i2v_from_a_url_infers_the_task_and_draws_a_seed(local, allowed_first_hop):
    job = {
        "id": "job-i2v",
        "input": {"prompt": "waves", "image": f"{allowed_first_hop}/image.png", "seed": -1, **FAST},
    }
    answer = local.handle(job)
    assert "error" not in answer, answer
    assert answer["model"] == "tiny-i2v"
    assert 0 <= answer["seed"] <= 2**32 - 1
    assert read_video(answer["video_path"])[0] == 5


HOSTILE = [
    ({"prompt": 5}, "E_INPUT: prompt must be a string, got 5"),
    ({"prompt": "a", "num_frames": 80}, "E_INPUT: num_frames must be 4k+1 between 5 and 161, got 80"),
    ({"prompt": "a", "num_steps": 0}, "E_INPUT: num_steps must be an integer between 1 and 4, got 0"),
    ({"prompt": "a", "num_samples": 99}, "E_INPUT: num_samples must be an integer between 1 and 4, got 99"),
    ({"prompt": "a", "foo": 1}, "E_INPUT: unknown field 'foo'"),
    ({"prompt": "x" * 5000}, "E_INPUT: prompt must be at most 2000 characters, got 5000"),
    ({"prompt": "a", "resolution": "480p"}, "E_INPUT: resolution must be tiny for model tiny-t2v"),
    (
        {"prompt": "a", "image": "%%% not base64 %%%"},
        "E_INPUT: image is neither an http(s) URL nor valid base64",
    ),
    ({"prompt": "a", "image": base64.b64encode(b"hello world").decode()}, "E_INPUT: image is not a PNG"),
    ({"prompt": "a", "image": "file:///etc/passwd"}, "E_INPUT: image URL must use http or https, got file:"),
    (
        {"prompt": "a", "image": "http://127.0.0.1:9/a.png"},
        "E_INPUT: image URL host '127.0.0.1' resolves to a non-public",
    ),
    (
        {"prompt": "a", "image": "http://10.0.0.8/a.png"},
        "E_INPUT: image URL host '10.0.0.8' resolves to a non-public",
    ),
    (
        {"prompt": "a", "image": "http://169.254.169.254/latest/meta-data/"},
        "E_INPUT: image URL host '169.254.169.254'",
    ),
    (
        {"prompt": "a", "image": "http://[::1]:8080/a.png"},
        "E_INPUT: image URL host '::1' resolves to a non-public",
    ),
    (
        {"prompt": "a", "image": "http://localhost/a.png"},
        "E_INPUT: image URL host 'localhost' resolves to a non-public",
    ),
    ({"prompt": "a", "task": "i2v"}, "E_INPUT: task 'i2v' needs an input image"),
    ({"prompt": "a", "model": "tiny-i2v"}, "E_INPUT: task 'i2v' needs an input image"),
    (
        {"prompt": "a", "model": "TurboWan2.1-T2V-14B-720P"},
        "E_MODEL: model 'TurboWan2.1-T2V-14B-720P' is not served",
    ),
    ([], "E_INPUT: input must be a JSON object of request fields, got a list"),
    (None, "E_INPUT: input must be a JSON object of request fields, got null"),
]


def test_settings_are_checked_before_the_image_is_fetched(local, monkeypatch):
    monkeypatch.setattr(inputs, "fetch_url", lambda *a, **k: pytest.fail("fetched the image first"))
    url = {"image": "https://example.com/photo.png"}
    for payload, expected in [
        ({"prompt": "a", "model": "tiny-t2v", **url}, "E_INPUT: task 't2v' takes no input image"),
        ({"prompt": "a", "resolution": "720p", **url}, "E_INPUT: resolution must be tiny for model tiny-i2v"),
    ]:
        assert local.handle({"id": "early", "input": payload})["error"].startswith(expected)


def test_hostile_requests_get_one_line_and_the_worker_keeps_serving(local, allowed_first_hop):
    cases = [
        *HOSTILE,
        ({"prompt": "a", "image": base64.b64encode(bomb_png()).decode()}, "E_INPUT: image must have at most"),
        (
            {"prompt": "a", "image": f"{allowed_first_hop}/redirect"},
            "E_INPUT: image URL host 'localhost' resolves",
        ),
    ]
    for payload, expected in cases:
        answer = local.handle({"id": "hostile", "input": payload})
        assert set(answer) == {"error"}, payload
        assert answer["error"].startswith(expected), (payload, answer)
        assert "\n" not in answer["error"]
    served = local.handle({"id": "after", "input": {"prompt": "still here", **FAST}})
    assert "error" not in served and read_video(served["video_path"])[0] == 5


def test_upload_to_the_bucket_answers_urls(pipelines, s3, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    endpoint, admin = s3
    answer = bucket_service(pipelines, endpoint, tmp_path / "durable").handle(
        {"id": "job-up", "input": {"prompt": "a", "num_samples": 2, **FAST}}
    )
    assert "error" not in answer, answer
    assert len(answer["videos"]) == 2 and answer["videos"][0] == answer["video_url"]
    stored = admin.get_object(Bucket="videos", Key="out/job-up/sample_1.mp4")
    assert stored["ContentType"] == "video/mp4"
    assert urlsplit(answer["videos"][1]).path == "/videos/out/job-up/sample_1.mp4"
    assert not (tmp_path / "durable").exists()  # nothing kept when the upload worked
    signature = parse_qs(urlsplit(answer["video_url"]).query)["X-Amz-Signature"][0]
    for secret in (ACCESS_KEY, SECRET_KEY, signature):
        assert secret not in caplog.text


def test_an_expiry_past_seven_days_is_cut_with_a_warning(pipelines, s3, tmp_path):
    endpoint, _ = s3
    answer = bucket_service(pipelines, endpoint, tmp_path / "durable").handle(
        {"id": "job-week", "input": {"prompt": "a", "expires_in": 30 * 86400, **FAST}}
    )
    assert parse_qs(urlsplit(answer["video_url"]).query)["X-Amz-Expires"] == ["604800"]
    assert answer["warnings"] == [
        "expires_in 2592000 s was cut to 604800 s (7 days), the longest a presigned URL lives"
    ]


def test_an_expiry_of_exactly_seven_days_is_kept_without_a_warning(pipelines, s3, tmp_path):
    endpoint, _ = s3
    answer = bucket_service(pipelines, endpoint, tmp_path / "durable").handle(
        {"id": "job-7d", "input": {"prompt": "a", "expires_in": 604800, **FAST}}
    )
    assert parse_qs(urlsplit(answer["video_url"]).query)["X-Amz-Expires"] == ["604800"]
    assert "warnings" not in answer


@pytest.mark.parametrize("on_runpod", [True, False])
def test_the_storage_follows_the_settings(on_runpod, s3, tmp_path):
    # RunPod's job ids are unique: only elsewhere (a reused "local_test") does a job get a fresh folder.
    # Without a bucket, a RunPod worker's own disk keeps a reserve free, deleting the oldest videos.
    endpoint, _ = s3
    env = {"MODELS": "tiny-t2v", "CACHE_DIR": str(tmp_path / "cache"), "OUTPUT_DIR": str(tmp_path / "out")}
    if on_runpod:
        env["RUNPOD_POD_ID"] = "pod"
    local_storage = service._storage(load_config(env))
    assert local_storage.keep_free_bytes == (service.WORKER_DISK_RESERVE_BYTES if on_runpod else 0)
    bucket = {"BUCKET_ENDPOINT_URL": endpoint, "BUCKET_ACCESS_KEY_ID": ACCESS_KEY}
    bucket |= {"BUCKET_SECRET_ACCESS_KEY": SECRET_KEY, "BUCKET_NAME": "videos"}
    assert service._storage(load_config({**env, **bucket})).fresh_folders is not on_runpod


def test_a_job_stopped_before_it_starts_fetches_nothing(local, monkeypatch):
    fetched = []
    monkeypatch.setattr(service, "load_image", lambda value: fetched.append(value))
    answer = local.handle(
        {"id": "job-early-stop", "input": {"prompt": "a", "image": "https://example.com/a.png", **FAST}},
        stop=_set(),
    )
    assert answer["error"].startswith("E_STOPPED"), answer
    assert fetched == []


def test_bucket_down_answers_e_upload_and_keeps_a_playable_video(pipelines, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dead = dead_endpoint()
    answer = bucket_service(pipelines, dead, tmp_path / "durable").handle(
        {"id": "job-down", "input": {"prompt": "a", **FAST}}
    )
    kept = tmp_path / "durable" / "job-down"
    assert answer["error"].startswith("E_UPLOAD: upload to bucket 'videos' failed after 2 attempts")
    assert answer["error"].endswith(f"the video was kept at {kept.resolve()}")
    assert read_video(kept / "sample_0.mp4") == (5, (112, 64))
    assert ACCESS_KEY not in caplog.text and SECRET_KEY not in caplog.text


def test_bucket_failing_mid_upload_keeps_every_file(pipelines, s3, tmp_path):
    endpoint, _ = s3
    worker = bucket_service(pipelines, endpoint, tmp_path / "durable")
    puts = []

    def fail_from_the_second_put(request, **_):
        puts.append(request.url)
        if len(puts) > 1:
            raise EndpointConnectionError(endpoint_url=request.url)

    worker.storage.client.meta.events.register("before-send.s3.PutObject", fail_from_the_second_put)
    answer = worker.handle({"id": "job-mid", "input": {"prompt": "a", **FAST}})
    assert answer["error"].startswith("E_UPLOAD: ") and "kept at" in answer["error"]
    kept = tmp_path / "durable" / "job-mid"
    assert sorted(p.name for p in kept.iterdir()) == ["sample_0.mp4", "thumbnail.jpg"]
    assert read_video(kept / "sample_0.mp4")[0] == 5


@pytest.mark.parametrize(
    "failure, code",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "E_OOM"),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "E_CUDA"),
        (RuntimeError("CUDA error: device-side assert triggered"), "E_CUDA"),
        # A Triton kernel's launch reports an earlier kernel's sticky fault in the driver's own words.
        (RuntimeError("Triton Error [CUDA]: unspecified launch failure"), "E_CUDA"),
        (RuntimeError("Triton Error [CUDA]: misaligned address"), "E_CUDA"),
        (RuntimeError("Triton Error [CUDA]: an illegal instruction was encountered"), "E_CUDA"),
    ],
)
def test_gpu_failures_ask_for_a_fresh_worker(local, monkeypatch, failure, code):
    pipeline = local.pipelines["tiny-t2v"]

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(pipeline, "generate", broken)
    answer = local.handle({"id": "job-gpu", "input": {"prompt": "a", **FAST}})
    assert answer["error"].startswith(f"{code}: ") and answer["refresh_worker"] is True


def test_a_broken_cuda_context_is_answered_even_though_freeing_the_cache_fails_too(local, monkeypatch):
    # After a sticky CUDA error every CUDA call fails the same way, torch.cuda.empty_cache() included
    # (pytorch#25873): raised from the error path, it reached RunPod as a traceback without
    # refresh_worker, and the broken worker stayed to fail every later job. No GPU here: CUDA's part is
    # played by what it raises.
    from runpod.serverless.modules.rp_job import run_job

    broken = "CUDA error: an illegal memory access was encountered"

    def fails(*args, **kwargs):
        raise torch.AcceleratorError(broken)

    monkeypatch.setattr(local.pipelines["tiny-t2v"], "generate", fails)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", fails)
    result = asyncio.run(run_job(local.handle_async, {"id": "job-sticky", "input": {"prompt": "a", **FAST}}))
    assert result == {
        "error": f"E_CUDA: the GPU failed ({broken}); this worker is being replaced, retry the job",
        "stopPod": True,
    }


def test_a_video_the_disk_could_not_take_says_so_and_asks_for_a_fresh_worker(local, monkeypatch):
    from turbovideo.pipeline.video import EncodeError

    def full(*args, **kwargs):
        raise EncodeError(Path("/tmp/x/sample_0.mp4"), "Error writing trailer: No space left on device")

    monkeypatch.setattr(local.pipelines["tiny-t2v"], "generate", full)
    replaced = []
    monkeypatch.setattr(local, "replace_worker", lambda: replaced.append(True))
    answer = local.handle({"id": "job-full", "input": {"prompt": "a", **FAST}})
    assert replaced == [True]  # the SDK is told to take no further job here
    assert answer["error"].startswith("E_INTERNAL: ffmpeg could not write /tmp/x/sample_0.mp4: Error writing")
    assert answer["error"].endswith("retry the job") and answer["refresh_worker"] is True


def test_unexpected_errors_keep_the_traceback_in_the_log(local, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise KeyError("internal detail")

    monkeypatch.setattr(local.pipelines["tiny-t2v"], "generate", broken)
    answer = local.handle({"id": "job-bug", "input": {"prompt": "a", **FAST}})
    assert answer == {
        "error": "E_INTERNAL: unexpected KeyError; the worker log has the details (job job-bug)"
    }
    assert "internal detail" in caplog.text and "Traceback" in caplog.text


def test_progress_is_reported_per_stage_when_running_on_runpod(pipelines, tmp_path, monkeypatch):
    sent = []
    # The SDK posts progress to RunPod's job URL, which only exists on RunPod; record what it is given.
    monkeypatch.setattr(service, "post_progress", lambda job, text: sent.append((job["id"], text)))
    worker = VideoService(pipelines, LocalStorage(tmp_path), report_progress=True)
    assert "error" not in worker.handle({"id": "job-p", "input": {"prompt": "a", **FAST}})
    stages = [text.split()[0] for _, text in sent]
    assert stages[0] == "encode" and "denoise" in stages and stages[-1] == "mux"
    assert ("job-p", "denoise 1/1") in sent


def test_progress_reaches_runpod_in_order_and_before_the_answer(pipelines, tmp_path, monkeypatch):
    """The SDK's progress_update posts each update from a thread of its own: a slow post arrived after
    later ones ("mux 2/2" then "mux 1/2" on /status) and after the job's own result."""
    from runpod.serverless.modules import rp_progress

    received = []

    async def post(session, job_data, job):  # RunPod's job-done URL, the first post held up on the way
        if not hasattr(post, "held"):
            post.held = True
            await asyncio.sleep(0.5)
        received.append(job_data["output"])

    monkeypatch.setattr(rp_progress, "send_result", post)
    worker = VideoService(pipelines, LocalStorage(tmp_path), report_progress=True)
    answer = worker.handle({"id": "job-order", "input": {"prompt": "a", **FAST, "num_samples": 2}})
    arrived = list(received)
    time.sleep(0.8)
    assert "error" not in answer
    assert received == arrived, "a progress update arrived after the job's answer"
    order = ["encode", "denoise", "decode", "mux"]
    ranks = [(order.index(text.split()[0]), int(text.split()[1].split("/")[0])) for text in arrived]
    assert arrived[0].startswith("encode") and arrived[-1] == "mux 2/2"
    assert ranks == sorted(ranks), arrived


class _JobDone(BaseHTTPRequestHandler):
    """RunPod's job-done URL on loopback: records each progress post as it arrives and holds the first."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts.append((time.monotonic(), body["output"]))
        if len(self.server.posts) == 1:
            time.sleep(self.server.hold_s)  # a slow answer: the next update waits behind this one
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_stopped_job_posts_no_progress_after_the_stop_and_does_not_wait_for_one(
    pipelines, tmp_path, monkeypatch
):
    """A stopped job sent the update still waiting behind a slow post once that post was answered, after
    the stop (RunPod had already ended the job), and held the worker up to 10 s for it."""
    from runpod.serverless.modules import rp_http

    server = ThreadingHTTPServer(("127.0.0.1", 0), _JobDone)
    server.daemon_threads, server.posts, server.hold_s = True, [], 1.5
    threading.Thread(target=server.serve_forever, daemon=True).start()
    template = f"http://127.0.0.1:{server.server_address[1]}/job-done/$ID?gpu=test"
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", template)  # what RUNPOD_WEBHOOK_POST_OUTPUT sets on RunPod
    stop, stopped_at, forwards = threading.Event(), [], []

    def stop_in_the_second_step(module, args, out):  # "denoise 1/4" now waits behind the held first post
        forwards.append(1)
        if len(forwards) == 2:
            stopped_at.append(time.monotonic())
            stop.set()

    hook = pipelines["tiny-t2v"].experts[0].register_forward_hook(stop_in_the_second_step)
    worker = VideoService(pipelines, LocalStorage(tmp_path), report_progress=True)
    try:
        job = {"id": "job-stop-progress", "input": {"prompt": "a", "num_frames": 5, "num_steps": 4}}
        answer = worker.handle(job, stop=stop)
        returned = time.monotonic()
        time.sleep(server.hold_s + 0.5)  # the held post is answered: anything still queued goes now
    finally:
        hook.remove()
        server.shutdown()
        server.server_close()
    assert answer["error"].startswith("E_STOPPED"), answer
    assert server.posts and server.posts[0][1] == "encode 1/1"
    late = [text for at, text in server.posts if at > stopped_at[0]]
    assert late == [], f"progress posted after the stop: {late}"
    assert returned - stopped_at[0] < 0.75 * server.hold_s  # the worker did not wait for the held post


def test_a_job_runpod_stops_ends_at_its_next_step_and_frees_the_worker(local, pipelines, tmp_path):
    from runpod.serverless.modules.rp_job import run_job

    in_step, resume = threading.Event(), threading.Event()
    forwards = []

    def hold(module, args, out):  # keeps the job inside its first step until the test says so
        forwards.append(args[0].shape)
        in_step.set()
        resume.wait(60)

    hook = pipelines["tiny-t2v"].experts[0].register_forward_hook(hold)
    job = {"id": "job-stop", "input": {"prompt": "a", "num_frames": 5, "num_steps": 4}}

    async def stop_during_the_first_step() -> None:
        task = asyncio.create_task(run_job(local.handle_async, job))  # how the SDK runs a job
        assert await asyncio.to_thread(in_step.wait, 60)
        task.cancel()  # what the SDK does when RunPod signals a stop (cancel or execution timeout)
        await asyncio.sleep(0.3)
        assert not task.done()  # it waits for the job's thread, which is still inside the step
        resume.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(stop_during_the_first_step())
    finally:
        resume.set()
        hook.remove()
    assert len(forwards) == 1  # stopped where the step ended: no second step, no decode
    assert not list(tmp_path.rglob("*.mp4"))
    assert local.handle({"id": "job-stop", "input": job["input"]}, stop=_set())["error"].startswith(
        "E_STOPPED: the job was stopped"
    )
    answer = asyncio.run(local.handle_async({"id": "after-stop", "input": {"prompt": "a", **FAST}}))
    assert read_video(answer["video_path"]) == (5, (112, 64))


def test_jobs_handed_over_at_once_run_one_after_the_other(local, pipelines, monkeypatch):
    # RunPod's HTTP API server (--rp_serve_api, RUNPOD_REALTIME_PORT) awaits requests concurrently: two
    # jobs on one pipeline at once would share its attention settings, memory plan and GPU group.
    pipeline = pipelines["tiny-t2v"]
    generate, running, most = pipeline.generate, [0], [0]

    def counting(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            time.sleep(0.2)  # wide enough for the other job to start beside it
            return generate(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(pipeline, "generate", counting)

    async def two_at_once() -> list[dict]:
        jobs = ({"id": f"at-once-{i}", "input": {"prompt": "a", **FAST}} for i in range(2))
        return await asyncio.gather(*(local.handle_async(job) for job in jobs))

    answers = asyncio.run(two_at_once())
    assert all("error" not in answer for answer in answers), answers
    assert most[0] == 1


def test_a_job_stopped_during_its_upload_starts_no_further_upload(pipelines, s3, tmp_path):
    endpoint, admin = s3
    delivery = bucket_service(pipelines, endpoint, tmp_path / "durable")
    stop, sent = threading.Event(), []

    def stop_after_the_first(request, **_):  # the stop arrives while the first file is on its way
        sent.append(request.url)
        stop.set()

    delivery.storage.client.meta.events.register("before-send.s3.PutObject", stop_after_the_first)
    job = {"id": "job-stop-upload", "input": {"prompt": "a", "num_samples": 2, **FAST}}
    answer = delivery.handle(job, stop=stop)
    assert answer["error"].startswith("E_STOPPED"), answer
    assert len(sent) == 1
    listed = admin.list_objects_v2(Bucket="videos", Prefix="out/job-stop-upload/").get("Contents", [])
    assert [entry["Key"] for entry in listed] == ["out/job-stop-upload/sample_0.mp4"]
    assert not (tmp_path / "durable" / "job-stop-upload").exists()  # a stopped job's files are not kept


def test_a_stop_during_an_upload_attempt_waits_for_that_attempt_and_starts_no_retry(pipelines, tmp_path):
    # README: an upload attempt under way finishes first (a bucket that does not answer: the read timeout).
    with silent_endpoint() as endpoint:
        bucket = BucketConfig(endpoint, ACCESS_KEY, SECRET_KEY, "videos", "out")
        storage = BucketStorage(bucket, tmp_path / "durable", attempts=4, read_timeout_s=2)
        stop, sent = threading.Event(), []

        def stop_soon(**_):
            sent.append(time.monotonic())
            threading.Timer(0.5, stop.set).start()

        storage.client.meta.events.register("before-send.s3.PutObject", stop_soon)
        answer = VideoService(pipelines, storage).handle(
            {"id": "job-stop-attempt", "input": {"prompt": "a", **FAST}}, stop=stop
        )
    assert answer["error"].startswith("E_STOPPED"), answer
    assert len(sent) == 1  # the attempt under way ran to its read timeout; no retry started after the stop
    assert time.monotonic() - sent[0] >= 2
    assert not (tmp_path / "durable" / "job-stop-attempt").exists()


def _set() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
field_names = st.sampled_from([*VideoRequest.model_fields])


def assert_answered(answer: dict) -> None:
    if "error" in answer:
        assert isinstance(answer["error"], str) and "\n" not in answer["error"]
        assert answer["error"].split(":", 1)[0] in CODES
        assert not answer["error"].startswith("E_INTERNAL"), answer
    else:
        assert Path(answer["video_path"]).is_file()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.one_of(json_values, st.dictionaries(st.one_of(field_names, st.text(max_size=8)), json_values))
)
def test_any_json_gets_an_answer_never_an_exception(local, payload):
    assert_answered(local.handle({"id": "fuzz", "input": payload}))


# Valid requests with one field drawn at random reach the pipeline's own checks (and some, the pipeline).
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=field_names, value=json_values)
def test_one_odd_field_in_a_valid_request_gets_an_answer(local, key, value):
    assert_answered(local.handle({"id": "fuzz", "input": {"prompt": "p", **FAST, key: value}}))


def test_an_answer_naming_files_on_a_runpod_workers_own_disk_says_how_to_get_them(pipelines, tmp_path):
    worker = VideoService(pipelines, LocalStorage(tmp_path / "outputs"), outputs_on_worker_disk=True)
    answer = worker.handle({"id": "job-disk", "input": {"prompt": "a", **FAST}})
    assert answer["warnings"] == [
        "the video is only on this worker's own disk (video_path), which nobody can reach once the job has "
        "ended: set BUCKET_* on the endpoint to get URLs, or ask for return_base64"
    ]
    with_base64 = worker.handle({"id": "job-b64", "input": {"prompt": "a", "return_base64": True, **FAST}})
    assert "warnings" not in with_base64 and with_base64["video_base64"]


def test_a_key_a_library_quoted_in_a_failure_does_not_reach_the_client(pipelines, tmp_path):
    key = "AKIAQUOTEDKEY0000001"

    class QuotingStorage(LocalStorage):  # as botocore quoted a header holding the key
        def deliver(self, *args, **kwargs):
            raise UploadError(
                f"upload failed (Invalid header value b'Credential={key}/20261205'); the video was kept"
            )

    worker = VideoService(pipelines, QuotingStorage(tmp_path), secrets=[key])
    failed = worker.handle({"id": "job-q", "input": {"prompt": "a", **FAST}})
    assert (
        failed["error"].startswith("E_UPLOAD: ") and key not in failed["error"] and "***" in failed["error"]
    )
    warned = worker.handle({"id": "job-w", "input": {"prompt": "a", "return_base64": True, **FAST}})
    assert "video_base64" in warned and key not in warned["warnings"][0] and "***" in warned["warnings"][0]


def test_base64_over_the_payload_limit_is_skipped_with_a_warning(local, monkeypatch):
    monkeypatch.setattr(service, "MAX_BASE64_BYTES", 100)
    answer = local.handle({"id": "job-big", "input": {"prompt": "a", "return_base64": True, **FAST}})
    assert "error" not in answer and "video_base64" not in answer
    assert read_video(answer["video_path"])[0] == 5
    assert answer["warnings"] == [
        answer["warnings"][0]  # the size varies with the encoder's output
    ] and answer["warnings"][0].startswith("return_base64 skipped: the files would answer")


def test_the_base64_limit_counts_every_copy_sent(local, monkeypatch):
    job = {"prompt": "a", "return_base64": True, "num_samples": 2, "seed": 3, **FAST}
    answer = local.handle({"id": "job-two", "input": job})
    sent = sum(len(answer[k]) for k in ("video_base64", "thumbnail_base64")) + sum(
        len(v) for v in answer["videos_base64"]
    )
    monkeypatch.setattr(service, "MAX_BASE64_BYTES", sent - 1)
    again = local.handle({"id": "job-two-again", "input": job})
    assert "video_base64" not in again and again["warnings"][0].startswith("return_base64 skipped")


def test_upload_happens_before_base64_is_judged_too_large(pipelines, s3, tmp_path, monkeypatch):
    monkeypatch.setattr(service, "MAX_BASE64_BYTES", 100)
    endpoint, admin = s3
    answer = bucket_service(pipelines, endpoint, tmp_path / "durable").handle(
        {"id": "job-big-up", "input": {"prompt": "a", "return_base64": True, **FAST}}
    )
    assert "error" not in answer and answer["video_url"] and "video_base64" not in answer
    assert admin.get_object(Bucket="videos", Key="out/job-big-up/sample_0.mp4")["ContentLength"] > 0
    assert answer["warnings"][0].startswith("return_base64 skipped")


def test_bucket_down_with_base64_still_answers_the_video(pipelines, tmp_path):
    dead = dead_endpoint()
    answer = bucket_service(pipelines, dead, tmp_path / "durable").handle(
        {"id": "job-b64", "input": {"prompt": "a", "return_base64": True, **FAST}}
    )
    kept = tmp_path / "durable" / "job-b64"
    assert "error" not in answer and "video_url" not in answer
    assert base64.b64decode(answer["video_base64"]) == (kept / "sample_0.mp4").read_bytes()
    assert answer["warnings"] == [answer["warnings"][0]] and answer["warnings"][0].endswith(
        f"the video was kept at {kept.resolve()}"
    )


def test_a_missing_bucket_is_not_retried_and_says_so(pipelines, s3, tmp_path):
    endpoint, _ = s3
    bucket = BucketConfig(endpoint, ACCESS_KEY, SECRET_KEY, "no-such-bucket", "out")
    worker = VideoService(pipelines, BucketStorage(bucket, tmp_path / "durable", attempts=3))
    answer = worker.handle({"id": "job-nb", "input": {"prompt": "a", **FAST}})
    assert answer["error"].startswith(
        "E_UPLOAD: upload to bucket 'no-such-bucket' failed after 1 attempt (NoSuchBucket"
    )


@pytest.mark.parametrize("spare", [True, False])
def test_files_of_a_failed_upload_go_to_the_spare_folder_when_the_volume_refuses(pipelines, tmp_path, spare):
    dead = dead_endpoint()
    blocked = tmp_path / "volume"
    blocked.write_text("a file where the folder should be")  # as a full or read-only volume would refuse
    bucket = BucketConfig(dead, ACCESS_KEY, SECRET_KEY, "videos", "out")
    spare_dir = tmp_path / "outputs" if spare else None
    storage = BucketStorage(bucket, blocked, spare_dir=spare_dir, attempts=1)
    answer = VideoService(pipelines, storage).handle({"id": "job-sp", "input": {"prompt": "a", **FAST}})
    assert answer["error"].startswith("E_UPLOAD: upload to bucket 'videos' failed after 1 attempt (")
    if spare:
        kept = tmp_path / "outputs" / "job-sp"
        assert answer["error"].endswith(f"the video was kept at {kept.resolve()}")
        assert read_video(kept / "sample_0.mp4")[0] == 5
    else:
        assert "keeping the files failed too (NotADirectoryError" in answer["error"]


def _blocked(folder: Path) -> Path:
    folder.write_text("a file where the folder should be")  # as a full or read-only disk would refuse
    return folder


@pytest.mark.parametrize("spare", [True, False])
def test_an_output_dir_that_refuses_the_files_answers_e_upload_and_keeps_them_in_the_spare(
    pipelines, tmp_path, spare
):
    blocked = _blocked(tmp_path / "outputs")
    storage = LocalStorage(blocked, spare_dir=tmp_path / "volume" if spare else None)
    answer = VideoService(pipelines, storage).handle({"id": "job-full", "input": {"prompt": "a", **FAST}})
    assert answer["error"].startswith(f"E_UPLOAD: saving the video in OUTPUT_DIR {blocked} failed (")
    if spare:
        kept = (tmp_path / "volume" / "job-full").resolve()
        assert answer["error"].endswith(f"the video was kept at {kept}")
        assert read_video(kept / "sample_0.mp4")[0] == 5
    else:
        assert answer["error"].endswith("the video is lost")


def test_an_output_dir_that_refuses_the_files_still_answers_the_base64_video(pipelines, tmp_path):
    storage = LocalStorage(_blocked(tmp_path / "outputs"))
    job = {"id": "job-b64", "input": {"prompt": "a", "return_base64": True, **FAST}}
    answer = VideoService(pipelines, storage).handle(job)
    assert "error" not in answer
    assert base64.b64decode(answer["video_base64"])[4:8] == b"ftyp"
    assert answer["warnings"][-1].startswith("saving the video in OUTPUT_DIR")


def test_a_prompt_past_the_encoder_limit_is_answered_with_a_warning(local):
    answer = local.handle({"id": "job-long", "input": {"prompt": "x " * 999, **FAST}})
    assert "error" not in answer
    assert answer["warnings"] == ["the prompt has 1997 tokens; the text encoder read only its first 511"]
    assert "warnings" not in local.handle({"id": "job-short", "input": {"prompt": "a fox", **FAST}})


def test_the_tiny_alias_picks_its_model_by_task(local):
    # README lists `tiny` among the model names; as a request's model it means tiny-t2v or tiny-i2v.
    text = local.handle({"id": "alias-t2v", "input": {"prompt": "a", "model": "tiny", **FAST}})
    image = local.handle(
        {"id": "alias-i2v", "input": {"prompt": "a", "model": "tiny", "image": png_b64(), **FAST}}
    )
    assert (text["model"], image["model"]) == ("tiny-t2v", "tiny-i2v")


def _started(tmp_path, **env) -> VideoService:
    config = {"MODELS": "tiny-t2v", "CACHE_DIR": str(tmp_path / "cache"), "OUTPUT_DIR": str(tmp_path / "out")}
    return VideoService.from_config(load_config({**config, **env}))


@pytest.mark.parametrize("setting, warmed", [({"WARMUP": "1"}, True), ({}, False)])  # unset: only on a GPU
def test_a_start_warms_up_each_model_when_asked(setting, warmed, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _started(tmp_path, **setting)
    assert ("warmed up tiny-t2v in" in caplog.text) is warmed


def test_the_warm_up_and_every_job_run_on_one_thread(tmp_path, monkeypatch):
    # cuDNN keeps its tuned plans per thread: a job on a fresh thread would tune the VAE again.
    threads = []
    generate = VideoPipeline.generate

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread())
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(VideoPipeline, "generate", recording)
    worker = _started(tmp_path, WARMUP="1")
    for i in range(2):  # the SDK's loop, or a fresh one: the same thread either way
        answer = asyncio.run(worker.handle_async({"id": f"job-thread-{i}", "input": {"prompt": "a", **FAST}}))
        assert "error" not in answer
    assert len(threads) == 3 and len(set(threads)) == 1 and threads[0] is not threading.main_thread()


def _waits_in(thread_id: int, function: str) -> bool:
    """Whether a thread is blocked in a threading wait called (at any depth) from ``function``."""
    frame = sys._current_frames().get(thread_id)
    if frame is None or frame.f_code.co_name != "wait":
        return False
    while frame is not None and frame.f_code.co_name != function:
        frame = frame.f_back
    return frame is not None


def test_an_interrupted_start_stops_the_warm_up_at_its_next_step(tmp_path, monkeypatch, ctrl_c_handled):
    # Ctrl-C while the start-up warm-up runs on the GPU thread: the interpreter's exit joins that thread,
    # so a warm-up that went on to its end would hold the exit for all of it (a cold one: ~30 s).
    started, ended, steps = threading.Event(), threading.Event(), []

    def long_generate(self, request, out_dir, progress=None):
        started.set()
        try:
            for i in range(100):  # 10 s of steps
                time.sleep(0.1)
                steps.append(i)
                if progress is not None:
                    progress(ProgressEvent("decode", i + 1, 100))
        finally:
            ended.set()
        raise AssertionError("the warm-up ran to its end")

    def press_ctrl_c() -> None:
        # Again after a second while the main thread still waits for the warm-up, as a user would press
        # it: on a loaded machine one signal was seen (twice in ~15 runs) to leave that wait running. Only
        # into the wait, so no second KeyboardInterrupt can land outside pytest.raises; a wait that never
        # hears Ctrl-C still runs all 100 steps.
        started.wait(60)
        signal.pthread_kill(main, signal.SIGINT)
        for _ in range(2):
            if ended.wait(1.0):
                return
            if _waits_in(main, "_warm_up_on_gpu_thread"):
                signal.pthread_kill(main, signal.SIGINT)

    monkeypatch.setattr(VideoPipeline, "generate", long_generate)
    main = threading.main_thread().ident
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        _started(tmp_path, WARMUP="1")
    service._GPU_THREAD.submit(lambda: None).result(timeout=2)  # free at once: the exit would not wait
    assert len(steps) < 20


def test_a_failed_warm_up_is_logged_and_the_worker_still_serves(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    # The compile caches where a user put them: on a nearly full disk the cache volume's local
    # fallback would create the missing scratch directory below and the warm-up would succeed.
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    with monkeypatch.context() as patched:
        patched.setattr("tempfile.tempdir", str(tmp_path / "gone"))  # scratch space refused
        service = _started(tmp_path, WARMUP="1")
    assert "warm-up of tiny-t2v failed (FileNotFoundError" in caplog.text
    answer = service.handle({"id": "after-warm-up", "input": {"prompt": "a red fox", **FAST}})
    assert "error" not in answer and read_video(answer["video_path"])[0] == 5


def test_a_warm_up_that_breaks_the_multi_gpu_group_fails_the_start(tmp_path, monkeypatch):
    # A follower out of memory in the warm-up leaves the group broken for every job: the start's
    # answer (describe_startup_error) says what to change instead of jobs asking for replacements.
    def broken_group(self, progress=None):
        raise ParallelError("GPU rank 1 failed: OutOfMemoryError: CUDA out of memory")

    monkeypatch.setattr(VideoPipeline, "warm_up", broken_group)
    with pytest.raises(ParallelError, match="out of memory"):
        _started(tmp_path, WARMUP="1")


def test_idle_weights_the_host_cannot_hold_fail_the_start_before_any_download(tmp_path, monkeypatch):
    # A14B bf16 on an 80 GB card keeps its umT5 in pinned host memory: on a host with 10 GiB free the
    # start used to download ~70 GB and load it first, then fail; now it fails before fetching anything.
    from test_pipeline_memory import _SimulatedGPU

    from turbovideo.pipeline.host_memory import GIB
    from turbovideo.worker.startup import describe_startup_error

    gpu = _SimulatedGPU(monkeypatch, total=80 * 10**9, host=10 * GIB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": gpu.total})
    )

    def download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(service, "check_room", download)
    monkeypatch.setattr(service, "ensure_checkpoints", download)
    with pytest.raises(HostMemoryError) as refused:
        _started(tmp_path, MODELS="TurboWan2.2-I2V-A14B-720P", CHECKPOINT_VARIANT="bf16", WARMUP="0")
    assert describe_startup_error(refused.value).message.startswith(
        "model TurboWan2.2-I2V-A14B-720P moves its text encoder to host memory while idle, in pinned copies "
        "that need about 11.0 GiB more, and the host has 10.0 GiB free; deploy on a GPU type with more RAM"
    )
    assert gpu.used() == 0 and gpu.pinned() == 0


@pytest.mark.parametrize(
    ("exc", "code", "refresh"),
    [
        (InputError("num_frames must be 4k+1"), "E_INPUT", False),
        (service.ModelError("model 'x' is not served"), "E_MODEL", False),
        (UploadError("upload failed; the video was kept at /v"), "E_UPLOAD", False),
        (service.JobStopped("the job was stopped"), "E_STOPPED", False),
        (KeyError("x"), "E_INTERNAL", False),
        (torch.OutOfMemoryError("CUDA out of memory"), "E_OOM", True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "E_OOM", True),
        (RuntimeError("CUDA error: unknown error"), "E_CUDA", True),
        (RuntimeError("an illegal memory access was encountered"), "E_CUDA", True),
    ],
)
def test_each_failure_gets_its_code_and_only_the_gpus_ask_for_a_new_worker(exc, code, refresh):
    # README: a worker that asks to be replaced takes no further job, so only a suspect GPU (or disk) may.
    answer = service.error_response(exc, "job-x")
    assert answer["error"].startswith(f"{code}: ")
    assert answer.get("refresh_worker", False) is refresh


def test_seed_zero_is_a_seed_not_a_request_for_a_random_one(local):
    answers = [
        local.handle({"id": f"job-zero-{i}", "input": {"prompt": "a", "seed": 0, **FAST}}) for i in (1, 2)
    ]
    assert [a["seed"] for a in answers] == [0, 0]
    assert Path(answers[0]["video_path"]).read_bytes() == Path(answers[1]["video_path"]).read_bytes()


def test_timings_add_up_to_the_whole_job(local):
    started = time.perf_counter()
    answer = local.handle({"id": "job-timed", "input": {"prompt": "a prompt no other test encodes", **FAST}})
    wall = time.perf_counter() - started
    timings = answer["timings"]
    stages = ("input", "encode", "denoise", "decode", "mux", "upload")
    assert all(timings[stage] >= 0 for stage in stages)
    assert min(timings["encode"], timings["denoise"], timings["decode"]) > 0  # not rounded to whole seconds
    assert sum(timings[stage] for stage in stages) <= timings["total"] + 0.01 <= wall + 0.02


def test_base64_fits_up_to_the_9_mb_limit_and_not_past_it(tmp_path):
    def result(video_bytes: int) -> GenerationResult:
        video, thumbnail = tmp_path / "sample_0.mp4", tmp_path / "thumbnail.jpg"
        video.write_bytes(b"v" * video_bytes)
        thumbnail.write_bytes(b"t" * 3)  # 4 base64 bytes
        return GenerationResult([video], thumbnail, 1, 1, 1, 16, 0.1, 0, "dense")

    at_limit = (service.MAX_BASE64_BYTES - 4) // 4 * 3  # video + thumbnail encode to exactly 9,000,000 bytes
    warnings: list[str] = []
    assert (
        set(service._encode(result(at_limit), warnings)) == {"video_base64", "thumbnail_base64"}
        and not warnings
    )
    assert service._encode(result(at_limit + 1), warnings) == {}
    assert warnings[0].endswith("over the 9 MB response limit")
