"""The I2V start image of a request: fetched from a public URL or decoded from base64, then opened
by ``turbovideo.images`` (which checks the bytes before decoding them).

A request's URL is fetched by the worker, inside the provider's network, so it must not reach
anything a stranger could not: every hop of a redirect chain is resolved and each of its addresses
checked, and the connection goes to those checked addresses, in turn (a second DNS answer cannot swap
in 127.0.0.1). Sizes are bounded before anything is read whole.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from urllib.parse import quote, unquote, urljoin, urlsplit

from PIL import Image

from turbovideo.errors import InputError
from turbovideo.images import MAX_IMAGE_BYTES, open_image, reason

FETCH_TIMEOUT_S = 15.0
MAX_REDIRECTS = 5
MAX_URL_CHARS = 2048

# "host:port" pairs the address check lets through. Only tests put their loopback server here;
# nothing in a request can add to it.
ALLOWED_PRIVATE_NETLOCS: set[str] = set()

_REDIRECTS = (301, 302, 303, 307, 308)
_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*);base64,", re.I)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def load_image(value: str) -> Image.Image:
    """The image a request names, as an RGB Pillow image; ``InputError`` for anything unusable."""
    value = value.strip()
    lowered = value[:16].lower()
    if lowered.startswith(("http://", "https://")):
        data = fetch_url(value)
        if (answer := _text_answer(data)) is not None:
            raise InputError(f"image URL answered {answer}")
    elif lowered.startswith("data:"):
        match = _DATA_URI.match(value)
        if match is None:
            raise InputError("image data URI must look like data:image/png;base64,<data>")
        data = decode_base64(unquote(value[match.end() :]))  # RFC 2397 lets it be percent-encoded
    elif scheme := _SCHEME.match(value):  # ':' is not in the base64 alphabet: some other scheme
        raise InputError(f"image URL must use http or https, got {scheme.group()[:20]}")
    else:
        data = decode_base64(value)
    return open_image(data)


def _text_answer(data: bytes) -> str | None:
    """What a URL answered instead of an image, when its bytes are a page or an error document. A share
    link (Google Drive, Dropbox, Imgur) answers the page that shows the image, an expired or private
    bucket link an XML error, an API a JSON one; "not a PNG, JPEG, ..." would puzzle a client who knows
    the file is one."""
    head = data[:512].removeprefix(b"\xef\xbb\xbf").lstrip().lower()  # a UTF-8 BOM, then whitespace
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<title", b"<meta", b"<!--")):
        return (
            "a web page (HTML), not an image; use the image file's own URL (share and viewer links answer "
            "a page)"
        )
    if head.startswith(b"<?xml"):
        return "an XML document, not an image (a storage service's error: is the link private or expired?)"
    if head.startswith((b"{", b"[")):
        return "JSON, not an image (an API's answer or error: is the link private or expired?)"
    return None


def decode_base64(text: str) -> bytes:
    compact = re.sub(r"\s+", "", text)
    if len(compact) // 4 * 3 > MAX_IMAGE_BYTES:
        raise InputError(
            f"image must be at most {_megabytes(MAX_IMAGE_BYTES)}, got about {_megabytes(len(compact) // 4 * 3)}"
        )
    # The URL-safe alphabet ("-_" for "+/") and dropped padding are common encoder choices, not errors.
    compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            "image is neither an http(s) URL nor valid base64 (it has characters outside the base64 alphabet, "
            "or its length fits no base64 text)"
        ) from None


def fetch_url(url: str, *, timeout_s: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """GET a public http(s) URL, following at most ``MAX_REDIRECTS`` redirects, each one checked."""
    if len(url) > MAX_URL_CHARS:
        raise InputError(f"image URL must be at most {MAX_URL_CHARS} characters, got {len(url)}")
    deadline = _Deadline(timeout_s)
    for _ in range(MAX_REDIRECTS + 1):
        connection, response = _get(url, deadline)
        try:
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise InputError(f"image URL answered HTTP {response.status} without a Location")
                # http.client decodes header bytes as Latin-1; servers send UTF-8 there.
                location = location.strip().encode("latin-1").decode("utf-8", "surrogateescape")
                try:
                    url = urljoin(url, location)
                except ValueError as exc:  # e.g. an unclosed [ in the host
                    raise InputError(f"image URL redirected to an invalid URL ({reason(exc)})") from None
                continue
            if response.status != 200:
                raise InputError(f"image URL answered HTTP {response.status}, expected 200")
            return _read_body(connection, response, deadline, max_bytes)
        finally:
            response.close()
            connection.finish()
    raise InputError(f"image URL redirected more than {MAX_REDIRECTS} times")


def _get(url: str, deadline: _Deadline) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "http://[oops/": an unclosed or invalid bracketed host
        raise InputError(f"image URL is not a valid URL ({reason(exc)})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InputError(f"image URL must use http or https, got {scheme or 'no scheme'}:")
    host = parts.hostname
    if not host:
        raise InputError("image URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise InputError("image URL has an invalid port") from None
    addresses = _public_addresses(host, port, deadline)
    connection_class = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    connection = connection_class(host, port, addresses, timeout=deadline.remaining())
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # As browsers do: characters HTTP cannot carry (non-ASCII, spaces) are sent percent-encoded.
    try:
        target = quote(target, safe="".join(map(chr, range(0x21, 0x7F))), errors="surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"), which JSON allows
        raise InputError("image URL is not a valid URL (a character has no UTF-8 form)") from None
    # The socket timeout bounds each read, not the whole response: a server sending a header byte
    # at a time would hold the worker for hours. At the deadline the socket is shut down.
    watchdog = threading.Timer(deadline.remaining(), connection.abort)
    watchdog.daemon = True
    watchdog.start()
    connection.watchdog = watchdog
    try:
        connection.request("GET", target, headers={"User-Agent": "turbovideo", "Accept": "image/*"})
        return connection, connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        connection.finish()
        deadline.remaining()  # the watchdog's doing: say so
        raise InputError(f"image URL could not be fetched from {host} ({reason(exc)})") from None


def _public_addresses(host: str, port: int, deadline: _Deadline) -> list[str]:
    """Resolve ``host`` and return its addresses in the resolver's order, refusing any non-public one."""
    addresses = list(dict.fromkeys(info[4][0] for info in _resolve(host, port, deadline)))
    if f"{host}:{port}" not in ALLOWED_PRIVATE_NETLOCS:
        for address in addresses:
            if not _is_public(ipaddress.ip_address(address.split("%", 1)[0])):
                raise InputError(
                    f"image URL host {host!r} resolves to a non-public address ({address}); "
                    "only public http(s) URLs are fetched"
                )
    return addresses


def _resolve(host: str, port: int, deadline: _Deadline) -> list[tuple]:
    """``getaddrinfo`` within the fetch's deadline. A lookup cannot be cancelled, and the resolver's
    own timeouts (5 s per try and name server with glibc) add up past it, so it runs on a daemon
    thread that is left behind when the deadline passes."""
    answer: dict[str, list | None] = {}

    def lookup() -> None:
        try:
            answer["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            answer["infos"] = None

    thread = threading.Thread(target=lookup, name="image-url-lookup", daemon=True)
    thread.start()
    thread.join(deadline.remaining())
    if "infos" not in answer:
        raise deadline.passed()
    if not answer["infos"]:
        raise InputError(f"image URL host {host!r} does not resolve")
    return answer["infos"]


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _is_public(ip.ipv4_mapped)
        if ip in _LOCAL_NAT64 or not all(_is_public(inner) for inner in _tunnelled_ipv4(ip)):
            return False
    return ip.is_global and not ip.is_multicast


# IPv6 ranges whose last 32 bits name the IPv4 host reached: well-known NAT64 (RFC 6052) and the
# deprecated IPv4-compatible form. Local-use NAT64 (RFC 8215) reaches a local network by definition.
_IPV4_SUFFIXED = tuple(map(ipaddress.IPv6Network, ("64:ff9b::/96", "::/96")))
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def _tunnelled_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 hosts an IPv6 address leads to through a translator or tunnel (NAT64, 6to4, Teredo):
    on a host with such a route, 64:ff9b::a9fe:a9fe is the metadata service."""
    inner = [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)] if any(ip in net for net in _IPV4_SUFFIXED) else []
    if ip.sixtofour is not None:
        inner.append(ip.sixtofour)
    if ip.teredo is not None:
        inner.extend(ip.teredo)
    return inner


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to addresses resolved (and checked) beforehand, not re-resolved."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses
        # http.client drops ``sock`` once a closing response arrives; reads still need its timeout.
        self.socket_for_timeouts: socket.socket | None = None
        self.watchdog: threading.Timer | None = None

    def abort(self) -> None:
        """Called from the watchdog thread: wake any blocked read or write with EOF or an error."""
        sock = self.socket_for_timeouts
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def finish(self) -> None:
        """Close for good. (Not ``close``: http.client calls that itself on a closing response,
        before its body is read, and the watchdog must outlive it.)"""
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.close()

    def connect(self) -> None:
        # Each address in turn, as create_connection does with a name: a worker without IPv6 still
        # reaches a host whose IPv6 address the resolver lists first. All of them within the time the
        # fetch has left (the watchdog cannot stop a connect), not that time each.
        end = time.monotonic() + self.timeout
        for address in self.addresses:
            try:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                self.sock = socket.create_connection((address, self.port), left)
                break
            except OSError:
                if address == self.addresses[-1] or time.monotonic() >= end:
                    raise
        self.socket_for_timeouts = self.sock


class _PinnedHTTPS(_PinnedHTTP):
    default_port = 443

    def connect(self) -> None:
        super().connect()
        # Certificates are checked against the URL's host name, not the pinned address.
        self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)
        self.socket_for_timeouts = self.sock


def _read_body(
    connection: _PinnedHTTP, response: http.client.HTTPResponse, deadline: _Deadline, max_bytes: int
) -> bytes:
    header = response.getheader("Content-Length") or ""
    # isdigit alone takes "\xb2" (superscript two), which int() refuses; http.client ignores such a length.
    declared = int(header) if header.isascii() and header.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise InputError(f"image must be at most {_megabytes(max_bytes)}, got {_megabytes(declared)}")
    chunks, size = [], 0
    while True:
        connection.socket_for_timeouts.settimeout(deadline.remaining())
        try:
            chunk = response.read1(64 * 1024)
        except (OSError, http.client.HTTPException) as exc:  # HTTPException: a broken chunked body
            deadline.remaining()
            raise InputError(f"image URL download failed ({reason(exc)})") from None
        if not chunk:
            deadline.remaining()  # an EOF from the watchdog is a timeout, not a short body
            if declared is not None and size < declared:
                raise InputError(f"image URL download ended after {size} of {declared} bytes")
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise InputError(f"image must be at most {_megabytes(max_bytes)}")
        chunks.append(chunk)


class _Deadline:
    """One time budget for the whole fetch, redirects included."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.end = time.monotonic() + limit_s

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.passed()
        return left

    def passed(self) -> InputError:
        return InputError(f"image URL took longer than {self.limit_s:g} s to download")


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB".replace(".0 MB", " MB")
