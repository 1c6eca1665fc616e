"""The ``ingest`` config group: one dataclass, so a misspelt key fails at once, by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from usam.core.config import settings_from_config
from usam.core.errors import UsageError
from usam.images.image_sets import PHOTOS

KINDS = ("web", "folder", "openverse", "wikimedia")
SEARCH_KINDS = ("openverse", "wikimedia")
USER_AGENT = "usam/0.1 (+https://arxiv.org/abs/2312.02420; training images from class names)"


class IngestError(UsageError, ValueError):
    """Input that cannot be ingested at all: a malformed list, an unknown class, bad settings."""


@dataclass
class IngestSettings:
    """Every ``ingest`` key; the search keys only matter for ``openverse`` and ``wikimedia``,
    the exclusion keys for every kind."""

    kind: str = "web"  # web (a URL list) | folder (a local tree) | openverse | wikimedia
    urls: str | None = None  # kind=web: CSV or JSONL with url,class
    root: str | None = None  # kind=folder: root/<class>/*.jpg
    name: str = PHOTOS  # the image set: <vocabulary>_<name>, what data.source selects
    workers: int = 16
    timeout: float = 10.0  # seconds per connect or read
    max_seconds: float = 60.0  # seconds per URL in all: every read, retry and wait
    retries: int = 2
    backoff: float = 1.0  # first retry waits this long, then twice as long each time
    retry_after_cap: float = 30.0  # longest a server's Retry-After is waited for
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    politeness_delay: float = 1.0  # seconds between requests to the same host
    allow_private_addresses: bool = False  # true to crawl loopback and private networks
    respect_robots: bool = True  # image hosts' robots.txt
    user_agent: str = USER_AGENT
    jpeg_quality: int = 95
    images_per_shard: int = 1000
    out_dir: str | None = None
    contact_sheet_max: int = 64
    # image search (kind openverse or wikimedia)
    api_url: str | None = None
    search_delay: float = 3.0  # seconds between two requests to the search API
    per_class: int = 200
    queries: list[str] = field(default_factory=lambda: ["{c}", "a photo of a {c}"])
    page_size: int = 20
    max_pages: int = 20  # per query
    licenses: list[str] = field(default_factory=lambda: ["cc0", "pdm", "by", "by-sa"])
    min_side: int = 128  # pixels, shorter side
    thumb_width: int = 1024  # wikimedia: download a rendering this wide (0: the original)
    # every kind
    near_duplicate_bits: int = 6  # dHash Hamming distance (of 64) that counts as the same image
    exclude_images: list[str] = field(default_factory=list)  # evaluation images: folders, files

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> IngestSettings:
        return settings_from_config(cls, config, "ingest", IngestError)

    def check(self) -> None:
        if self.kind not in KINDS:
            raise IngestError(f"ingest.kind is {self.kind!r}; use one of {', '.join(KINDS)}")
        needed = {"web": "urls", "folder": "root"}.get(self.kind, "api_url")
        if not getattr(self, needed):
            example = {
                "web": "ingest.urls=FILE",
                "folder": "ingest=folder ingest.root=DIR",
            }.get(self.kind, f"ingest={self.kind} ingest.api_url=URL")
            raise IngestError(
                f"ingest.{needed} is not set; run e.g. `python -m usam.ingest {example}`"
            )
        for name in (
            "workers",
            "max_bytes",
            "max_pixels",
            "images_per_shard",
            "per_class",
            "page_size",
            "max_pages",
        ):
            if getattr(self, name) < 1:
                raise IngestError(f"ingest.{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("timeout", "max_seconds"):
            if getattr(self, name) <= 0:
                raise IngestError(f"ingest.{name} must be positive (got {getattr(self, name)})")
        for name in (
            "retries",
            "backoff",
            "retry_after_cap",
            "politeness_delay",
            "search_delay",
            "min_side",
            "thumb_width",
        ):
            if getattr(self, name) < 0:
                raise IngestError(f"ingest.{name} may not be negative (got {getattr(self, name)})")
        if not 0 <= self.near_duplicate_bits < 32:
            raise IngestError(
                f"ingest.near_duplicate_bits is {self.near_duplicate_bits}; use 0 (exact copies "
                "only) to about 10 of the 64 bits"
            )
        if not self.user_agent.strip():
            raise IngestError("ingest.user_agent is empty; name the crawler and a contact URL")
        if self.kind in SEARCH_KINDS:
            bad = [q for q in self.queries if "{c}" not in q]
            if not self.queries or bad:
                raise IngestError(
                    f"ingest.queries {list(self.queries)}: give at least one template, each "
                    "with {c} where the class name goes (e.g. 'a photo of a {c}')"
                )
            if not self.licenses:
                raise IngestError("ingest.licenses is empty; e.g. [cc0, pdm, by, by-sa]")
