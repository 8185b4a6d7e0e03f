"""A loopback stand-in for RunPod's job API, so handler.py runs its production loop (fitness checks
included) as on a serverless worker: ``/job-take/`` hands out the queued jobs one by one (then 204),
``/job-stop/`` has no stop signals, and what the worker posts to ``/job-done/`` is recorded."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class JobAPI:
    def __init__(self, jobs: list[dict]) -> None:
        self.jobs = list(jobs)
        self.results: list[dict] = []
        self.answered = threading.Event()
        self.url = ""

    def env(self) -> dict[str, str]:
        """The variables RunPod sets on a serverless worker that point the SDK at this API."""
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.url}/job-take/$ID?token=t",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.url}/job-done/$ID?token=t",
            "RUNPOD_POD_ID": "test-worker",
        }


@contextlib.contextmanager
def job_api(jobs: list[dict]) -> Iterator[JobAPI]:
    api = JobAPI(jobs)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path.startswith("/job-take/") and api.jobs:
                body = json.dumps(api.jobs.pop(0)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(204)
            self.end_headers()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if urlparse(self.path).path.startswith("/job-done/"):
                api.results.append(json.loads(body))
                api.answered.set()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
