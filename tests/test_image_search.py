"""Images from class names through Openverse and Wikimedia Commons, against a local server
that answers in each API's documented shape (127.0.0.1 for the API, 'localhost' for images)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image, ImageEnhance

import usam.commands.ingest as ingest
from usam.core.vocabulary import load_vocabulary
from usam.data.sources import ImageShardSource
from usam.formats.image_shards import ImageShardWriter, iter_images
from usam.images.image_search import ATTRIBUTION_NAME, class_queries, ingest_search
from usam.images.ingest_settings import IngestError, IngestSettings
from usam.images.perceptual_hash import HashIndex, dhash, dhash_bytes
from usam.images.search_providers import Openverse, SearchError, Wikimedia, normalise_licence
from usam.images.web_crawl import FAILED_NAME

from helpers.commands import ROOT, compose_config
from helpers.web_server import FakeClock, local_server, reply

VOCAB = load_vocabulary(["cat", "dog"])


def _smooth(seed: int, size=(96, 72)) -> Image.Image:
    base = np.random.default_rng(seed).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _near(seed: int) -> bytes:  # the same photo, smaller, brighter and re-encoded
    image = _smooth(seed).resize((80, 60), Image.Resampling.BILINEAR)
    return _jpeg(ImageEnhance.Brightness(image).enhance(1.08), quality=70)


FILES = {  # /img/<name> -> (content type, body)
    **{f"{n}.jpg": ("image/jpeg", _jpeg(_smooth(s))) for n, s in [("c1", 1), ("c2", 2)]},
    **{f"{n}.jpg": ("image/jpeg", _jpeg(_smooth(s))) for n, s in [("c6", 6), ("c7", 7)]},
    **{f"d{s}.jpg": ("image/jpeg", _jpeg(_smooth(10 + s))) for s in (1, 4, 5, 6, 8)},
    "c1-copy.jpg": ("image/jpeg", _jpeg(_smooth(1))),
    "c3-near-c2.jpg": ("image/jpeg", _near(2)),
    "d2-copy-c6.jpg": ("image/jpeg", _jpeg(_smooth(6))),
    "d3-near-c7.jpg": ("image/jpeg", _near(7)),
    "e1.jpg": ("image/jpeg", _jpeg(_smooth(20))),  # also in the evaluation set
    "small.jpg": ("image/jpeg", _jpeg(_smooth(21, size=(40, 30)))),
    "private/c5.jpg": ("image/jpeg", _jpeg(_smooth(22))),  # robots.txt disallows
    "broken.jpg": ("image/jpeg", _jpeg(_smooth(23))[:300]),
    "page.jpg": ("text/html", b"<html>a page about a cat</html>"),
    "nc.jpg": ("image/jpeg", _jpeg(_smooth(24))),  # a licence that is not reusable
    "tiny.jpg": ("image/jpeg", _jpeg(_smooth(25, size=(30, 20)))),
}


def _hit(name: str, licence: str = "by", size: tuple | None = None) -> dict:
    return {
        "id": name,
        "title": f"Title {name}",
        "url": f"/img/{name}.jpg",  # made absolute by the server
        "foreign_landing_url": f"https://photos.example/{name}",
        "creator": f"Creator {name}",
        "license": licence,
        "license_version": None if licence in ("cc0", "pdm") else "2.0",
        "attribution": f'"Title {name}" by Creator {name} is licensed under CC {licence}.',
        "width": size and size[0],
        "height": size and size[1],
        "filetype": "jpg",
    }


OPENVERSE = {  # query -> hits in rank order (served 4 to a page)
    "cat": [
        *map(_hit, ["c1", "c2", "page", "broken", "c1-copy"]),
        _hit("nc", "by-nc"),
        _hit("c3-near-c2", "by-sa"),
        _hit("e1", "pdm"),
        _hit("small"),
        _hit("tiny", size=(30, 20)),
        _hit("private/c5"),
        _hit("c6", "cc0"),
    ],
    "a photo of a cat": [_hit("c1"), _hit("c7")],
    "dog": [*map(_hit, ["d1", "d2-copy-c6", "d3-near-c7", "d4", "d5", "d6"])],
    "a photo of a dog": [_hit("d8")],
}
STORED = {"cat": {"c1", "c2", "c7", "c6"}, "dog": {"d1", "d4", "d8", "d5"}}
FAILED = {  # name -> kind (hits left out by their licence or reported size are not failures)
    "page": "content_type",
    "broken": "decode",
    "c1-copy": "duplicate",
    "c3-near-c2": "near_duplicate",
    "e1": "evaluation_image",
    "small": "too_small",
    "private/c5": "robots",
    "d2-copy-c6": "duplicate",
    "d3-near-c7": "near_duplicate",
}
NEVER_FETCHED = {"nc", "tiny", "private/c5", "d6"}


def _commons(name: str, licence: str, short: str, mime: str = "image/jpeg") -> dict:
    return {
        "pageid": sum(map(ord, name)),
        "ns": 6,
        "title": f"File:{name}.jpg",
        "imageinfo": [
            {
                "url": f"/img/{name}-original.jpg",  # not served: the rendering must be used
                "thumburl": f"/img/{name}.jpg",
                "thumbwidth": 96,
                "thumbheight": 72,
                "descriptionurl": f"https://commons.example/wiki/File:{name}.jpg",
                "width": 4000,
                "height": 3000,
                "mime": mime,
                "extmetadata": {
                    "LicenseShortName": {"value": short, "source": "commons-desc-page"},
                    "License": {"value": licence, "source": "commons-templates"},
                    "Artist": {
                        "value": f'<a href="//commons.example/User:{name}">A &amp; {name}</a>'
                    },
                },
            }
        ],
    }


COMMONS = [
    _commons("c1", "cc-by-sa-4.0", "CC BY-SA 4.0"),
    _commons("c2", "cc0", "CC0"),
    _commons("nc", "gfdl", "GFDL"),
    _commons("e1", "cc-by-4.0", "CC BY 4.0", mime="video/webm"),
    _commons("c6", "pd", "Public domain"),
    _commons("c7", "cc-by-2.0", "CC BY 2.0"),
]


class _State:
    def __init__(self) -> None:
        self.hits: Counter = Counter()  # image paths, robots.txt
        self.api: list[str] = []  # API queries, in order
        self.throttle = {"dog": 1}  # query -> how many 429s to answer first
        self.block_after: int | None = None  # image requests after this many wait for release
        self.reached = threading.Event()
        self.release = threading.Event()


STATE = _State()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        images = f"http://localhost:{self.server.server_address[1]}"
        if parts.path == "/openverse/images/":
            STATE.api.append(query["q"])
            if STATE.throttle.get(query["q"]):
                STATE.throttle[query["q"]] -= 1
                return reply(self, 429, "text/plain", b"slow down", {"Retry-After": "100"})
            hits = OPENVERSE.get(query["q"], [])
            size, page = int(query["page_size"]), int(query["page"])
            results = [
                {**h, "url": images + h["url"]} for h in hits[(page - 1) * size : page * size]
            ]
            payload = {
                "result_count": len(hits),
                "page_count": math.ceil(len(hits) / size),
                "page_size": size,
                "page": page,
                "results": results,
            }
            return reply(self, 200, "application/json", json.dumps(payload).encode())
        if parts.path == "/w/api.php":
            STATE.api.append(query["gsrsearch"])
            offset, limit = int(query.get("gsroffset", 0)), int(query["gsrlimit"])
            pages = []
            for rank, page in enumerate(COMMONS[offset : offset + limit], start=offset + 1):
                info = page["imageinfo"][0]
                info = {**info, "thumburl": images + info["thumburl"], "url": images + info["url"]}
                pages.append({**page, "index": rank, "imageinfo": [info]})
            payload = {"batchcomplete": True, "query": {"pages": pages[::-1]}}  # any order
            if offset + limit < len(COMMONS):
                payload["continue"] = {"gsroffset": offset + limit, "continue": "gsroffset||"}
            return reply(self, 200, "application/json; charset=utf-8", json.dumps(payload).encode())
        STATE.hits[parts.path] += 1
        if parts.path == "/robots.txt":
            return reply(self, 200, "text/plain", b"User-agent: *\nDisallow: /img/private/\n")
        name = parts.path.removeprefix("/img/")
        if STATE.block_after is not None and sum(STATE.hits.values()) > STATE.block_after + 1:
            STATE.reached.set()
            STATE.release.wait(60)  # bounded: the test kills the client, then releases
            return reply(self, 503, "text/plain", b"gone")
        content_type, body = FILES.get(name, ("text/plain", b""))
        reply(self, 200 if name in FILES else 404, content_type, body)


@pytest.fixture(scope="module")
def server():
    with local_server(_Handler) as url:
        yield url


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    global STATE
    STATE = _State()
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield
    STATE.release.set()


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("VOC") / "JPEGImages"
    folder.mkdir()
    _smooth(20).save(folder / "2007_000001.jpg", quality=80)  # the served e1, re-encoded
    _smooth(30).save(folder / "2007_000002.png")
    return folder


def _settings(server: str, eval_dir, **changes) -> IngestSettings:
    base = dict(
        kind="openverse",
        api_url=server + "/openverse/images/",
        per_class=4,
        page_size=4,
        min_side=48,
        exclude_images=[str(eval_dir)],
        allow_private_addresses=True,  # the test server is on loopback
        workers=4,
        timeout=5.0,
        max_seconds=120.0,
        retries=2,
        backoff=0.05,
        politeness_delay=0.0,
        search_delay=30.0,
        retry_after_cap=50.0,
        images_per_shard=3,
        contact_sheet_max=4,
    )
    settings = IngestSettings(**{**base, **changes})
    settings.check()
    return settings


def _stored(out) -> dict[str, dict]:
    """image name -> metadata, failing on any image stored twice."""
    metas = [meta for _, _, meta in iter_images(out)]
    names = [meta["url"].split("/img/")[1].removesuffix(".jpg") for meta in metas]
    assert len(names) == len(set(names)) and len({m["sha256"] for m in metas}) == len(metas)
    return dict(zip(names, metas))


def _stored_unfinished(out) -> list[dict]:
    """The metadata a stopped run left (opening the set finishes it, as a rerun would)."""
    with ImageShardWriter(out, vocabulary="custom", classes=VOCAB.classes, source="web") as w:
        return list(w.done.values())


def _failed(out) -> dict[str, str]:
    lines = (out / FAILED_NAME).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    names = [r["url"].split("/img/")[1].removesuffix(".jpg") for r in records]
    assert len(names) == len(set(names)), "a URL failed twice"
    return {n: r["kind"] for n, r in zip(names, records)}


def test_dhash_finds_near_duplicates_only():
    def distance(a: int, b: int) -> int:
        return bin(a ^ b).count("1")

    original = dhash(_smooth(2))
    assert distance(original, dhash_bytes(_jpeg(_smooth(2), quality=60))) <= 2  # re-encoded
    assert distance(original, dhash_bytes(_near(2))) <= 2  # resized, brightened, re-encoded
    assert distance(original, dhash(_smooth(2).convert("L"))) <= 2  # any mode
    assert min(distance(dhash(_smooth(a)), dhash(_smooth(b))) for a, b in [(1, 2), (6, 7)]) > 12
    index = HashIndex(bits=6)
    index.add(dhash(_smooth(2)), "two")
    assert index.match(dhash_bytes(_near(2)))[0] == "two"
    assert index.match(dhash(_smooth(1))) is None


def test_licences_are_normalised():
    assert normalise_licence("CC BY-SA 4.0") == ("by-sa", "4.0")
    assert normalise_licence("cc-by-nc-sa-3.0-de") == ("by-nc-sa", "3.0")
    assert normalise_licence("cc0") == ("cc0", None)
    assert normalise_licence("Public domain") == ("pdm", None)
    assert normalise_licence("GFDL") == ("gfdl", None)
    assert normalise_licence("byline") == ("byline", None)


def test_openverse_end_to_end(tmp_path, server, eval_dir, caplog):
    out = tmp_path / "voc_web"
    clock = FakeClock()
    settings = _settings(server, eval_dir)
    with caplog.at_level(logging.INFO, logger="usam.images.image_search"):
        manifest = ingest_search(VOCAB, out, settings, progress=False, clock=clock)
    assert "{'licence by-nc': 1, 'under min_side': 1}" in caplog.text

    assert manifest.source == "web" and manifest.per_class == {"cat": 4, "dog": 4}
    stored = _stored(out)
    assert {c: {n for n, m in stored.items() if m["class_name"] == c} for c in STORED} == STORED
    assert _failed(out) == FAILED
    for name in NEVER_FETCHED:
        assert STATE.hits[f"/img/{name}.jpg"] == 0, f"{name} was downloaded"
    assert STATE.hits["/robots.txt"] == 1

    meta = stored["c6"]
    assert meta["provider"] == "openverse" and meta["query"] == "cat"
    assert meta["source_page"] == "https://photos.example/c6"
    assert (meta["creator"], meta["license"], meta["license_version"]) == (
        "Creator c6",
        "cc0",
        None,
    )
    assert meta["attribution"] == OPENVERSE["cat"][-1]["attribution"]
    assert stored["c7"]["query"] == "a photo of a cat" and stored["d1"]["member"] is None

    with (out / ATTRIBUTION_NAME).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["url"].split("/img/")[1] for r in rows) == sorted(f"{n}.jpg" for n in stored)
    assert {r["key"] for r in rows} == {k for k, _, _ in iter_images(out)}
    assert all(r["attribution"] and r["license"] and r["source_page"] for r in rows)
    assert len(list((out / "contact_sheets").glob("*.png"))) == 2
    source = ImageShardSource(out)  # what extraction reads: the usual web image set
    samples = [source.load(i) for i in range(len(source.keys))]
    assert sorted(tuple(s.labels) for s in samples) == [(0, 1)] * 4 + [(1, 0)] * 4

    # politeness, on the injected clock: 30 s between API requests, the 429's Retry-After
    # of 100 s waited up to its 50 s cap, and the throttled query asked again
    assert STATE.api.count("dog") == 3  # page 1 refused once, then pages 1 and 2
    assert 50.0 in clock.sleeps
    assert clock.now() >= 30.0 * (len(STATE.api) - 1)

    api_before, hits_before = len(STATE.api), sum(STATE.hits.values())
    again = ingest_search(VOCAB, out, settings, progress=False, clock=clock)
    assert again.num_images == 8 and len(STATE.api) == api_before  # complete: nothing to do
    assert sum(STATE.hits.values()) == hits_before


def test_wikimedia_commons(tmp_path, server, eval_dir):
    out = tmp_path / "cat_web"
    settings = _settings(
        server,
        eval_dir,
        kind="wikimedia",
        api_url=server + "/w/api.php",
        per_class=3,
        page_size=2,
        queries=["{c}"],
    )
    clock = FakeClock()
    manifest = ingest_search(load_vocabulary(["cat"]), out, settings, progress=False, clock=clock)
    assert clock.sleeps == [30.0, 30.0]  # search_delay between the three API requests
    stored = _stored(out)
    assert set(stored) == {"c1", "c2", "c6"} and manifest.num_images == 3
    assert _failed(out) == {}  # the GFDL file and the video were left out by their metadata
    assert STATE.api == ["cat filetype:bitmap"] * 3  # paged by the continue object
    c1 = stored["c1"]
    assert (c1["license"], c1["license_version"], c1["creator"]) == ("by-sa", "4.0", "A & c1")
    assert c1["source_page"] == "https://commons.example/wiki/File:c1.jpg"
    assert c1["attribution"] == (
        '"c1.jpg" by A & c1, CC BY-SA 4.0, via Wikimedia Commons '
        "(https://commons.example/wiki/File:c1.jpg)"
    )
    assert stored["c6"]["license"] == "pdm" and stored["c2"]["license"] == "cc0"
    assert not any("original" in path for path in STATE.hits)  # the 1024-wide rendering


def test_killed_run_resumes_with_every_image_once(tmp_path, server, eval_dir):
    overrides = [
        f"paths.root_dir={tmp_path}",
        "data.classes=[cat,dog]",
        "ingest=openverse",
        f"ingest.api_url={server}/openverse/images/",
        "ingest.per_class=4",
        "ingest.page_size=4",
        "ingest.min_side=48",
        f"ingest.exclude_images=[{eval_dir}]",
        "ingest.allow_private_addresses=true",
        "ingest.workers=4",
        "ingest.search_delay=0",
        "ingest.politeness_delay=0",
        "ingest.retry_after_cap=0.1",
        "ingest.backoff=0.05",
        "ingest.images_per_shard=3",
    ]
    STATE.block_after = 6  # the seventh image download hangs until the child is killed
    log = tmp_path / "child.log"
    with log.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "usam.ingest", *overrides],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        reached = STATE.reached.wait(120)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert reached, log.read_text()[-3000:]
    out = (
        tmp_path
        / "data"
        / "images"
        / next(p.name for p in (tmp_path / "data" / "images").iterdir())
    )
    assert not (out / "manifest.json").exists()  # killed before the end
    first = {meta["url"] for meta in _stored_unfinished(out)}  # what the killed run kept
    assert 0 < len(first) < 8

    STATE.block_after = None
    STATE.release.set()
    STATE.hits.clear()
    resumed = ingest.run(compose_config("ingest", overrides))
    assert resumed == out
    stored = _stored(out)
    assert {c: {n for n, m in stored.items() if m["class_name"] == c} for c in STORED} == STORED
    assert _failed(out) == FAILED
    for url in first:
        assert STATE.hits[urlsplit(url).path] == 0, f"{url} was fetched again"
    rows = list(csv.DictReader((out / ATTRIBUTION_NAME).open(newline="")))
    assert len(rows) == len({r["key"] for r in rows}) == 8


def test_queries_cover_every_template_and_superclass_member():
    vocab = load_vocabulary("voc_superclasses")
    index = next(i for i, name in enumerate(vocab.classes) if "cat" in vocab.members[name])
    queries = class_queries(vocab, index, ["{c}", "a photo of a {c}"], 1)
    members = vocab.members[vocab.classes[index]]
    assert [q.text for q in queries] == [*members, *(f"a photo of a {m}" for m in members)]
    assert [q.member for q in queries] == [*members, *members]
    (plain,) = class_queries(VOCAB, 1, ["{c}"], 1)
    assert (plain.text, plain.member, plain.state) == ("dog", None, 1)


def test_a_refusing_api_stops_the_run_and_the_rerun_goes_on(tmp_path, server, eval_dir):
    out = tmp_path / "voc_web"
    clock = FakeClock()
    templates = ["{c}", "a photo of a {c}", "{c} photo"]  # the last finds nothing
    settings = _settings(server, eval_dir, retries=1, queries=templates)
    STATE.throttle = {"dog": 99, "a photo of a dog": 99, "dog photo": 99}  # cat goes through
    with pytest.raises(IngestError, match="3 searches in a row failed.*HTTP 429.*Run the same"):
        ingest_search(VOCAB, out, settings, progress=False, clock=clock)
    assert not (out / "manifest.json").exists()  # unfinished: the rerun resumes it
    assert clock.sleeps.count(50.0) == 3  # each refused search waited out one Retry-After
    assert {m["class_name"] for m in _stored_unfinished(out)} == {"cat"}
    STATE.throttle = {}
    searched = len(STATE.api)
    manifest = ingest_search(VOCAB, out, settings, progress=False, clock=clock)
    assert manifest.per_class == {"cat": 4, "dog": 4}
    assert set(_stored(out)) == STORED["cat"] | STORED["dog"]
    assert all("cat" not in query for query in STATE.api[searched:])  # cat was complete


def test_search_settings_are_checked(tmp_path, server, eval_dir):
    for kind, host in [("openverse", "api.openverse.org"), ("wikimedia", "commons.wikimedia.org")]:
        config = compose_config("ingest", [f"ingest={kind}"]).ingest
        settings = IngestSettings.from_config(OmegaConf.to_container(config, resolve=True))
        assert settings.kind == kind and urlsplit(settings.api_url).hostname == host
        assert settings.name == "web" and not settings.allow_private_addresses
    with pytest.raises(IngestError, match="ingest.api_url is not set"):
        IngestSettings(kind="openverse").check()
    with pytest.raises(IngestError, match=r"ingest.queries.*\{c\}"):
        IngestSettings(kind="wikimedia", api_url="https://x", queries=["a photo"]).check()
    missing = _settings(server, tmp_path / "missing")
    with pytest.raises(IngestError, match="missing.*exclude_images.*does not exist"):
        ingest_search(VOCAB, tmp_path / "a", missing, progress=False)
    wrong = _settings(server, eval_dir, api_url=server + "/nothing/here/")
    with pytest.raises(IngestError, match="404.*check ingest.api_url"):
        ingest_search(VOCAB, tmp_path / "b", wrong, progress=False)
    commons = Wikimedia(_settings(server, eval_dir, kind="wikimedia"))
    with pytest.raises(SearchError, match="badvalue: Unrecognized value"):
        commons.parse({"error": {"code": "badvalue", "info": "Unrecognized value"}}, {})
    with pytest.raises(SearchError, match="not an Openverse"):
        Openverse(_settings(server, eval_dir)).parse({"detail": "throttled"}, 1)
    inward = _settings(server, eval_dir, allow_private_addresses=False)
    with pytest.raises(IngestError, match="allow_private_addresses"):
        ingest_search(VOCAB, tmp_path / "c", inward, progress=False)
