"""Start images: base64 and data URIs, public URLs only (every redirect hop checked), no image bombs."""

import base64
import datetime
import io
import ipaddress
import socket
import ssl
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from turbovideo.errors import InputError
from turbovideo.pipeline.conditioning import image_to_tensor, to_rgb
from turbovideo.worker import inputs


def png_bytes(size=(24, 16), mode="RGB", color=(200, 30, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode != "P" else 3).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid-looking 1-bit PNG of a few hundred bytes whose header claims ``width x height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)  # far too little data; never decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_base64_png_becomes_an_rgb_image():
    image = inputs.load_image(base64.b64encode(png_bytes()).decode())
    assert image.mode == "RGB" and image.size == (24, 16)
    assert image.getpixel((0, 0)) == (200, 30, 40)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_other_modes_are_converted_to_rgb(mode):
    data = base64.b64encode(png_bytes(mode=mode, color=(1, 2, 3, 4) if mode == "RGBA" else 7)).decode()
    assert inputs.load_image(f"data:image/png;base64,{data}").mode == "RGB"


def test_a_percent_encoded_data_uri_is_decoded():
    # RFC 2397 data may be URL-encoded: "=" padding as %3D, "+" as %2B, "/" as %2F.
    data = base64.b64encode(png_bytes()).decode()
    assert "=" in data or "+" in data or "/" in data
    encoded = quote(data, safe="")
    assert inputs.load_image(f"data:image/png;base64,{encoded}").size == (24, 16)


def test_16_bit_grayscale_is_scaled_not_clipped():
    # Pillow opens it as mode I;16 and its convert("RGB") clips every value above 255 to white.
    levels = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    image = inputs.load_image(base64.b64encode(buffer.getvalue()).decode())
    assert np.asarray(image)[0, :, 0].tolist() == [0, 0, 1, 128, 255]
    pixels = image_to_tensor(Image.fromarray(levels), 5, 1)[0, 0, 0]  # the pipeline's own path too
    assert pixels.tolist() == pytest.approx([v / 127.5 - 1 for v in (0, 0, 1, 128, 255)], abs=1e-6)
    # A 32-bit I image is scaled only when it holds 16-bit values; within 0-255 it is 8-bit data.
    as_int32 = Image.fromarray(levels.astype(np.int32), mode="I")
    assert np.asarray(to_rgb(as_int32))[0, :, 0].tolist() == [0, 0, 1, 128, 255]
    eight_bit = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(eight_bit))[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize("remainder", [1, 2])  # one or two "=" of padding left off
def test_url_safe_and_unpadded_base64_is_accepted(remainder):
    # An image whose standard base64 has "+" or "/" and ends in padding.
    data = next(
        d
        for width in range(20, 90)
        if (d := png_bytes(size=(width, 16)))
        and len(d) % 3 == remainder
        and {"+", "/"} & set(base64.b64encode(d).decode())
    )
    encoded = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert inputs.load_image(encoded).tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_base64_with_characters_outside_its_alphabet_is_refused():
    encoded = base64.b64encode(png_bytes()).decode()
    junk = encoded[:40] + "!!!!" + encoded[44:]  # the length still a multiple of 4
    with pytest.raises(InputError, match="neither an http\\(s\\) URL nor valid base64"):
        inputs.load_image(junk)


def test_base64_with_line_breaks_is_accepted():
    encoded = base64.encodebytes(png_bytes()).decode()  # MIME style, a newline every 76 characters
    assert "\n" in encoded
    assert inputs.load_image(encoded).size == (24, 16)


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("not base64 at all!!", "neither an http(s) URL nor valid base64"),
        ("data:image/png,abc", "data URI must look like"),
        (
            base64.b64encode(b"plain text, no image here").decode(),
            "is not a PNG, JPEG, WEBP, BMP or GIF image",
        ),
        (base64.b64encode(png_bytes()[:60]).decode(), "could not be decoded"),
        (base64.b64encode(bomb_png()).decode(), "at most 50000000 pixels"),  # Pillow refuses it first
        (base64.b64encode(bomb_png(60_000, 1_000)).decode(), "at most 50000000 pixels, got 60000x1000"),
        ("file:///etc/passwd", "must use http or https, got file:"),
        ("ftp://example.com/a.png", "must use http or https, got ftp:"),
        ("gopher://example.com/", "must use http or https"),
    ],
)
def test_unusable_images_are_input_errors(value, fragment):
    with pytest.raises(InputError) as caught:
        inputs.load_image(value)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("size", [(1, 9), (900, 100)])
def test_slivers_are_refused_before_decoding(size):
    with pytest.raises(InputError, match=f"within 8:1 of each other, got {size[0]}x{size[1]}"):
        inputs.load_image(base64.b64encode(png_bytes(size)).decode())
    assert inputs.load_image(base64.b64encode(png_bytes((800, 100))).decode()).size == (800, 100)


def test_exif_orientation_is_applied():
    # Stored landscape with "rotate 90° clockwise to display" (orientation 6): the user sees portrait.
    buffer = io.BytesIO()
    stored = Image.new("RGB", (64, 32), (200, 30, 40))
    stored.paste((10, 220, 30), (0, 0, 8, 8))  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    image = inputs.load_image(base64.b64encode(buffer.getvalue()).decode())
    assert image.size == (32, 64)
    red, green, _ = image.getpixel((28, 3))  # the marker is now in the top-right corner
    assert green > 150 and red < 100


@pytest.mark.parametrize("format", ["PNG", "WEBP"])
@pytest.mark.parametrize("exif", [b"Exif\x00\x00garbage", b"Exif\x00\x00MM\x00*"], ids=["not-tiff", "cut"])
def test_an_image_with_unreadable_exif_is_used_as_stored(format, exif):
    # The pixels decode; only the EXIF block (where the orientation would be) cannot be read: it was
    # refused as undecodable (not TIFF data) or failed with struct.error (a block cut short).
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), (200, 30, 40)).save(buffer, format=format, exif=exif)
    image = inputs.load_image(base64.b64encode(buffer.getvalue()).decode())
    assert image.size == (64, 32) and image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int) - (200, 30, 40)).max() <= 8  # WebP is lossy


def test_base64_size_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(inputs, "MAX_IMAGE_BYTES", 1000)
    monkeypatch.setattr(inputs.base64, "b64decode", lambda *a, **k: pytest.fail("decoded an oversized image"))
    with pytest.raises(InputError, match="image must be at most"):
        inputs.load_image("A" * 4000)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://127.1.2.3:8080/a.png",
        "http://10.1.2.3/a.png",
        "http://192.168.0.10/a.png",
        "http://172.16.5.4/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/a.png",
        "http://0.0.0.0/a.png",
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://[::ffff:100.64.0.1]/a.png",  # IPv4-mapped shared address space
        "http://[::ffff:224.0.0.1]/a.png",  # IPv4-mapped multicast
        "http://[fd00::1]/a.png",
        "http://[64:ff9b::a9fe:a9fe]/latest/",  # NAT64 to 169.254.169.254
        "http://[64:ff9b:1::a00:1]/a.png",  # local-use NAT64
        "http://[64:ff9b:1:808:8:800::]/a.png",  # local-use NAT64 /48 embedding of a public 8.8.8.8
        "http://[2002:a9fe:a9fe::1]/a.png",  # 6to4 via 169.254.169.254
        "http://[::10.0.0.1]/a.png",  # IPv4-compatible
        "http://224.0.0.1/a.png",  # multicast, which ipaddress counts as global
        "http://[ff0e::1]/a.png",
        "http://localhost/a.png",
        "https://localhost:8443/a.png",
    ],
)
def test_private_addresses_are_refused_before_connecting(url, monkeypatch):
    monkeypatch.setattr(inputs.socket, "create_connection", lambda *a, **k: pytest.fail("connected"))
    with pytest.raises(InputError, match="resolves to a non-public address"):
        inputs.load_image(url)


def test_every_resolved_address_is_checked(monkeypatch):
    # A host with one public and one private address (DNS rebinding style) is refused.
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 80)) for ip in ("93.184.215.14", "10.0.0.7")]
    monkeypatch.setattr(inputs.socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(InputError, match=r"non-public address \(10\.0\.0\.7\)"):
        inputs.fetch_url("http://images.example.test/a.png")


def test_the_connection_goes_to_the_checked_address_not_a_second_lookup(monkeypatch):
    # DNS rebinding: the name answers a public address when checked, then 127.0.0.1.
    lookups = []

    def rebinding(host, *args, **kwargs):
        lookups.append(host)
        ip = "93.184.215.14" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 80))]

    connected = []

    def refused(address, *args, **kwargs):
        connected.append(address)
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(inputs.socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(inputs.socket, "create_connection", refused)
    with pytest.raises(InputError, match="could not be fetched"):
        inputs.fetch_url("http://rebind.example.test/a.png")
    assert connected == [("93.184.215.14", 80)] and lookups == ["rebind.example.test"]


def test_a_hanging_name_lookup_cannot_outlast_the_fetch_limit(monkeypatch):
    # The resolver's own timeouts (5 s per try and server in glibc) can add up past the documented limit.
    release = threading.Event()
    monkeypatch.setattr(inputs.socket, "getaddrinfo", lambda *a, **k: release.wait(30) and [])
    started = time.monotonic()
    try:
        with pytest.raises(InputError, match="longer than 0.5 s"):
            inputs.fetch_url("http://slow-dns.example.test/a.png", timeout_s=0.5)
        assert time.monotonic() - started < 1.5
    finally:
        release.set()


def test_unresolvable_host_is_an_input_error():
    with pytest.raises(InputError, match="does not resolve"):
        inputs.fetch_url("http://no-such-host.invalid/a.png")


class _Images(BaseHTTPRequestHandler):
    png = png_bytes((40, 30))

    def do_GET(self):  # noqa: N802 (http.server's naming)
        port = self.server.server_address[1]
        routes = {
            "/image.png": lambda: self._send(200, self.png, {"Content-Type": "image/png"}),
            "/hop": lambda: self._send(302, b"", {"Location": "/image.png"}),
            "/to-localhost": lambda: self._send(302, b"", {"Location": f"http://localhost:{port}/image.png"}),
            "/to-metadata": lambda: self._send(301, b"", {"Location": "http://169.254.169.254/latest/"}),
            "/to-file": lambda: self._send(302, b"", {"Location": "file:///etc/passwd"}),
            "/loop": lambda: self._send(302, b"", {"Location": "/loop"}),
            "/no-length.png": lambda: self._send(200, self.png, {}, length=False),
            **{  # /hops-N: N redirects before the image
                f"/hops-{n}": (lambda n=n: self._send(302, b"", {"Location": f"/hops-{n - 1}"}))
                for n in range(1, 7)
            },
            "/hops-0": lambda: self._send(200, self.png, {}),
            "/missing": lambda: self._send(404, b"nope", {}),
            # An expired presigned link: the bucket's XML error, with 200 from a proxy that hides the status.
            "/expired": lambda: self._send(
                200,
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>',
                {"Content-Type": "application/xml"},
            ),
            "/api": lambda: self._send(200, b'{"error": "not found"}', {"Content-Type": "application/json"}),
            "/bare-page": lambda: self._send(
                200, b"<head><title>x</title></head>", {"Content-Type": "text/html"}
            ),
            # A share link: the page that shows the image, not the image.
            "/share": lambda: self._send(
                200,
                b"\xef\xbb\xbf\n<!DOCTYPE html><html><img src=/image.png></html>",
                {"Content-Type": "text/html"},
            ),
            "/huge-declared": lambda: self._send(200, b"", {"Content-Length": str(10**9)}, length=False),
            "/huge-streamed": self._stream_forever,
            "/slow": lambda: self._trickle(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"\0", 100, 0.05
            ),
            # "\xb2" (superscript two) is a digit to str.isdigit but no number to int().
            "/odd-length": lambda: self._send(200, self.png, {"Content-Length": "\xb2"}, False),
            "/cut-short": lambda: self._send(
                200, self.png[:50], {"Content-Length": str(len(self.png))}, False
            ),
            "/bad-chunk": self._bad_chunk,
            "/to-bad-host": lambda: self._send(302, b"", {"Location": "http://[oops/x.png"}),
            "/caf%C3%A9.png": lambda: self._send(200, self.png, {"Content-Type": "image/png"}),
            # UTF-8 bytes in the header, as servers send them (send_header writes Latin-1).
            "/to-utf8": lambda: self._send(302, b"", {"Location": "/caf\xc3\xa9.png"}),
            "/trickle-headers": lambda: self._trickle(b"HTTP/1.1 200 OK\r\nX-Slow: "),
            "/trickle-chunk": lambda: self._trickle(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;"  # then a chunk extension
            ),
        }
        routes.get(self.path, routes["/missing"])()

    def _send(self, status, body, headers, length=True):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream_forever(self):
        self.send_response(200)
        self.end_headers()  # no length: read until the limit trips
        try:
            for _ in range(10_000):
                self.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    def _bad_chunk(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"10\r\n" + self.png[:16] + b"\r\nzz\r\n")  # "zz" is no chunk size
        self.close_connection = True

    def _trickle(self, head, byte=b"x", count=40, pause_s=0.1):
        # Every byte arrives well within a socket timeout; only a deadline on the whole fetch ends it.
        try:
            self.wfile.write(head)
            for _ in range(count):
                self.wfile.write(byte)
                self.wfile.flush()
                time.sleep(pause_s)
        except OSError:
            pass
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def allowed(image_server, monkeypatch):
    """Lets the local server through the address check, as the first hop and by that exact name only."""
    monkeypatch.setattr(inputs, "ALLOWED_PRIVATE_NETLOCS", {image_server})
    return f"http://{image_server}"


def test_loopback_server_is_refused_without_the_test_allow_list(image_server):
    with pytest.raises(InputError, match="non-public"):
        inputs.load_image(f"http://{image_server}/image.png")


def test_a_host_is_reached_at_its_next_address_when_the_first_refuses(image_server, monkeypatch):
    # The resolver lists IPv6 first, where nothing answers (a worker without IPv6, or a dead address).
    port = int(image_server.rsplit(":", 1)[1])
    answers = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
    ]
    real = socket.getaddrinfo  # what create_connection resolves an address with

    def resolve(host, *args, **kwargs):
        return answers if host == "dual.example.test" else real(host, *args, **kwargs)

    monkeypatch.setattr(inputs.socket, "getaddrinfo", resolve)
    monkeypatch.setattr(inputs, "ALLOWED_PRIVATE_NETLOCS", {f"dual.example.test:{port}"})
    assert inputs.load_image(f"http://dual.example.test:{port}/image.png").size == (40, 30)


def test_a_host_of_many_dead_addresses_cannot_outlast_the_fetch_limit(monkeypatch):
    # Each address that never answers (a dropped SYN) waits out its connect timeout: the fetch's limit
    # bounds all the attempts together, not each one of them.
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"93.184.215.{i}", 80)) for i in range(4)]
    monkeypatch.setattr(inputs.socket, "getaddrinfo", lambda *a, **k: answers)

    def unanswered(address, timeout=None, *args, **kwargs):
        time.sleep(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(inputs.socket, "create_connection", unanswered)
    started = time.monotonic()
    with pytest.raises(InputError, match="longer than 0.5 s"):
        inputs.fetch_url("http://dead.example.test/a.png", timeout_s=0.5)
    assert time.monotonic() - started < 1.0


def test_image_is_fetched_from_an_allowed_server(allowed):
    assert inputs.load_image(f"{allowed}/image.png").size == (40, 30)


def test_a_content_length_that_is_no_number_is_ignored_as_http_client_does(allowed):
    assert inputs.load_image(f"{allowed}/odd-length").size == (40, 30)


def test_redirects_are_followed(allowed):
    assert inputs.load_image(f"{allowed}/hop").size == (40, 30)


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("/to-localhost", "'localhost' resolves to a non-public address"),
        ("/to-metadata", "'169.254.169.254' resolves to a non-public address"),
        ("/to-file", "must use http or https, got file:"),
        ("/loop", "redirected more than 5 times"),
        ("/missing", "answered HTTP 404"),
        ("/share", "image URL answered a web page (HTML), not an image"),
        ("/bare-page", "image URL answered a web page (HTML), not an image"),
        ("/expired", "image URL answered an XML document, not an image (a storage service's error"),
        ("/api", "image URL answered JSON, not an image"),
        ("/huge-declared", "image must be at most 20 MB, got 953.7 MB"),
        ("/huge-streamed", "image must be at most 20 MB"),
        ("/cut-short", "download ended after 50 of"),
        ("/bad-chunk", "image URL download failed"),
        ("/to-bad-host", "image URL redirected to an invalid URL"),
    ],
)
def test_bad_urls_are_input_errors(allowed, path, fragment):
    with pytest.raises(InputError) as caught:
        inputs.load_image(f"{allowed}{path}")
    assert fragment in str(caught.value)


def test_the_limits_are_inclusive(allowed):
    assert inputs.load_image(f"{allowed}/hops-{inputs.MAX_REDIRECTS}").size == (40, 30)
    with pytest.raises(InputError, match=f"redirected more than {inputs.MAX_REDIRECTS} times"):
        inputs.load_image(f"{allowed}/hops-{inputs.MAX_REDIRECTS + 1}")
    size = len(_Images.png)
    for path in ("/image.png", "/no-length.png"):  # by its Content-Length, and counted as it arrives
        assert inputs.fetch_url(f"{allowed}{path}", max_bytes=size) == _Images.png
        with pytest.raises(InputError, match="image must be at most"):
            inputs.fetch_url(f"{allowed}{path}", max_bytes=size - 1)
    at_limit = f"{allowed}/x?" + "q" * (inputs.MAX_URL_CHARS - len(f"{allowed}/x?"))
    with pytest.raises(InputError, match="answered HTTP 404"):  # fetched: the length passed
        inputs.fetch_url(at_limit)
    with pytest.raises(InputError, match=f"at most {inputs.MAX_URL_CHARS} characters"):
        inputs.fetch_url(at_limit + "q")


def test_an_upper_case_scheme_is_fetched(allowed):
    assert inputs.load_image(allowed.replace("http://", "HTTP://") + "/image.png").size == (40, 30)


def test_an_https_server_with_an_untrusted_certificate_is_refused(tmp_path, monkeypatch):
    # A self-signed certificate for the very name asked for: only the certificate check can refuse it.
    cert, key = _self_signed(tmp_path, "127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        netloc = f"127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(inputs, "ALLOWED_PRIVATE_NETLOCS", {netloc})
        with pytest.raises(InputError, match="CERTIFICATE_VERIFY_FAILED"):
            inputs.load_image(f"https://{netloc}/image.png")
    finally:
        server.shutdown()
        server.server_close()


def _self_signed(folder, address: str) -> tuple[str, str]:
    """A certificate for ``address`` signed by its own key (PEM files): what no trust store holds.
    (cryptography comes with moto, a test dependency.)"""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


def test_download_time_is_bounded(allowed):
    started = time.monotonic()
    with pytest.raises(InputError, match="longer than 0.5 s|timed out"):
        inputs.fetch_url(f"{allowed}/slow", timeout_s=0.5)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("url", ["http://[oops/x.png", "https://[not-an-ip]/x.png"])
def test_a_malformed_host_is_an_input_error(url):
    with pytest.raises(InputError, match="image URL is not a valid URL"):
        inputs.load_image(url)


def test_a_lone_surrogate_in_the_path_is_an_input_error(allowed):
    with pytest.raises(InputError, match="image URL is not a valid URL"):
        inputs.load_image(f"{allowed}/a\ud800.png")


@pytest.mark.parametrize("path", ["/caf\u00e9.png", "/to-utf8"])
def test_non_ascii_paths_are_sent_percent_encoded_as_browsers_do(allowed, path):
    assert inputs.load_image(f"{allowed}{path}").size == (40, 30)


@pytest.mark.parametrize("path", ["/trickle-headers", "/trickle-chunk"])
def test_a_server_trickling_bytes_cannot_outlast_the_fetch_limit(allowed, path):
    started = time.monotonic()
    with pytest.raises(InputError, match="longer than 1 s"):
        inputs.fetch_url(f"{allowed}{path}", timeout_s=1)
    assert time.monotonic() - started < 2.0


def test_nat64_and_6to4_addresses_of_public_hosts_stay_allowed():
    for address in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111"):
        assert inputs._is_public(ipaddress.ip_address(address)), address
