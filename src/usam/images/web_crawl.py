"""Training images that already exist: a URL list (web-crawled) or a local folder tree
(read by :mod:`usam.images.ingest_inputs`).

Downloads run in a thread pool through :class:`~usam.images.fetching.Fetcher`
(deadlines, retries, size cap, politeness, public addresses only, each host's
robots.txt), then a content-type check (``image/*``, ``application/octet-stream``
or none) and a full decode (truncated files are rejected).

Every image is stored as an upright RGB JPEG, de-duplicated by the sha256 of
those bytes, and refused when it is a near-copy of an image ``exclude_images`` names
(the evaluation set). URL lists, folders and image searches fill one set of photos
(manifest source ``web``; each image's own ``source`` says ``web`` or ``folder``). Every
URL or file that did not make it gets a line in ``failed.jsonl`` (what, class, kind,
reason). Runs resume: URLs or files already stored or already failed are not fetched
again (delete ``failed.jsonl`` to retry the failures).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image
from rich.progress import TextColumn

from usam.core.progress import progress_bar
from usam.core.stopping import stop_if_requested, stop_requested
from usam.core.vocabulary import Vocabulary
from usam.formats.image_shards import ImageManifest, ImageShardWriter, encode_jpeg, sha256
from usam.images.fetching import Fetcher, FetchError
from usam.images.image_sets import PHOTOS
from usam.images.ingest_inputs import Entry, read_url_list, scan_folder
from usam.images.ingest_settings import IngestError, IngestSettings
from usam.images.perceptual_hash import ExcludedImages, dhash_bytes
from usam.images.robots import RobotsRules
from usam.viz.contact_sheet import write_contact_sheets

log = logging.getLogger(__name__)

FAILED_NAME = "failed.jsonl"
ORIGINS = ("url", "path")  # what an image or a failure came from: a URL or a file in a folder


def origin(meta: dict[str, Any]) -> str:
    """The URL or the file path a stored image came from (a set may hold both kinds)."""
    return next(meta[field] for field in ORIGINS if field in meta)


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
                    record = json.loads(line)
                    origin(record)  # a URL's or a file's: the set may hold both kinds
                    if field in record:
                        self.done.add(record[field])
                except (json.JSONDecodeError, StopIteration, TypeError) as error:
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
    kind: str,
    out_dir: Path,
    settings: IngestSettings,
    workers: int,
    progress: bool,
) -> ImageManifest:
    """Shared loop: skip what is done, run ``work`` in a pool, de-duplicate and store
    (``kind``: ``web`` for URLs, ``folder`` for files).

    Results are taken in list order (downloads still overlap), so which of two
    identical images is kept, and the order of the shards, do not depend on timing.
    """
    excluded = ExcludedImages(settings.exclude_images, settings.near_duplicate_bits)
    with ImageShardWriter(
        out_dir,
        vocabulary=vocab.name,
        classes=vocab.classes,
        source=PHOTOS,
        config={k: v for k, v in asdict(settings).items() if k != "out_dir"},
        images_per_shard=settings.images_per_shard,
    ) as writer:
        failures = FailureLog(out_dir / FAILED_NAME, "url" if kind == "web" else "path")
        todo, by_hash = _pending(entries, writer, failures)
        bar = progress_bar(
            TextColumn("{task.fields[ok]} ok, {task.fields[failed]} failed"), enabled=progress
        )
        task = bar.add_task(f"{kind} images", total=len(todo), ok=0, failed=0)
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
                    added += _store(future, entry, writer, by_hash, failures, excluded)
                    bar.update(task, advance=1, ok=added, failed=sum(failures.kinds.values()))
                    stop_if_requested()
        finally:  # a stop leaves the downloads in flight to their deadlines
            pool.shutdown(wait=not stop_requested(), cancel_futures=True)
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


def _pending(
    entries: list[Entry], writer: ImageShardWriter, failures: FailureLog
) -> tuple[list[Entry], dict[str, str]]:
    """The entries neither stored nor failed before, and the stored images' keys by SHA-256."""
    field = failures.field
    stored = {meta[field] for meta in writer.done.values() if field in meta}
    todo = [e for e in entries if e.ident not in stored and e.ident not in failures.done]
    log.info(
        "%d %ss: %d stored, %d failed before, %d to do",
        len(entries),
        field,
        len(stored),
        len(failures.done),
        len(todo),
    )
    return todo, {meta["sha256"]: key for key, meta in writer.done.items()}


def _store(
    future: Future,
    entry: Entry,
    writer: ImageShardWriter,
    by_hash: dict[str, str],
    failures: FailureLog,
    excluded: ExcludedImages,
) -> bool:
    """Store one result unless it failed, repeats a stored image or is a near-copy of an
    excluded one; True when stored."""
    try:
        jpeg, meta = future.result()
        digest = sha256(jpeg)
        if digest in by_hash:
            twin = origin(writer.done[by_hash[digest]])
            raise FetchError("duplicate", f"same image as {by_hash[digest]} ({twin})")
        excluded.check(int(meta["dhash"], 16))
    except FetchError as error:
        failures.add(entry, error)
        return False
    key = f"{meta['source']}-{digest[:24]}"
    writer.write(key, jpeg, meta)
    by_hash[digest] = key
    return True


def _photo(entry: Entry, kind: str, data: bytes, settings: IngestSettings) -> tuple[bytes, dict]:
    """The stored JPEG of a downloaded or read image and its record, dHash included (what
    exclusion and later image searches compare)."""
    jpeg, width, height = decode_image(data, settings)
    return jpeg, {
        "class_name": entry.class_name,
        "class_index": entry.class_index,
        "source": kind,
        "member": entry.member,
        "width": width,
        "height": height,
        "dhash": f"{dhash_bytes(jpeg):016x}",
    }


def ingest_urls(
    url_list: str | Path,
    vocab: Vocabulary,
    out_dir: str | Path,
    settings: IngestSettings,
    *,
    progress: bool = True,
    fetcher: Fetcher | None = None,
) -> ImageManifest:
    """Download, check, de-duplicate and store the images of a URL list."""
    entries = read_url_list(url_list, vocab)
    fetcher = fetcher or Fetcher(settings)
    robots = RobotsRules(fetcher) if settings.respect_robots else None

    def work(entry: Entry) -> tuple[bytes, dict[str, Any]]:
        if robots is not None:
            robots.check(entry.ident)
        body, final_url, attempts = fetcher.fetch(entry.ident)
        jpeg, meta = _photo(entry, "web", body, settings)
        meta.update(url=entry.ident, final_url=final_url, line=entry.line, attempts=attempts)
        return jpeg, meta

    return _ingest(
        entries,
        work,
        vocab=vocab,
        kind="web",
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
        jpeg, meta = _photo(entry, "folder", entry.path.read_bytes(), settings)
        meta["path"] = entry.ident
        return jpeg, meta

    return _ingest(
        entries,
        work,
        vocab=vocab,
        kind="folder",
        out_dir=Path(out_dir),
        settings=settings,
        workers=min(settings.workers, 4),
        progress=progress,
    )
