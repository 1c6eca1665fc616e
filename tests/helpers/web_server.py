"""A local HTTP(S) server for the crawler tests (127.0.0.1 only) and a clock that counts waits."""

from __future__ import annotations

import io
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from usam.images.fetching import Clock

# a self-signed certificate and key for 'localhost' (valid to 2126), for tests only:
# clients trust it through SSL_CERT_FILE
TLS_CERT = Path(__file__).with_name("localhost_tls.pem")


@contextmanager
def local_server(handler: type[BaseHTTPRequestHandler], *, tls: bool = False) -> Iterator[str]:
    """Serves ``handler`` on a free loopback port; yields the base URL (https://localhost
    with ``tls``)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(TLS_CERT)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    port = httpd.server_address[1]
    try:
        yield f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    content_type: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
    except OSError:
        pass  # the client gave up


def drip(handler: BaseHTTPRequestHandler, data: bytes, interval: float, done: dict) -> None:
    """Writes ``data`` raw, one byte per ``interval`` seconds, until the client leaves.

    Bounded by ``len(data)``: it stops by itself. Records into ``done`` the bytes sent
    and whether all of them went out.
    """
    sent = 0
    stop = threading.Event()
    try:
        for byte in data:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            sent += 1
            stop.wait(interval)
    except OSError:  # a broken pipe, a reset, a TLS connection cut
        pass
    handler.close_connection = True
    done.update(sent=sent, finished=sent == len(data))
    done["event"].set()


def encoded(seed: int, fmt: str = "JPEG", mode: str = "RGB", size=(40, 30)) -> bytes:
    """A random-pixel image file."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


class FakeClock(Clock):
    """Time that moves only when something sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.time = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self.time

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.time += seconds
