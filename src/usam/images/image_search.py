"""Training images from class names alone, through an image-search API that needs no
key and reports each image's licence (:mod:`usam.images.search_providers`).

Each class is searched with every query template (``{c}`` is the class name, or
each member of a superclass), the queries taking turns page by page, until
``per_class`` images from this provider are stored or the queries run out. A hit
is skipped before download when its licence is not in ``licenses``, its MIME
type is no image or its reported size is under ``min_side`` (counted in the
log, not kept as a failure, so a rerun with other settings weighs it again);
after download it must decode, be at least ``min_side`` pixels on its shorter side, and differ from
every stored image (sha256 of the stored JPEG, and a dHash more than
``near_duplicate_bits`` away, within and across classes) and from every image
named in ``exclude_images`` (the evaluation set: the paper's setting has no
test-distribution images in training).

The image set is the one :mod:`usam.images.web_crawl` fills from URL lists and
folders (source ``web``), so extraction and training read it unchanged. Each image's record adds
provider, query, source page, creator, licence and attribution line, and
``ATTRIBUTION.csv`` lists them for the whole set. Runs resume like the URL
ingest: stored and failed images are not fetched again, and a class counts
what it already has, so a run killed at any point and started again stores
every image once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.progress import TextColumn

from usam.core.progress import progress_bar
from usam.core.stopping import stop_if_requested, stop_requested
from usam.core.vocabulary import Vocabulary
from usam.formats.image_shards import ImageManifest, ImageShardWriter, sha256
from usam.formats.storage import atomic_write_text
from usam.images.fetching import JSON, Clock, Fetcher, FetchError, HostGate
from usam.images.image_sets import PHOTOS
from usam.images.ingest_inputs import Entry
from usam.images.ingest_settings import IngestError, IngestSettings
from usam.images.perceptual_hash import ExcludedImages, HashIndex, dhash_bytes
from usam.images.robots import RobotsRules
from usam.images.search_providers import PROVIDERS, Candidate, SearchError
from usam.images.web_crawl import FAILED_NAME, FailureLog, decode_image, origin
from usam.viz.contact_sheet import write_contact_sheets

log = logging.getLogger(__name__)

ATTRIBUTION_NAME = "ATTRIBUTION.csv"
FAILED_SEARCHES_IN_A_ROW = 3  # then the API is down or the quota spent: stop, rerun later
ATTRIBUTION_COLUMNS = (
    "key",
    "class",
    "provider",
    "title",
    "creator",
    "license",
    "license_version",
    "source_page",
    "url",
    "attribution",
)


@dataclass
class Query:
    """One search of one class; ``state`` is the next page's, None once it has run out."""

    text: str
    member: str | None
    state: Any
    pages: int = 0


def class_queries(vocab: Vocabulary, index: int, templates: list[str], first: Any) -> list[Query]:
    name = vocab.classes[index]
    terms = [(member, member) for member in vocab.members.get(name, ())] or [(name, None)]
    return [
        Query(template.format(c=term), member, first)
        for template in templates
        for term, member in terms
    ]


class _SearchRun:
    """The state of one ingest: what is stored, what failed, and the hashes to compare with."""

    def __init__(
        self, vocab: Vocabulary, writer: ImageShardWriter, settings: IngestSettings, clock: Clock
    ) -> None:
        self.vocab = vocab
        self.writer = writer
        self.settings = settings
        self.provider = PROVIDERS[settings.kind](settings)
        api_host = urlsplit(settings.api_url).hostname or ""
        gate = HostGate(settings.politeness_delay, clock, {api_host: settings.search_delay})
        self.fetcher = Fetcher(settings, gate)
        self.robots = RobotsRules(self.fetcher) if settings.respect_robots else None
        self.excluded = ExcludedImages(settings.exclude_images, settings.near_duplicate_bits)
        self.failures = FailureLog(writer.directory / FAILED_NAME, "url")
        self.stored: set[str] = set()
        self.by_hash: dict[str, str] = {}
        self.near = HashIndex(settings.near_duplicate_bits)
        self.counts: Counter[str] = Counter()
        for key, meta in writer.done.items():
            self.stored.add(meta.get("url"))
            self.by_hash[meta["sha256"]] = key
            if "dhash" in meta:
                self.near.add(int(meta["dhash"], 16), key)
            if meta.get("provider") == self.provider.name:
                self.counts[meta["class_name"]] += 1
        self.screened: Counter[str] = Counter()
        self.searches = 0
        self.failed_searches = 0
        self.failed_in_a_row = 0

    def search(self, query: Query) -> list[Candidate]:
        """The next page of hits; a failed page ends that query (the next run tries again)."""
        url = self.provider.request_url(query.text, query.state)
        try:
            body, _, _ = self.fetcher.fetch(url, accept=JSON)
            candidates, query.state = self.provider.parse(json.loads(body), query.state)
        except (FetchError, SearchError, json.JSONDecodeError) as error:
            self.failed_searches += 1
            query.state = None
            if self.searches == 0 and not getattr(error, "retryable", False):
                raise IngestError(
                    f"the {self.provider.name} API at {self.settings.api_url} answered {url} "
                    f"with: {error}; check ingest.api_url"
                ) from None
            self.failed_in_a_row += 1
            if self.failed_in_a_row >= FAILED_SEARCHES_IN_A_ROW:
                raise IngestError(
                    f"{self.failed_in_a_row} searches in a row failed, the last with: {error}; "
                    f"the {self.provider.name} API is down or this client's quota is spent. "
                    "Run the same command later: it goes on where this run stopped"
                ) from None
            log.warning("search %r failed (%s); its remaining pages are skipped", url, error)
            return []
        self.failed_in_a_row = 0
        self.searches += 1
        query.pages += 1
        if query.pages >= self.settings.max_pages:
            query.state = None
        return candidates

    def screen(self, candidates: list[Candidate], seen: set[str]) -> list[Candidate]:
        """Hits worth downloading. Those turned away by their metadata are counted, not
        logged as failures, so a rerun with other licences or ``min_side`` weighs them again."""
        settings = self.settings
        keep = []
        for candidate in candidates:
            if candidate.url in seen or candidate.url in self.stored:
                continue
            seen.add(candidate.url)
            if candidate.url in self.failures.done:
                continue
            if candidate.license not in settings.licenses:
                self.screened[f"licence {candidate.license}"] += 1
            elif candidate.mime and not candidate.mime.startswith("image/"):
                self.screened[candidate.mime] += 1
            elif min(candidate.width or math.inf, candidate.height or math.inf) < settings.min_side:
                self.screened["under min_side"] += 1
            else:
                keep.append(candidate)
        return keep

    def download(self, candidate: Candidate) -> tuple[bytes, int, int, int, str, int]:
        """(JPEG, width, height, dHash, final URL, attempts); runs in the pool."""
        if self.robots is not None:
            self.robots.check(candidate.url)
        body, final_url, attempts = self.fetcher.fetch(candidate.url)
        jpeg, width, height = decode_image(body, self.settings)
        if min(width, height) < self.settings.min_side:
            raise FetchError("too_small", f"{width}x{height} is under min_side")
        return jpeg, width, height, dhash_bytes(jpeg), final_url, attempts

    def store(self, query: Query, index: int, candidate: Candidate, result: tuple) -> None:
        """Writes one download unless it repeats a stored or an evaluation image."""
        jpeg, width, height, value, final_url, attempts = result
        digest = sha256(jpeg)
        if digest in self.by_hash:
            twin = self.by_hash[digest]
            seen_at = origin(self.writer.done[twin])
            raise FetchError("duplicate", f"same image as {twin} ({seen_at})")
        self.excluded.check(value)
        if hit := self.near.match(value):
            raise FetchError("near_duplicate", f"{hit[1]} of 64 bits from {hit[0]}")
        key = f"web-{digest[:24]}"
        name = self.vocab.classes[index]
        self.writer.write(
            key,
            jpeg,
            {
                "class_name": name,
                "class_index": index,
                "source": "web",
                "member": query.member,
                "width": width,
                "height": height,
                "url": candidate.url,
                "final_url": final_url,
                "attempts": attempts,
                "provider": self.provider.name,
                "query": query.text,
                "source_page": candidate.page,
                "title": candidate.title,
                "creator": candidate.creator,
                "license": candidate.license,
                "license_version": candidate.license_version,
                "attribution": candidate.attribution,
                "dhash": f"{value:016x}",
            },
        )
        self.stored.add(candidate.url)
        self.by_hash[digest] = key
        self.near.add(value, key)
        self.counts[name] += 1

    def fill_class(self, index: int, pool: ThreadPoolExecutor, advance) -> None:
        """Searches until the class has ``per_class`` images from this provider."""
        settings = self.settings
        name = self.vocab.classes[index]
        queries = class_queries(self.vocab, index, settings.queries, self.provider.first_page())
        seen: set[str] = set()
        while self.counts[name] < settings.per_class and any(q.state is not None for q in queries):
            for query in [q for q in queries if q.state is not None]:
                if self.counts[name] >= settings.per_class:
                    break
                todo = self.screen(self.search(query), seen)
                while todo and self.counts[name] < settings.per_class:
                    batch = todo[: settings.per_class - self.counts[name]]
                    todo = todo[len(batch) :]
                    futures = [pool.submit(self.download, c) for c in batch]
                    for candidate, future in zip(batch, futures):  # in order: the first copy wins
                        try:
                            self.store(query, index, candidate, future.result())
                        except FetchError as error:
                            entry = Entry(candidate.url, index, name, query.member)
                            self.failures.add(entry, error)
                        else:
                            advance()
                        stop_if_requested()
        if self.counts[name] < settings.per_class:
            log.warning(
                "class %r: %d of %d images; the searches ran out (add ingest.queries or rerun)",
                name,
                self.counts[name],
                settings.per_class,
            )


def write_attribution(out_dir: Path, samples: list[tuple[str, dict[str, Any]]]) -> Path:
    """``ATTRIBUTION.csv``: the credit line and licence of every searched image in the set."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(ATTRIBUTION_COLUMNS)
    for key, meta in samples:
        if "provider" in meta:
            row = {**meta, "key": key, "class": meta["class_name"]}
            writer.writerow(["" if row[c] is None else row[c] for c in ATTRIBUTION_COLUMNS])
    path = out_dir / ATTRIBUTION_NAME
    atomic_write_text(path, buffer.getvalue())
    return path


def ingest_search(
    vocab: Vocabulary,
    out_dir: str | Path,
    settings: IngestSettings,
    *,
    progress: bool = True,
    clock: Clock | None = None,
) -> ImageManifest:
    """Search, download, check, de-duplicate and store ``per_class`` images of every class."""
    out_dir = Path(out_dir)
    config = {k: v for k, v in asdict(settings).items() if k != "out_dir"}
    bar = progress_bar(TextColumn("{task.fields[name]}"), enabled=progress)
    with ImageShardWriter(
        out_dir,
        vocabulary=vocab.name,
        classes=vocab.classes,
        source=PHOTOS,
        config=config,
        images_per_shard=settings.images_per_shard,
    ) as writer:
        run = _SearchRun(vocab, writer, settings, clock or Clock())
        pool = ThreadPoolExecutor(max_workers=settings.workers)
        total = settings.per_class * vocab.num_classes
        task = bar.add_task(f"{settings.kind} images", total=total, name="")
        bar.update(task, completed=sum(run.counts.values()))
        try:
            with bar:
                for index, name in enumerate(vocab.classes):
                    bar.update(task, name=name)
                    run.fill_class(index, pool, lambda: bar.update(task, advance=1))
        finally:  # a stop leaves the downloads in flight to their deadlines
            pool.shutdown(wait=not stop_requested(), cancel_futures=True)
            run.failures.close()
    write_attribution(out_dir, list(writer.done.items()))
    write_contact_sheets(out_dir, max_per_class=settings.contact_sheet_max)
    log.info(
        "%d images in %s (%s); %d searches, %d failed; hits left out by their metadata: %s; "
        "downloads turned away this run: %s (see %s)",
        writer.manifest.num_images,
        out_dir,
        dict(run.counts),
        run.searches,
        run.failed_searches,
        dict(run.screened) or "none",
        dict(run.failures.kinds) or "none",
        out_dir / FAILED_NAME,
    )
    return writer.manifest
