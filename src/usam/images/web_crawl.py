"""Training images that already exist: a URL list (web-crawled) or a local folder tree.

A URL list is CSV (a header with ``url`` and ``class`` columns) or JSONL (one
``{"url": ..., "class": ...}`` per line), the shape img2dataset users know.
Downloads run in a thread pool through :class:`~usam.images.fetching.Fetcher`
(deadlines, retries, size cap, politeness, public addresses only, each host's
robots.txt), then a content-type check (``image/*``, ``application/octet-stream``
or none) and a full decode (truncated files are rejected). A local tree is
``root/<class>/**/*.jpg`` (any common image suffix); folder names are matched to
the vocabulary as class names, with ``_`` read as a space.

Every image is stored as an upright RGB JPEG, de-duplicated by the sha256 of
those bytes. Every URL or file that did not make it gets a line in
``failed.jsonl`` (what, class, kind, reason). Runs resume: URLs or files already
stored or already failed are not fetched again (delete ``failed.jsonl`` to retry
the failures). A class given as a member of a superclass (``cat`` under
``voc_superclasses``) is stored under its superclass, with the member recorded.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from rich.progress import TextColumn

from usam.core.progress import progress_bar
from usam.core.stopping import stop_if_requested, stop_requested
from usam.core.vocabulary import Vocabulary, normalise_name
from usam.formats.image_shards import (
    IMAGE_SUFFIXES,
    ImageManifest,
    ImageShardWriter,
    encode_jpeg,
    sha256,
)
from usam.images.fetching import Fetcher, FetchError
from usam.images.ingest_settings import IngestError, IngestSettings
from usam.images.robots import RobotsRules
from usam.viz.contact_sheet import write_contact_sheets

log = logging.getLogger(__name__)

FAILED_NAME = "failed.jsonl"


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
        todo, by_hash = _pending(entries, writer, failures)
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
                    added += _store(future, entry, writer, by_hash, failures, source)
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
    stored = {meta[field] for meta in writer.done.values()}
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
    source: str,
) -> bool:
    """Store one result unless it failed or repeats a stored image; True when stored."""
    try:
        jpeg, meta = future.result()
        digest = sha256(jpeg)
        if digest in by_hash:
            twin = writer.done[by_hash[digest]][failures.field]
            raise FetchError("duplicate", f"same image as {by_hash[digest]} ({twin})")
    except FetchError as error:
        failures.add(entry, error)
        return False
    key = f"{source}-{digest[:24]}"
    writer.write(key, jpeg, meta)
    by_hash[digest] = key
    return True


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
