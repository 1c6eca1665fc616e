"""One HTTP download, bounded in time, size and reach, and polite to the host.

Only http and https are fetched, also after redirects. Every URL has a wall-clock
deadline (``max_seconds``) across all its reads, retries and waits: a watchdog
shuts the connection's socket when it passes, so a server that drips a byte at a
time cannot hold a worker; a response that was merely slow is not retried. Each
socket read also has its own timeout. Transient failures (timeouts, connection
errors, 5xx, 429) are retried with exponential backoff, or after the server's
``Retry-After`` (capped), which also holds back every other request to that host.

Hosts that resolve to loopback, private, link-local or otherwise non-global
addresses are refused, checked again for every redirect, unless
``allow_private_addresses`` is set (for crawling one's own network). The check
resolves the name just before the request; a host that changes its answer between
that check and the connection is not caught. Image hosts' robots.txt is
:mod:`usam.images.robots`.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from usam.images.ingest_settings import IngestSettings

ALLOWED_SCHEMES = ("http", "https")
IMAGE = "image/*"
JSON = "application/json"
ANY = "*/*"
ACCEPTED_BINARY = ("application/octet-stream", "binary/octet-stream")
RETRYABLE_STATUS = (408, 425, 429, 500, 502, 503, 504)
URL_KEEP = "!#$%&'()*+,/:;=?@[]~"  # reserved characters and escapes: they stay as they are


class FetchError(Exception):
    """One URL or file that did not make it; ``kind`` groups reasons in the summary."""

    def __init__(
        self, kind: str, reason: str, *, retryable: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.reason  # with what the retries added


def sendable_url(url: str) -> str:
    """The URL with what a client cannot send (spaces, control and non-ASCII characters in
    its path, query and fragment, as search results carry them) percent-encoded; what is
    already escaped stays. A bad host is left for the request to refuse."""
    parts = urlsplit(url)
    path, query, fragment = (quote(p, safe=URL_KEEP) for p in parts[2:])
    return urlunsplit((parts.scheme, parts.netloc, path, query, fragment))


class Clock:
    """Monotonic time and sleeping; tests pass one that counts waits instead of sleeping."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class HostGate:
    """Spaces requests to the same host by ``delay`` seconds (or that host's own) across threads."""

    def __init__(
        self, delay: float, clock: Clock | None = None, delays: dict[str, float] | None = None
    ) -> None:
        self.delay = delay
        self.delays = dict(delays or {})
        self.clock = clock or Clock()
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, host: str) -> None:
        with self._lock:
            now = self.clock.now()
            slot = max(now, self._next.get(host, now))
            self._next[host] = slot + self.delays.get(host, self.delay)
        if slot > now:
            self.clock.sleep(slot - now)

    def hold(self, host: str, seconds: float) -> None:
        """No request to ``host`` for ``seconds`` from now (a server's Retry-After)."""
        with self._lock:
            now = self.clock.now()
            self._next[host] = max(self._next.get(host, now), now + seconds)


def resolve_addresses(host: str) -> list[str]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PublicHostsOnly(urllib.request.BaseHandler):
    """Refuses a request (the first or a redirect) to a host with a non-public address.

    Requests are pre-processed before any handler opens them, so the target host is
    the one checked even when a proxy carries the request.
    """

    def __init__(self, resolve: Callable[[str], list[str]]) -> None:
        self.resolve = resolve

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        host = urlsplit(request.full_url).hostname or ""
        try:
            addresses = self.resolve(host)
        except (OSError, UnicodeError) as error:
            raise FetchError("connection", f"cannot resolve {host} ({error})") from None
        inward = [a for a in addresses if not is_public(a)]
        if inward or not addresses:
            raise FetchError(
                "address",
                f"{request.full_url} is on {host} ({', '.join(inward) or 'no address'}), not a "
                "public address; set ingest.allow_private_addresses=true to crawl your own network",
            )
        return request

    https_request = http_request


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http and https (urllib alone would also follow ftp)."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if urlsplit(target).scheme.lower() not in ALLOWED_SCHEMES:
            raise FetchError("scheme", f"redirected to {target}; only http and https are fetched")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_attempt_state = threading.local()


class _Watchdog:
    """Shuts every connection an attempt opens (in this thread) once its time is up.

    It holds a duplicate of each socket: TLS takes the original socket object over
    (detaching it) while the connection, which the duplicate still reaches, stays
    the same, so a slow handshake or a slow encrypted body is cut as well.
    """

    def __init__(self, seconds: float) -> None:
        self.tripped = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._trip)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        _attempt_state.watchdog = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _attempt_state.watchdog = None
        with self._lock:
            for duplicate in self._sockets:
                duplicate.close()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self.tripped:
                sock.close()
                raise TimeoutError("the URL's deadline passed")
            self._sockets.append(sock.dup())

    def _trip(self) -> None:
        with self._lock:
            self.tripped = True
            for duplicate in self._sockets:
                try:
                    duplicate.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the connection is already gone


def _watched_connection(address, timeout, source_address=None) -> socket.socket:
    sock = socket.create_connection(address, timeout, source_address)
    watchdog = getattr(_attempt_state, "watchdog", None)
    if watchdog is not None:
        watchdog.watch(sock)
    return sock


class _WatchedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _watched_connection


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _watched_connection


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_WatchedHTTPConnection, req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_WatchedHTTPSConnection, req, context=self._context)


def _retry_after(value: str | None, cap: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta or HTTP date), at most ``cap``."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(when - time.time(), 0.0), cap)


def _type_accepted(accept: str, content_type: str) -> bool:
    if accept == ANY:
        return True
    if accept == IMAGE:
        return content_type.startswith("image/") or content_type in ACCEPTED_BINARY
    return content_type == accept


class Fetcher:
    """Downloads one URL to its body, or raises :class:`FetchError`."""

    def __init__(
        self,
        settings: IngestSettings,
        gate: HostGate | None = None,
        *,
        resolve: Callable[[str], list[str]] = resolve_addresses,
    ) -> None:
        self.settings = settings
        self.gate = gate or HostGate(settings.politeness_delay)
        self.opener = urllib.request.OpenerDirector()
        handlers = [
            urllib.request.ProxyHandler(),
            urllib.request.UnknownHandler(),
            _WatchedHTTPHandler(),
            _WatchedHTTPSHandler(),
            urllib.request.HTTPDefaultErrorHandler(),
            _HttpOnlyRedirects(),
            urllib.request.HTTPErrorProcessor(),
        ]
        if not settings.allow_private_addresses:
            handlers.append(_PublicHostsOnly(resolve))
        for handler in handlers:
            self.opener.add_handler(handler)

    def fetch(self, url: str, accept: str = IMAGE) -> tuple[bytes, str, int]:
        """(body, final URL, attempts), all within ``max_seconds`` of the first attempt."""
        url = sendable_url(url)
        parts = urlsplit(url)
        if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.hostname:
            raise FetchError(
                "scheme", f"unsupported URL {url!r}; only http(s) URLs with a host are fetched"
            )
        settings = self.settings
        deadline = None
        attempt = 0
        while True:
            attempt += 1
            self.gate.wait(parts.hostname)
            deadline = deadline or time.monotonic() + settings.max_seconds
            try:
                body, final_url = self._attempt(url, accept, deadline - time.monotonic())
                return body, final_url, attempt
            except FetchError as error:
                held = error.retry_after is not None
                wait = error.retry_after if held else settings.backoff * 2 ** (attempt - 1)
                if not error.retryable or attempt > settings.retries:
                    if attempt > 1:
                        error.reason += f" (after {attempt} attempts)"
                    raise
                if time.monotonic() + wait >= deadline:
                    error.reason += f" (no time left for a retry in {settings.max_seconds}s)"
                    raise
            if held:
                self.gate.hold(parts.hostname, wait)
            else:
                self.gate.clock.sleep(wait)

    def _attempt(self, url: str, accept: str, seconds: float) -> tuple[bytes, str]:
        request = urllib.request.Request(
            url, headers={"User-Agent": self.settings.user_agent, "Accept": accept}
        )
        with _Watchdog(seconds) as watchdog:
            try:
                result = self._read(request, accept)
            except FetchError as error:
                if not (watchdog.tripped and error.kind in ("timeout", "connection")):
                    raise
            if not watchdog.tripped:
                return result
        raise FetchError(
            "timeout", f"not done within the deadline of {self.settings.max_seconds}s"
        ) from None

    def _read(self, request: urllib.request.Request, accept: str) -> tuple[bytes, str]:
        settings = self.settings
        try:
            with self.opener.open(request, timeout=settings.timeout) as response:
                final_url = response.geturl()
                if response.headers.get("Content-Type") is not None:
                    content_type = response.headers.get_content_type()
                    if not _type_accepted(accept, content_type):
                        raise FetchError(
                            "content_type", f"content type {content_type} is not {accept}"
                        )
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > settings.max_bytes:
                    raise FetchError(
                        "too_large", f"{length} bytes is over the cap of {settings.max_bytes}"
                    )
                chunks, total = [], 0
                while chunk := response.read1(65536):
                    total += len(chunk)
                    if total > settings.max_bytes:
                        raise FetchError("too_large", f"body over the cap of {settings.max_bytes}")
                    chunks.append(chunk)
                return b"".join(chunks), final_url
        except urllib.error.HTTPError as error:
            retry_after = _retry_after(error.headers.get("Retry-After"), settings.retry_after_cap)
            error.close()
            retryable = error.code in RETRYABLE_STATUS
            reason = f"HTTP {error.code} {error.reason}"
            if retry_after is not None and retryable:
                reason += f" (Retry-After {retry_after:g}s)"
            else:
                retry_after = None
            raise FetchError("http", reason, retryable=retryable, retry_after=retry_after) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                reason = f"no answer in {settings.timeout}s"
                raise FetchError("timeout", reason, retryable=True) from None
            reason = f"connection failed ({error.reason})"
            raise FetchError("connection", reason, retryable=True) from None
        except TimeoutError:
            raise FetchError("timeout", f"no data in {settings.timeout}s", retryable=True) from None
        except (ValueError, http.client.InvalidURL) as error:  # no request could carry it
            raise FetchError("invalid_url", f"invalid URL ({error})") from None
        except (http.client.HTTPException, ConnectionError) as error:
            raise FetchError("connection", f"broken response ({error!r})", retryable=True) from None
