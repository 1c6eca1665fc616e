"""Image-search APIs that need no key and say each image's licence: Openverse and
Wikimedia Commons. Each provider turns (query, page state) into a request URL and
a JSON answer into :class:`Candidate` images plus the next page state.

Openverse (``GET /v1/images/?q=&page=&page_size=&license=``) returns ``results``
with ``url``, ``foreign_landing_url``, ``license``, ``license_version``,
``creator``, ``attribution``, ``width`` and ``height``, and ``page_count``.
Commons is asked through the MediaWiki API (``action=query&generator=search&
gsrnamespace=6&prop=imageinfo&iiprop=url|size|mime|extmetadata``, JSON format
version 2) and pages by handing back its ``continue`` object; licence and
author come from ``extmetadata`` (``LicenseShortName``, ``Artist``).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from usam.images.ingest_settings import IngestSettings

_LICENCE = re.compile(r"^(?:cc-)?(by(?:-nc)?(?:-sa|-nd)?)(?=-|$)(?:-(\d+(?:\.\d+)*))?")
_TAG = re.compile(r"<[^>]+>")


class SearchError(ValueError):
    """A search answer that is not in the provider's documented shape."""


@dataclass(frozen=True)
class Candidate:
    """One search hit: the image file and everything its licence asks to keep with it."""

    url: str  # the image file
    page: str  # the page that shows it, with its licence
    license: str  # cc0, pdm, by, by-sa, by-nc, ... or the provider's own word
    license_version: str | None
    creator: str | None
    attribution: str
    title: str | None
    width: int | None
    height: int | None
    mime: str | None = None


def normalise_licence(name: str) -> tuple[str, str | None]:
    """('by-sa', '4.0') from 'CC BY-SA 4.0' or 'cc-by-sa-4.0'; 'cc0' and 'pdm' as such."""
    text = re.sub(r"[\s_]+", "-", name.strip().lower())
    if text in ("cc0", "cc-zero", "cc0-1.0") or text.startswith("cc0"):
        return "cc0", None
    if text in ("pd", "pdm", "public-domain", "publicdomain") or text.startswith("pd-"):
        return "pdm", None
    match = _LICENCE.match(text)
    if match:
        return match.group(1), match.group(2)
    return text, None


def plain_text(value: str | None) -> str | None:
    """HTML (Commons' extmetadata) as one line of text."""
    if not value:
        return None
    text = re.sub(r"\s+", " ", html.unescape(_TAG.sub(" ", value))).strip()
    return text or None


class Openverse:
    name = "openverse"

    def __init__(self, settings: IngestSettings) -> None:
        self.api_url = settings.api_url
        self.page_size = settings.page_size
        self.licenses = settings.licenses

    def first_page(self) -> Any:
        return 1

    def request_url(self, query: str, page: int) -> str:
        params = {
            "q": query,
            "page": page,
            "page_size": self.page_size,
            "license": ",".join(self.licenses),
        }
        return f"{self.api_url}?{urlencode(params)}"

    def parse(self, payload: Any, page: int) -> tuple[list[Candidate], int | None]:
        try:
            results = payload["results"]
            page_count = int(payload.get("page_count") or 0)
            candidates = [self._candidate(r) for r in results if r.get("url")]
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SearchError(f"not an Openverse image search answer ({error!r})") from None
        return candidates, (page + 1 if page < page_count and results else None)

    def _candidate(self, result: dict[str, Any]) -> Candidate:
        licence = str(result["license"]).lower()
        version = result.get("license_version")
        creator = result.get("creator")
        title = result.get("title")
        attribution = result.get("attribution") or (
            f'"{title or "untitled"}" by {creator or "unknown author"} is licensed under '
            f"CC {licence.upper()} {version or ''}".rstrip()
        )
        return Candidate(
            url=result["url"],
            page=result.get("foreign_landing_url") or result["url"],
            license=licence,
            license_version=version,
            creator=creator,
            attribution=attribution,
            title=title,
            width=result.get("width"),
            height=result.get("height"),
        )


class Wikimedia:
    name = "wikimedia"

    def __init__(self, settings: IngestSettings) -> None:
        self.api_url = settings.api_url
        self.page_size = settings.page_size
        self.thumb_width = settings.thumb_width

    def first_page(self) -> Any:
        return {}

    def request_url(self, query: str, cont: dict[str, Any]) -> str:
        params = {
            "action": "query",
            "format": "json",
            "formatversion": 2,
            "generator": "search",
            "gsrnamespace": 6,
            "gsrsearch": f"{query} filetype:bitmap",
            "gsrlimit": self.page_size,
            "prop": "imageinfo",
            "iiprop": "url|size|mime|extmetadata",
            "iiextmetadatafilter": "LicenseShortName|License|Artist|ObjectName",
        }
        if self.thumb_width:
            params["iiurlwidth"] = self.thumb_width
        return f"{self.api_url}?{urlencode({**params, **cont})}"

    def parse(self, payload: Any, cont: dict[str, Any]) -> tuple[list[Candidate], Any]:
        if isinstance(payload, dict) and "error" in payload:  # MediaWiki errors come as HTTP 200
            error = payload["error"]
            raise SearchError(f"MediaWiki error {error.get('code')}: {error.get('info')}")
        try:
            pages = sorted(payload.get("query", {}).get("pages", []), key=lambda p: p["index"])
            candidates = [self._candidate(p) for p in pages if p.get("imageinfo")]
            following = payload.get("continue")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SearchError(f"not a MediaWiki search answer ({error!r})") from None
        return candidates, (dict(following) if following else None)

    def _candidate(self, page: dict[str, Any]) -> Candidate:
        info = page["imageinfo"][0]
        meta = {k: v.get("value") for k, v in (info.get("extmetadata") or {}).items()}
        short = plain_text(meta.get("LicenseShortName")) or plain_text(meta.get("License")) or ""
        licence, version = normalise_licence(meta.get("License") or short)
        creator = plain_text(meta.get("Artist"))
        title = plain_text(meta.get("ObjectName")) or page["title"].removeprefix("File:")
        thumb = "thumburl" in info
        return Candidate(
            url=info["thumburl"] if thumb else info["url"],
            page=info["descriptionurl"],
            license=licence,
            license_version=version,
            creator=creator,
            attribution=(
                f'"{title}" by {creator or "unknown author"}, {short or "no licence given"}, '
                f"via Wikimedia Commons ({info['descriptionurl']})"
            ),
            title=title,
            width=info.get("thumbwidth" if thumb else "width"),
            height=info.get("thumbheight" if thumb else "height"),
            mime=info.get("mime"),
        )


PROVIDERS = {"openverse": Openverse, "wikimedia": Wikimedia}
