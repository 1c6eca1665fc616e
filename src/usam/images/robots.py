"""Each image host's robots.txt, read once per run through the same bounded fetcher."""

from __future__ import annotations

import threading
import urllib.robotparser
from urllib.parse import urlsplit

from usam.images.fetching import ALLOWED_SCHEMES, ANY, Fetcher, FetchError

ROBOTS_AGENT = "usam"


class RobotsRules:
    """Each image host's robots.txt, read once per run: missing (4xx) allows all,
    unreachable (5xx, no answer, a refused address) allows nothing, as RFC 9309 asks."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self._parsers: dict[str, urllib.robotparser.RobotFileParser | FetchError] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def check(self, url: str) -> None:
        """Raises :class:`FetchError` (kind ``robots``) when the host asks crawlers to stay out."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.hostname:
            return  # the fetch refuses it, with the reason
        origin = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
        with self._lock:
            lock = self._locks.setdefault(origin, threading.Lock())
        with lock:
            if origin not in self._parsers:
                self._parsers[origin] = self._read(origin)
        rules = self._parsers[origin]
        if isinstance(rules, FetchError):  # an address refused stays an address refused
            kind = "address" if rules.kind == "address" else "robots"
            raise FetchError(kind, f"{origin}/robots.txt unreadable ({rules.reason}); host skipped")
        if not rules.can_fetch(ROBOTS_AGENT, url):
            raise FetchError("robots", f"{origin}/robots.txt disallows {parts.path}")

    def _read(self, origin: str) -> urllib.robotparser.RobotFileParser | FetchError:
        parser = urllib.robotparser.RobotFileParser(origin + "/robots.txt")
        try:
            body, _, _ = self.fetcher.fetch(origin + "/robots.txt", accept=ANY)
        except FetchError as error:
            if error.kind != "http" or error.retryable:  # a 4xx other than 408/425/429
                return error
            body = b""
        parser.parse(body.decode("utf-8", errors="replace").splitlines())
        return parser
