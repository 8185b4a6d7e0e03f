"""A loopback stand-in for the Hugging Face Hub's file endpoints, for the real huggingface_hub client.

``HEAD/GET /{repo}/resolve/{revision}/{path}`` answers the way the Hub does: small ("git") files
directly with a git-sha1 ETag; LFS files with a 302 to a second server on another port (the "CDN",
so the client treats it as another host) carrying X-Linked-Etag (sha256) and X-Linked-Size. Both
serve Range requests with 206. Faults on demand: drop the connection after N body bytes, answer
body GETs with an HTTP error, go slowly, claim a wrong size or hash, leave out the ETag, refuse every
Hub request with one status, ignore Range headers. Every request is recorded so tests can count network use.

Also holds ``read_only_dir``, the one filesystem fault helper the cache tests share.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<key>[0-9a-f]+)$")


@dataclass
class Served:
    """One file on the fake Hub. ``size``/``sha256`` override what the metadata claims (to lie)."""

    content: bytes
    lfs: bool = True
    size: int | None = None
    sha256: str | None = None

    def etag(self) -> str:
        if self.lfs:
            return self.sha256 or hashlib.sha256(self.content).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()

    def claimed_size(self) -> int:
        return len(self.content) if self.size is None else self.size


@dataclass(frozen=True)
class Request:
    server: str  # "hub" or "cdn"
    method: str
    file: tuple[str, str] | None  # (repo, path) the request was about
    range: str | None
    authorization: str | None


class HubServer:
    """Start with ``with HubServer({(repo, path): bytes | Served}) as hub:``; point clients at ``hub.endpoint``."""

    def __init__(self, files: dict[tuple[str, str], bytes | Served]) -> None:
        self.files = {k: v if isinstance(v, Served) else Served(v) for k, v in files.items()}
        self.requests: list[Request] = []
        self.drop_after: int | None = None  # bytes of body per response before the connection is cut
        self.drops_left = 0  # how many responses to cut; then serve normally
        self.error_status = 503  # what the next ``errors_left`` file-body GETs are answered with
        self.errors_left = 0
        self.delay_s = 0.0  # pause after every chunk
        self.commit_header = True  # False: answer without X-Repo-Commit, as a web page or proxy would
        self.etag_header = True  # False: answer without ETag (nor X-Linked-Etag)
        self.hub_status: int | None = None  # answer every Hub (not CDN) request with this HTTP status
        self.ignore_range = False  # True: answer Range requests with the whole body (200), as some CDNs do
        self.chunk = 64 * 1024
        self._lock = threading.Lock()
        self._hub = self._server("hub")
        self._cdn = self._server("cdn")
        self.endpoint = f"http://127.0.0.1:{self._hub.server_port}"
        self.cdn = f"http://127.0.0.1:{self._cdn.server_port}"

    # --- counting -------------------------------------------------------------------------------
    def body_gets(self, repo: str, path: str) -> list[Request]:
        """GETs that transferred the file's bytes (to the CDN for LFS files, the Hub otherwise)."""
        lfs = self.files[(repo, path)].lfs
        return [
            r
            for r in self.requests
            if r.method == "GET" and r.file == (repo, path) and (r.server == "cdn") == lfs
        ]

    def full_gets(self, repo: str, path: str) -> int:
        return sum(1 for r in self.body_gets(repo, path) if r.range is None)

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> HubServer:
        for server in (self._hub, self._cdn):
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def _server(self, role: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, role, head=True)

            def do_GET(self) -> None:
                hub._handle(self, role, head=False)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        return server

    # --- answering ------------------------------------------------------------------------------
    def _find(self, role: str, path: str) -> tuple[tuple[str, str], Served] | None:
        if role == "hub":
            m = _RESOLVE.match(path)
            key = (m["repo"], unquote(m["path"])) if m else None
            return (key, self.files[key]) if key in self.files else None
        m = _CDN.match(path)
        for key, served in self.files.items():
            if m and served.lfs and hashlib.sha256(served.content).hexdigest() == m["key"]:
                return key, served
        return None

    def _handle(self, h: BaseHTTPRequestHandler, role: str, head: bool) -> None:
        path = urlparse(h.path).path
        found = self._find(role, path)
        with self._lock:
            self.requests.append(
                Request(
                    role,
                    h.command,
                    found[0] if found else None,
                    h.headers.get("Range"),
                    h.headers.get("Authorization"),
                )
            )
        if found is None:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        _, served = found
        if role == "hub" and self.hub_status is not None:
            h.send_response(self.hub_status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        with self._lock:
            fail = not head and (role == "cdn" or not served.lfs) and self.errors_left > 0
            self.errors_left -= fail
        if fail:
            h.send_response(self.error_status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if role == "hub":
            h_meta = {"X-Repo-Commit": COMMIT} if self.commit_header else {}
            if self.etag_header:
                h_meta["ETag"] = f'"{served.etag()}"'
            if served.lfs:
                key = hashlib.sha256(served.content).hexdigest()
                h.send_response(302)
                if self.etag_header:
                    h_meta["X-Linked-Etag"] = f'"{served.etag()}"'
                h_meta["X-Linked-Size"] = str(served.claimed_size())
                h_meta |= {"Location": f"{self.cdn}/cdn/{key}", "Content-Length": "0"}
                for k, v in h_meta.items():
                    h.send_header(k, v)
                h.end_headers()
                return
            self._send_body(h, served, head, h_meta)
        else:
            self._send_body(h, served, head, {"ETag": f'"{served.etag()}"'})

    def _send_body(
        self, h: BaseHTTPRequestHandler, served: Served, head: bool, headers: dict[str, str]
    ) -> None:
        content = served.content
        start = 0
        m = None if self.ignore_range else re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if m and int(m[1]) >= len(content):
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(content)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if m:
            start = int(m[1])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        else:
            h.send_response(200)
        body = content[start:]
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        with self._lock:
            limit = self.drop_after if self.drops_left > 0 else None
            if limit is not None:
                self.drops_left -= 1
        sent = 0
        for i in range(0, len(body), self.chunk):
            piece = body[i : i + self.chunk]
            if limit is not None and sent + len(piece) > limit:
                h.wfile.write(piece[: limit - sent])
                h.wfile.flush()
                h.close_connection = True
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RDWR)
                return
            try:
                h.wfile.write(piece)
                h.wfile.flush()
            except OSError:  # the client went away (e.g. it was killed)
                h.close_connection = True
                return
            sent += len(piece)
            if self.delay_s:
                time.sleep(self.delay_s)


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """Make ``path`` and every directory under it refuse new or removed entries, even for root."""
    path.mkdir(parents=True, exist_ok=True)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None
    dirs = [path, *(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]
    if immutable:
        subprocess.run(["chattr", "+i", *map(str, dirs)], check=True)
    else:
        for d in dirs:
            d.chmod(0o555)
    try:
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", *map(str, dirs)], check=True)
        else:
            for d in dirs:
                d.chmod(0o755)
