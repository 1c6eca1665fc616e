"""Training images that already exist: a URL list (web-crawled) or a local folder tree.

A URL list is CSV (a header with ``url`` and ``class`` columns) or JSONL (one
``{"url": ..., "class": ...}`` per line), the shape img2dataset users know.
Only http and https are fetched, also after redirects. Downloads run in a
thread pool with a timeout per socket operation and per download, retries with
exponential backoff for transient failures (timeouts, 5xx, 429), a size cap, a
content-type check (``image/*``, ``application/octet-stream`` or none), a full
decode (truncated files are rejected) and a politeness delay between requests
to the same host. A local tree is ``root/<class>/**/*.jpg`` (any common image
suffix); folder names are matched to the vocabulary as class names, with ``_``
read as a space.

Every image is stored as an upright RGB JPEG, de-duplicated by the sha256 of
those bytes. Every URL or file that did not make it gets a line in
``failed.jsonl`` (what, class, kind, reason). Runs resume: URLs or files already
stored or already failed are not fetched again (delete ``failed.jsonl`` to retry
the failures). A class given as a member of a superclass (``cat`` under
``voc_superclasses``) is stored under its superclass, with the member recorded.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from PIL import Image
from rich.progress import TextColumn

from usam.core.config import settings_from_config
from usam.core.progress import progress_bar
from usam.core.vocabulary import Vocabulary, normalise_name
from usam.formats.image_shards import (
    IMAGE_SUFFIXES,
    ImageManifest,
    ImageShardWriter,
    encode_jpeg,
    sha256,
)
from usam.viz.contact_sheet import write_contact_sheets

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("http", "https")
ACCEPTED_TYPES = ("application/octet-stream", "binary/octet-stream")
RETRYABLE_STATUS = (408, 425, 429, 500, 502, 503, 504)
FAILED_NAME = "failed.jsonl"


class IngestError(ValueError):
    """Input that cannot be ingested at all: a malformed list, an unknown class, bad settings."""


class FetchError(Exception):
    """One URL or file that did not make it; ``kind`` groups reasons in the summary."""

    def __init__(self, kind: str, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.retryable = retryable


@dataclass
class IngestSettings:
    """The ``ingest`` config group."""

    kind: str = "web"  # web (a URL list) | folder (a local tree)
    urls: str | None = None  # kind=web: CSV or JSONL with url,class
    root: str | None = None  # kind=folder: root/<class>/*.jpg
    name: str | None = None  # suffix of the default output directory (default: kind)
    workers: int = 16
    timeout: float = 10.0  # seconds per connect or read
    max_seconds: float = 60.0  # seconds per download attempt in all
    retries: int = 2
    backoff: float = 1.0  # first retry waits this long, then twice as long each time
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    politeness_delay: float = 1.0  # seconds between requests to the same host
    user_agent: str = "usam-ingest/0.1 (research; training images from class names)"
    jpeg_quality: int = 95
    images_per_shard: int = 1000
    out_dir: str | None = None
    contact_sheet_max: int = 64

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> IngestSettings:
        return settings_from_config(cls, config, "ingest", IngestError)

    def check(self) -> None:
        if self.kind not in ("web", "folder"):
            raise IngestError(f"ingest.kind is {self.kind!r}; use web or folder")
        needed = "urls" if self.kind == "web" else "root"
        if not getattr(self, needed):
            example = "ingest.urls=FILE" if self.kind == "web" else "ingest=folder ingest.root=DIR"
            raise IngestError(
                f"ingest.{needed} is not set; run e.g. `python -m usam.ingest {example}`"
            )
        for name in ("workers", "max_bytes", "max_pixels", "images_per_shard"):
            if getattr(self, name) < 1:
                raise IngestError(f"ingest.{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("timeout", "max_seconds"):
            if getattr(self, name) <= 0:
                raise IngestError(f"ingest.{name} must be positive (got {getattr(self, name)})")
        for name in ("retries", "backoff", "politeness_delay"):
            if getattr(self, name) < 0:
                raise IngestError(f"ingest.{name} may not be negative (got {getattr(self, name)})")


@dataclass(frozen=True)
class Entry:
    """One thing to ingest: a URL (with its line in the list) or a file (relative path)."""

    ident: str  # the URL or the relative path: what failed.jsonl and resuming go by
    class_index: int
    class_name: str
    member: str | None
    line: int | None = None
    path: Path | None = None


def resolve_class(vocab: Vocabulary, raw: str) -> tuple[int, str | None] | None:
    """(class index, member) for a class or a superclass member; None when unknown."""
    candidates = dict.fromkeys((normalise_name(raw), normalise_name(str(raw).replace("_", " "))))
    for name in candidates:
        if name in vocab.classes:
            return vocab.classes.index(name), None
    for index, group in enumerate(vocab.classes):
        for name in candidates:
            if name in vocab.members.get(group, ()):
                return index, name
    return None


def _unknown_classes_error(vocab: Vocabulary, where: str, unknown: Iterable[str]) -> IngestError:
    return IngestError(
        f"{where}: {', '.join(unknown)} not a class of vocabulary '{vocab.name}' "
        f"({', '.join(vocab.classes)}); fix the names or set data.classes to a list that has them"
    )


def _url_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    raise IngestError(f"{path} line {number} is not JSON ({error})") from error
                if not isinstance(row, dict):
                    raise IngestError(f"{path} line {number} is not a JSON object")
                yield number, row
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            if "url" not in columns or "class" not in columns:
                raise IngestError(
                    f"{path}: the header must name 'url' and 'class' columns (found {columns})"
                )
            for number, row in enumerate(reader, start=2):
                yield number, {k.strip().lower(): v for k, v in row.items() if k}
    else:
        raise IngestError(f"{path}: a URL list must be .csv, .tsv or .jsonl (with url,class)")


def read_url_list(path: str | Path, vocab: Vocabulary) -> list[Entry]:
    """The entries of a URL list, first occurrence of each URL only; unknown classes fail."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"URL list {path} does not exist")
    entries: dict[str, Entry] = {}
    unknown: dict[str, int] = {}
    for number, row in _url_rows(path):
        url = str(row.get("url") or "").strip()
        raw_class = str(row.get("class") or "").strip()
        if not url or not raw_class:
            raise IngestError(f"{path} line {number}: both 'url' and 'class' are needed")
        resolved = resolve_class(vocab, raw_class)
        if resolved is None:
            unknown.setdefault(repr(raw_class), number)
            continue
        index, member = resolved
        entries.setdefault(url, Entry(url, index, vocab.classes[index], member, line=number))
    if unknown:
        where = [f"{name} (line {line})" for name, line in list(unknown.items())[:10]]
        raise _unknown_classes_error(vocab, str(path), where)
    return list(entries.values())


def scan_folder(root: str | Path, vocab: Vocabulary) -> list[Entry]:
    """Image files under root/<class>/, sorted; unknown class folders fail."""
    root = Path(root)
    if not root.is_dir():
        raise IngestError(f"image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise IngestError(f"{root} has no class folders; lay images out as {root}/<class>/*.jpg")
    unknown = [repr(f.name) for f in folders if resolve_class(vocab, f.name) is None]
    if unknown:
        raise _unknown_classes_error(vocab, f"class folder(s) in {root}", unknown)
    entries = []
    for folder in folders:
        index, member = resolve_class(vocab, folder.name)
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            log.warning("class folder %s holds no images", folder)
        for file in files:
            rel = file.relative_to(root).as_posix()
            entries.append(Entry(rel, index, vocab.classes[index], member, path=file))
    return entries


def decode_image(data: bytes, settings: IngestSettings) -> tuple[bytes, int, int]:
    """(RGB JPEG bytes, width, height) of a fully decodable image."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > settings.max_pixels:
            raise FetchError("too_large", f"{image.width}x{image.height} pixels is over max_pixels")
        image.load()
        jpeg = encode_jpeg(image, settings.jpeg_quality)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise FetchError("decode", f"not a decodable image ({error})") from error
    return jpeg, image.width, image.height


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http and https (urllib alone would also follow ftp)."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if urlsplit(target).scheme.lower() not in ALLOWED_SCHEMES:
            raise FetchError("scheme", f"redirected to {target}; only http and https are fetched")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class HostGate:
    """Spaces requests to the same host by ``delay`` seconds across all threads."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, host: str) -> None:
        if self.delay <= 0:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next.get(host, now))
            self._next[host] = slot + self.delay
        if slot > now:
            time.sleep(slot - now)


class Fetcher:
    """Downloads one URL to checked image bytes, or raises :class:`FetchError`."""

    def __init__(self, settings: IngestSettings, gate: HostGate | None = None) -> None:
        self.settings = settings
        self.gate = gate or HostGate(settings.politeness_delay)
        self.opener = urllib.request.OpenerDirector()
        for handler in (
            urllib.request.ProxyHandler(),
            urllib.request.UnknownHandler(),
            urllib.request.HTTPHandler(),
            urllib.request.HTTPSHandler(),
            urllib.request.HTTPDefaultErrorHandler(),
            _HttpOnlyRedirects(),
            urllib.request.HTTPErrorProcessor(),
        ):
            self.opener.add_handler(handler)

    def fetch(self, url: str) -> tuple[bytes, str, int]:
        """(body, final URL, attempts); retries transient failures with exponential backoff."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.hostname:
            raise FetchError(
                "scheme", f"unsupported URL {url!r}; only http(s) URLs with a host are fetched"
            )
        attempt = 0
        while True:
            attempt += 1
            self.gate.wait(parts.hostname)
            try:
                body, final_url = self._attempt(url)
                return body, final_url, attempt
            except FetchError as error:
                if not error.retryable or attempt > self.settings.retries:
                    if attempt > 1:
                        error.reason += f" (after {attempt} attempts)"
                    raise
            time.sleep(self.settings.backoff * 2 ** (attempt - 1))

    def _attempt(self, url: str) -> tuple[bytes, str]:
        settings = self.settings
        request = urllib.request.Request(
            url, headers={"User-Agent": settings.user_agent, "Accept": "image/*"}
        )
        deadline = time.monotonic() + settings.max_seconds
        try:
            with self.opener.open(request, timeout=settings.timeout) as response:
                final_url = response.geturl()
                if response.headers.get("Content-Type") is not None:
                    content_type = response.headers.get_content_type()
                    if not content_type.startswith("image/") and content_type not in ACCEPTED_TYPES:
                        raise FetchError("content_type", f"content type {content_type} is no image")
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > settings.max_bytes:
                    raise FetchError(
                        "too_large", f"{length} bytes is over the cap of {settings.max_bytes}"
                    )
                chunks, total = [], 0
                while chunk := response.read(65536):
                    total += len(chunk)
                    if total > settings.max_bytes:
                        raise FetchError("too_large", f"body over the cap of {settings.max_bytes}")
                    if time.monotonic() > deadline:
                        raise FetchError(
                            "timeout", f"slower than {settings.max_seconds}s", retryable=True
                        )
                    chunks.append(chunk)
                return b"".join(chunks), final_url
        except urllib.error.HTTPError as error:
            error.close()
            retryable = error.code in RETRYABLE_STATUS
            reason = f"HTTP {error.code} {error.reason}"
            raise FetchError("http", reason, retryable=retryable) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                reason = f"no answer in {settings.timeout}s"
                raise FetchError("timeout", reason, retryable=True) from None
            reason = f"connection failed ({error.reason})"
            raise FetchError("connection", reason, retryable=True) from None
        except TimeoutError:
            raise FetchError("timeout", f"no data in {settings.timeout}s", retryable=True) from None
        except (http.client.HTTPException, ConnectionError) as error:
            raise FetchError("connection", f"broken response ({error!r})", retryable=True) from None
        except ValueError as error:
            raise FetchError("scheme", f"invalid URL ({error})") from None


class FailureLog:
    """``failed.jsonl``: one line per URL or file that did not make it, flushed as written."""

    def __init__(self, path: Path, field: str) -> None:
        self.path = path
        self.field = field
        self.kinds: Counter[str] = Counter()
        self.done: set[str] = set()
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # a line cut off by a crash: drop it
                text = text[: text.rfind("\n") + 1]
                path.write_text(text, encoding="utf-8")
            for number, line in enumerate(text.splitlines(), start=1):
                try:
                    self.done.add(json.loads(line)[field])
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise IngestError(
                        f"{path} line {number} is not a failure record ({error}); fix or delete "
                        "the line (a deleted line's URL or file is tried again)"
                    ) from error
        self._handle = path.open("a", encoding="utf-8")

    def add(self, entry: Entry, error: FetchError) -> None:
        record = {
            self.field: entry.ident,
            "class": entry.class_name,
            "line": entry.line,
            "kind": error.kind,
            "reason": error.reason,
        }
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        self.done.add(entry.ident)
        self.kinds[error.kind] += 1

    def close(self) -> None:
        self._handle.close()


def _ingest(
    entries: list[Entry],
    work: Callable[[Entry], tuple[bytes, dict[str, Any]]],
    *,
    vocab: Vocabulary,
    source: str,
    out_dir: Path,
    settings: IngestSettings,
    workers: int,
    progress: bool,
) -> ImageManifest:
    """Shared loop: skip what is done, run ``work`` in a pool, de-duplicate and store.

    Results are taken in list order (downloads still overlap), so which of two
    identical images is kept, and the order of the shards, do not depend on timing.
    """
    field = "url" if source == "web" else "path"
    config = {k: v for k, v in asdict(settings).items() if k != "out_dir"}
    with ImageShardWriter(
        out_dir,
        vocabulary=vocab.name,
        classes=vocab.classes,
        source=source,
        config=config,
        images_per_shard=settings.images_per_shard,
    ) as writer:
        failures = FailureLog(out_dir / FAILED_NAME, field)
        stored = {meta[field] for meta in writer.done.values()}
        by_hash = {meta["sha256"]: key for key, meta in writer.done.items()}
        todo = [e for e in entries if e.ident not in stored and e.ident not in failures.done]
        log.info(
            "%d %ss: %d stored, %d failed before, %d to do",
            len(entries),
            field,
            len(stored),
            len(failures.done),
            len(todo),
        )
        bar = progress_bar(
            TextColumn("{task.fields[ok]} ok, {task.fields[failed]} failed"), enabled=progress
        )
        task = bar.add_task(f"{source} images", total=len(todo), ok=0, failed=0)
        pool = ThreadPoolExecutor(max_workers=workers)
        queue = iter(todo)
        running: deque[tuple[Future, Entry]] = deque()
        added = 0
        try:
            with bar:
                while True:
                    while len(running) < 4 * workers and (entry := next(queue, None)):
                        running.append((pool.submit(work, entry), entry))
                    if not running:
                        break
                    future, entry = running.popleft()  # in list order: the first copy wins
                    try:
                        jpeg, meta = future.result()
                        digest = sha256(jpeg)
                        if digest in by_hash:
                            twin = writer.done[by_hash[digest]]
                            raise FetchError(
                                "duplicate", f"same image as {by_hash[digest]} ({twin[field]})"
                            )
                    except FetchError as error:
                        failures.add(entry, error)
                    else:
                        key = f"{source}-{digest[:24]}"
                        writer.write(key, jpeg, meta)
                        by_hash[digest] = key
                        added += 1
                    bar.update(task, advance=1, ok=added, failed=sum(failures.kinds.values()))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            failures.close()
    write_contact_sheets(out_dir, max_per_class=settings.contact_sheet_max)
    log.info(
        "%d images in %s (%d new); failures this run by kind: %s (see %s)",
        writer.manifest.num_images,
        out_dir,
        added,
        dict(failures.kinds) or "none",
        out_dir / FAILED_NAME,
    )
    return writer.manifest


def _metadata(entry: Entry, source: str, width: int, height: int) -> dict[str, Any]:
    return {
        "class_name": entry.class_name,
        "class_index": entry.class_index,
        "source": source,
        "member": entry.member,
        "width": width,
        "height": height,
    }


def ingest_urls(
    url_list: str | Path,
    vocab: Vocabulary,
    out_dir: str | Path,
    settings: IngestSettings,
    *,
    progress: bool = True,
) -> ImageManifest:
    """Download, check, de-duplicate and store the images of a URL list."""
    entries = read_url_list(url_list, vocab)
    fetcher = Fetcher(settings)

    def work(entry: Entry) -> tuple[bytes, dict[str, Any]]:
        body, final_url, attempts = fetcher.fetch(entry.ident)
        jpeg, width, height = decode_image(body, settings)
        meta = _metadata(entry, "web", width, height)
        meta.update(url=entry.ident, final_url=final_url, line=entry.line, attempts=attempts)
        return jpeg, meta

    return _ingest(
        entries,
        work,
        vocab=vocab,
        source="web",
        out_dir=Path(out_dir),
        settings=settings,
        workers=settings.workers,
        progress=progress,
    )


def ingest_folder(
    root: str | Path,
    vocab: Vocabulary,
    out_dir: str | Path,
    settings: IngestSettings,
    *,
    progress: bool = True,
) -> ImageManifest:
    """Check, de-duplicate and store the images of a local root/<class>/ tree."""
    entries = scan_folder(root, vocab)

    def work(entry: Entry) -> tuple[bytes, dict[str, Any]]:
        jpeg, width, height = decode_image(entry.path.read_bytes(), settings)
        meta = _metadata(entry, "folder", width, height)
        meta["path"] = entry.ident
        return jpeg, meta

    return _ingest(
        entries,
        work,
        vocab=vocab,
        source="folder",
        out_dir=Path(out_dir),
        settings=settings,
        workers=min(settings.workers, 4),
        progress=progress,
    )
