"""Web and folder ingestion, against a local HTTP(S) server on loopback only (127.0.0.1)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from PIL import Image, ImageEnhance

import usam.commands.ingest as ingest
from usam.core.vocabulary import load_vocabulary
from usam.formats.image_shards import ImageShardWriter, iter_images, read_image_manifest
from usam.images.fetching import Fetcher, FetchError, HostGate, is_public, resolve_addresses
from usam.images.ingest_inputs import read_url_list, scan_folder
from usam.images.ingest_settings import IngestError, IngestSettings
from usam.images.web_crawl import FAILED_NAME, ingest_folder, ingest_urls

from helpers.commands import compose_config, wait_for
from helpers.web_server import TLS_CERT, FakeClock, drip, local_server, reply
from helpers.web_server import encoded as _encoded

VOCAB = load_vocabulary(["cat", "dog", "car"])

GOOD = _encoded(1)
ROUTES = {  # path -> (status, content type, body, extra headers)
    "/good1.jpg": (200, "image/jpeg", GOOD, {}),
    "/dup.jpg": (200, "image/jpeg", GOOD, {}),
    "/rgba.png": (200, "image/png", _encoded(2, "PNG", "RGBA"), {}),
    "/gray.jpg": (200, "image/jpeg", _encoded(3, mode="L"), {}),
    "/octet": (200, "application/octet-stream", _encoded(4), {}),
    "/good5.jpg": (200, "image/jpeg", _encoded(5), {}),
    "/a%20cat%C3%A9.jpg": (200, "image/jpeg", _encoded(11), {}),  # "/a caté.jpg" as sent
    "/missing.jpg": (404, "text/html", b"not here", {}),
    "/page.html": (200, "text/html", b"<html>no image</html>", {}),
    "/truncated.jpg": (200, "image/jpeg", _encoded(6, size=(200, 200))[:1500], {}),
    "/big.jpg": (200, "image/jpeg", _encoded(7, size=(200, 200)), {}),
    "/redirect-good": (302, "text/plain", b"", {"Location": "/good5.jpg"}),
    "/redirect-file": (302, "text/plain", b"", {"Location": "file:///etc/hostname"}),
    "/private/cat.jpg": (200, "image/jpeg", _encoded(9), {}),
    "/robots.txt": (200, "text/plain", b"User-agent: *\nDisallow: /private/\n", {}),
}
MAX_BYTES = 8000
assert len(ROUTES["/big.jpg"][2]) > MAX_BYTES > len(_encoded(4))
# A server that never answers, or drips, for far longer than any test waits: the client's
# timeout or deadline is what ends the request, however loaded the machine is.
HANG_S = 300.0  # /hang.jpg answers after this, or when the test server closes
DRIP_S, DRIP_INTERVAL_S = 300.0, 0.1
DRIP_BYTES = int(DRIP_S / DRIP_INTERVAL_S)
assert DRIP_BYTES < MAX_BYTES  # a drip is cut by the deadline, not by the size cap
DRIPS = {  # path -> raw bytes, the part after the status line (or headers) one byte at a time
    "/drip-body.jpg": b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n"
    + b"Content-Length: %d\r\n\r\n" % DRIP_BYTES
    + b"x" * DRIP_BYTES,
    "/drip-headers.jpg": b"HTTP/1.0 200 OK\r\nX-Padding: " + b"x" * DRIP_BYTES,
}
FAIL_ONCE = {  # path -> (first status, its headers, image seed after)
    "/flaky.jpg": (503, {}, 8),
    "/busy.jpg": (429, {"Retry-After": "3600"}, 10),
}


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()
    drips: dict[str, dict] = {}
    release = threading.Event()  # set when the server closes: /hang.jpg answers at once

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.hits[self.path] += 1
        if self.path in DRIPS:
            data = DRIPS[self.path]
            start = data.index(b"\r\n\r\n") + 4 if b"\r\n\r\n" in data else 17
            self.wfile.write(data[:start])  # the status line (and headers) at once
            drip(self, data[start:], DRIP_INTERVAL_S, self.drips.setdefault(self.path, {}))
            return
        if self.path == "/hang.jpg":
            self.release.wait(HANG_S)
            status, content_type, body, headers = ROUTES["/good1.jpg"]
        elif self.path in FAIL_ONCE:  # fails once, then works: a retry must get it
            failure, headers, seed = FAIL_ONCE[self.path]
            if self.hits[self.path] == 1:
                status, content_type, body = failure, "text/plain", b"try again"
            else:
                status, content_type, body, headers = 200, "image/jpeg", _encoded(seed), {}
        elif self.path == "/chunked-big.jpg":  # no Content-Length: the cap applies while reading
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(ROUTES["/big.jpg"][2])
            self.close_connection = True
            return
        elif self.path == "/redirect-inward":
            port = self.server.server_address[1]
            status, content_type, body = 302, "text/plain", b""
            headers = {"Location": f"http://127.0.0.1:{port}/good1.jpg"}
        else:
            status, content_type, body, headers = ROUTES.get(
                self.path, (404, "text/plain", b"unknown", {})
            )
        reply(self, status, content_type, body, headers)


@pytest.fixture(scope="module")
def server():
    _Handler.release = threading.Event()
    with local_server(_Handler) as url:
        yield url
    _Handler.release.set()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def _settings(**changes) -> IngestSettings:
    """Timeouts far above what a loaded machine needs on loopback: the tests of timeouts
    set small ones against a server that does not answer."""
    base = dict(
        workers=4,
        timeout=30.0,
        max_seconds=120.0,
        retries=1,
        backoff=0.05,
        max_bytes=MAX_BYTES,
        politeness_delay=0.0,
        images_per_shard=3,
        contact_sheet_max=4,
        allow_private_addresses=True,  # the test server is on 127.0.0.1
    )
    return IngestSettings(**{**base, **changes})


EXPECTED_STORED = {  # path -> class
    "/good1.jpg": "cat",
    "/rgba.png": "cat",
    "/gray.jpg": "dog",
    "/octet": "dog",
    "/redirect-good": "car",
    "/flaky.jpg": "car",
}
EXPECTED_FAILED = {  # url -> kind
    "/dup.jpg": "duplicate",
    "/missing.jpg": "http",
    "/page.html": "content_type",
    "/truncated.jpg": "decode",
    "/big.jpg": "too_large",
    "/chunked-big.jpg": "too_large",
    "/redirect-file": "scheme",
    "/private/cat.jpg": "robots",
}


def _write_list(path, server) -> list[str]:
    urls = [server + p for p in [*EXPECTED_STORED, *EXPECTED_FAILED]]
    classes = [*EXPECTED_STORED.values(), *(["dog"] * len(EXPECTED_FAILED))]
    urls += ["file:///etc/hostname", "ftp://127.0.0.1/x.jpg"]
    classes += ["cat", "cat"]
    lines = ["url,class", *(f"{u},{c}" for u, c in zip(urls, classes, strict=True))]
    lines.append(f"{server}/good1.jpg, Cat ")  # the same URL again: kept once
    path.write_text("\n".join(lines) + "\n")
    return urls


def _failed(out) -> dict[str, dict]:
    return {r["url"]: r for r in map(json.loads, (out / FAILED_NAME).read_text().splitlines())}


def test_url_list_end_to_end(tmp_path, server):
    _Handler.hits.clear()
    url_list = tmp_path / "urls.csv"
    urls = _write_list(url_list, server)
    out = tmp_path / "web"
    manifest = ingest_urls(url_list, VOCAB, out, _settings(), progress=False)

    samples = {meta["url"]: (image, meta) for _, image, meta in iter_images(out)}
    assert {u.removeprefix(server): m["class_name"] for u, (_, m) in samples.items()} == (
        EXPECTED_STORED
    )
    assert manifest.per_class == {"cat": 2, "dog": 2, "car": 2}
    failed = _failed(out)
    assert {u.removeprefix(server): r["kind"] for u, r in failed.items() if server in u} == (
        EXPECTED_FAILED
    )
    assert failed["file:///etc/hostname"]["kind"] == "scheme"
    assert failed["ftp://127.0.0.1/x.jpg"]["kind"] == "scheme"
    assert set(samples) | set(failed) == set(urls)  # every URL accounted for
    assert all(r["reason"] for r in failed.values())
    assert "good1.jpg" in failed[server + "/dup.jpg"]["reason"]

    rgba, meta = samples[server + "/rgba.png"]
    assert rgba.mode == "RGB" and meta["source"] == "web" and meta["line"] == 3
    redirected = samples[server + "/redirect-good"][1]
    assert redirected["final_url"] == server + "/good5.jpg"
    assert samples[server + "/flaky.jpg"][1]["attempts"] == 2
    assert _Handler.hits["/missing.jpg"] == 1  # a 404 is not retried
    assert _Handler.hits["/private/cat.jpg"] == 0  # robots.txt keeps it out
    assert _Handler.hits["/robots.txt"] == 1  # read once per host
    assert len(list((out / "contact_sheets").glob("*.png"))) == 3


def test_interrupted_download_resumes_without_refetching(tmp_path, server, monkeypatch):
    _Handler.hits.clear()
    url_list = tmp_path / "urls.jsonl"
    urls = _write_list(tmp_path / "urls.csv", server)
    url_list.write_text("".join(json.dumps({"url": u, "class": "cat"}) + "\n" for u in urls))
    out = tmp_path / "web"
    real_write = ImageShardWriter.write
    written = []

    def crash_after_two(self, key, jpeg, meta):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(meta["url"])
        return real_write(self, key, jpeg, meta)

    monkeypatch.setattr(ImageShardWriter, "write", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        ingest_urls(url_list, VOCAB, out, _settings(), progress=False)
    monkeypatch.setattr(ImageShardWriter, "write", real_write)
    failed_before = set(_failed(out))
    hits_before = Counter(_Handler.hits)

    ingest_urls(url_list, VOCAB, out, _settings(), progress=False)
    stored = [meta["url"] for _, _, meta in iter_images(out)]
    assert len(stored) == len(set(stored)) == len(EXPECTED_STORED)
    assert set(stored) | set(_failed(out)) == set(urls)
    for url in [*written, *failed_before]:
        path = url.removeprefix(server)
        assert _Handler.hits[path] == hits_before[path], f"{url} was fetched again"
    lines = (out / FAILED_NAME).read_text().splitlines()
    assert len(lines) == len({json.loads(line)["url"] for line in lines})  # no URL twice


def test_failed_log_cut_by_a_crash_is_repaired(tmp_path, server):
    url_list = tmp_path / "urls.csv"
    url_list.write_text(f"url,class\n{server}/missing.jpg,cat\n{server}/good1.jpg,cat\n")
    out = tmp_path / "web"
    out.mkdir()
    (out / FAILED_NAME).write_text('{"url": "' + server + "/missing.jpg")  # cut mid-line
    ingest_urls(url_list, VOCAB, out, _settings(), progress=False)
    assert set(_failed(out)) == {server + "/missing.jpg"}
    assert read_image_manifest(out).num_images == 1


def test_url_lists_are_checked(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("url,class\nhttp://127.0.0.1/a.jpg,cat\nhttp://127.0.0.1/b.jpg,zebra\n")
    with pytest.raises(IngestError, match=r"'zebra' \(line 3\).*not a class of vocabulary"):
        read_url_list(bad, VOCAB)
    columns = tmp_path / "columns.csv"
    columns.write_text("link,label\nhttp://127.0.0.1/a.jpg,cat\n")
    with pytest.raises(IngestError, match="'url' and 'class' columns"):
        read_url_list(columns, VOCAB)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"url": "http://127.0.0.1/a.jpg", "class": "cat"}\n{oops\n')
    with pytest.raises(IngestError, match="broken.jsonl line 2 is not JSON"):
        read_url_list(broken, VOCAB)
    (tmp_path / "x.txt").write_text("url,class\n")
    with pytest.raises(IngestError, match="must be .csv"):
        read_url_list(tmp_path / "x.txt", VOCAB)
    members = tmp_path / "members.jsonl"
    members.write_text('{"url": "http://127.0.0.1/a.jpg", "class": "Cat"}\n')
    (entry,) = read_url_list(members, load_vocabulary("voc_superclasses"))
    assert (entry.class_name, entry.member, entry.line) == ("animals", "cat", 1)


def test_host_gate_spaces_requests_to_one_host():
    clock = FakeClock()
    gate = HostGate(0.15, clock, delays={"api.example": 2.0})
    for _ in range(3):
        gate.wait("a.example")
    gate.wait("b.example")
    assert clock.sleeps == pytest.approx([0.15, 0.15])
    for _ in range(3):
        gate.wait("api.example")  # its own, longer delay
    assert clock.sleeps[2:] == pytest.approx([2.0, 2.0])
    gate.hold("b.example", 5.0)  # a Retry-After
    gate.wait("b.example")
    assert clock.sleeps[-1] == pytest.approx(5.0)


def test_retry_after_is_honoured_up_to_its_cap(server):
    clock = FakeClock()
    settings = _settings(retry_after_cap=4.0)  # the URL's deadline leaves time for the wait
    fetcher = Fetcher(settings, HostGate(0.0, clock))
    body, _, attempts = fetcher.fetch(server + "/busy.jpg")
    assert attempts == 2 and body == _encoded(10)
    assert clock.sleeps == [4.0]  # asked for 3600 s, waited the cap, then the host was free
    # a deadline the capped wait would pass, yet far above the first answer's time
    short = Fetcher(_settings(retry_after_cap=60.0, max_seconds=30.0), HostGate(0.0, clock))
    _Handler.hits["/busy.jpg"] = 0
    with pytest.raises(FetchError, match=r"HTTP 429.*no time left for a retry"):
        short.fetch(server + "/busy.jpg")  # the wait would pass the URL's deadline


def test_a_url_with_spaces_is_sent_quoted_and_a_bad_host_is_refused_at_once(server):
    fetcher = Fetcher(_settings(retries=2), HostGate(0.0, FakeClock()))
    body, _, attempts = fetcher.fetch(server + "/a caté.jpg")  # as search results give it
    assert body == _encoded(11) and attempts == 1
    with pytest.raises(FetchError) as refused:
        fetcher.fetch("http://exa mple.org/cat.jpg")
    assert refused.value.kind == "invalid_url" and "attempts" not in str(refused.value)


def test_a_url_that_never_answers_times_out_and_is_retried_once(tmp_path, server):
    _Handler.hits["/hang.jpg"] = 0
    url_list = tmp_path / "urls.csv"
    url_list.write_text(f"url,class\n{server}/hang.jpg,cat\n")
    out = tmp_path / "web"
    settings = _settings(timeout=0.4, respect_robots=False)  # robots.txt: not under test
    started = time.monotonic()
    manifest = ingest_urls(url_list, VOCAB, out, settings, progress=False)
    assert time.monotonic() - started < HANG_S / 2, "the server's answer ended it, not the timeout"
    assert manifest.num_images == 0
    record = _failed(out)[server + "/hang.jpg"]
    assert record["kind"] == "timeout" and record["reason"].endswith("(after 2 attempts)")
    wait_for(lambda: _Handler.hits["/hang.jpg"] == 2, "the retry at the server", seconds=60)


def test_slow_drip_fails_within_its_deadline(tmp_path, server):
    for path in DRIPS:
        _Handler.hits[path] = 0
        _Handler.drips[path] = {"event": threading.Event()}
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,class\n" + "".join(f"{server}{p},cat\n" for p in DRIPS))
    out = tmp_path / "web"
    # every read is in time, and robots.txt (not under test) is not read
    settings = _settings(max_seconds=0.6, retries=3, respect_robots=False)
    started = time.monotonic()
    manifest = ingest_urls(url_list, VOCAB, out, settings, progress=False)
    assert time.monotonic() - started < DRIP_S / 2, "the drip ended, not the deadline"
    assert manifest.num_images == 0
    failed = _failed(out)
    for path in DRIPS:
        record = failed[server + path]
        assert record["kind"] == "timeout" and "deadline of 0.6s" in record["reason"]
        assert "attempts" not in record["reason"]  # slow beyond the cap: not retried
        assert _Handler.drips[path]["event"].wait(60)  # the server saw the client leave
        assert _Handler.hits[path] == 1
        assert not _Handler.drips[path]["finished"], f"{path} was read to the end"


def test_https_is_bounded_by_the_same_deadline(monkeypatch):
    """A slow encrypted body and a TLS handshake that never finishes are both cut."""
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS_CERT))
    _Handler.drips["/drip-body.jpg"] = {"event": threading.Event()}
    fetcher = Fetcher(_settings(max_seconds=0.6, retries=2))
    with local_server(_Handler, tls=True) as url, socket.create_server(("127.0.0.1", 0)) as mute:
        assert Fetcher(_settings()).fetch(url + "/good1.jpg")[0] == GOOD
        for target in (url + "/drip-body.jpg", f"https://localhost:{mute.getsockname()[1]}/x"):
            started = time.monotonic()
            with pytest.raises(FetchError, match="deadline of 0.6s"):
                fetcher.fetch(target)
            assert time.monotonic() - started < DRIP_S / 2, f"{target} ended by itself"
        assert _Handler.drips["/drip-body.jpg"]["event"].wait(60)
    assert not _Handler.drips["/drip-body.jpg"]["finished"]


def test_private_addresses_are_refused_by_default(tmp_path, server):
    assert not any(
        map(is_public, ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1"])
    )
    assert not any(map(is_public, ["100.64.0.1", "::ffff:127.0.0.1", "fd00::1", "224.0.0.1"]))
    assert all(map(is_public, ["93.184.216.34", "2606:4700::1111"]))
    url_list = tmp_path / "urls.csv"
    url_list.write_text(f"url,class\n{server}/good1.jpg,cat\n")
    out = tmp_path / "web"
    _Handler.hits["/good1.jpg"] = 0
    ingest_urls(url_list, VOCAB, out, _settings(allow_private_addresses=False), progress=False)
    record = _failed(out)[server + "/good1.jpg"]
    assert record["kind"] == "address" and "allow_private_addresses" in record["reason"]
    assert _Handler.hits["/good1.jpg"] == 0


def test_redirect_into_loopback_is_refused(server):
    """'localhost' stands in for a public host; the redirect target gets the real check."""

    def resolve(host: str) -> list[str]:
        return ["93.184.216.34"] if host == "localhost" else resolve_addresses(host)

    fetcher = Fetcher(_settings(allow_private_addresses=False), resolve=resolve)
    public = server.replace("127.0.0.1", "localhost")
    assert fetcher.fetch(public + "/good5.jpg")[0] == ROUTES["/good5.jpg"][2]
    _Handler.hits["/good1.jpg"] = 0
    with pytest.raises(FetchError, match="127.0.0.1.*not a public address") as error:
        fetcher.fetch(public + "/redirect-inward")
    assert error.value.kind == "address"
    assert _Handler.hits["/good1.jpg"] == 0


def _tree(root) -> None:
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "Dining_Table").mkdir()
    (root / "cat" / "a.jpg").write_bytes(_encoded(11))
    (root / "cat" / "sub" / "b.png").write_bytes(_encoded(12, "PNG", "LA"))
    (root / "cat" / "copy.jpg").write_bytes(_encoded(11))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.jpg").write_bytes(_encoded(13))
    (root / "Dining_Table" / "broken.jpg").write_bytes(_encoded(14, size=(200, 200))[:1200])
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    Image.open(io.BytesIO(_encoded(15))).save(rotated, format="JPEG", exif=exif.tobytes())
    (root / "Dining_Table" / "rotated.jpg").write_bytes(rotated.getvalue())


def test_folder_tree_end_to_end_and_resume(tmp_path):
    vocab = load_vocabulary(["cat", "dining table"])
    root = tmp_path / "photos"
    _tree(root)
    out = tmp_path / "folder"
    manifest = ingest_folder(root, vocab, out, _settings(), progress=False)
    samples = {meta["path"]: (image, meta) for _, image, meta in iter_images(out)}
    assert set(samples) == {"cat/a.jpg", "cat/sub/b.png", "Dining_Table/rotated.jpg"}
    assert samples["Dining_Table/rotated.jpg"][0].size == (30, 40)  # EXIF rotation applied
    assert samples["Dining_Table/rotated.jpg"][1]["class_name"] == "dining table"
    assert manifest.source == "web" and manifest.per_class == {"cat": 2, "dining table": 1}
    assert {meta["source"] for _, meta in samples.values()} == {"folder"}
    failed = {r["path"]: r["kind"] for r in map(json.loads, (out / FAILED_NAME).open())}
    assert failed == {"cat/copy.jpg": "duplicate", "Dining_Table/broken.jpg": "decode"}

    (root / "cat" / "c.jpg").write_bytes(_encoded(16))
    again = ingest_folder(root, vocab, out, _settings(), progress=False)
    keys = [key for key, _, _ in iter_images(out)]
    assert again.num_images == 4 and len(set(keys)) == 4
    assert len((out / FAILED_NAME).read_text().splitlines()) == 2


def test_unknown_class_folder_fails_clearly(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "zebra").mkdir()
    with pytest.raises(IngestError, match=r"'zebra' not a class of vocabulary 'custom'"):
        scan_folder(tmp_path, VOCAB)
    with pytest.raises(IngestError, match="does not exist"):
        scan_folder(tmp_path / "nowhere", VOCAB)


def test_ingest_config_composes_and_runs(tmp_path):
    root = tmp_path / "photos"
    _tree(root)
    cfg = compose_config(
        "ingest",
        [
            "ingest=folder",
            f"ingest.root={root}",
            f"paths.root_dir={tmp_path}",
            "data.classes=voc20",
        ],
    )
    out = ingest.run(cfg)  # the photo set data.source=web and experiment=voc_wc read
    assert out == tmp_path / "data" / "images" / "voc20_web"
    assert read_image_manifest(out).num_images == 3
    cfg = compose_config("ingest", [f"paths.root_dir={tmp_path}"])
    with pytest.raises(IngestError, match="ingest.urls is not set"):
        ingest.run(cfg)


def _smooth(seed: int, size=(96, 72)) -> Image.Image:
    """A photo-like image: smooth, so that its dHash survives scaling and re-encoding."""
    base = np.random.default_rng(seed).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def test_folder_ingest_refuses_near_copies_of_excluded_images(tmp_path):
    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    _smooth(20).save(root / "cat" / "test_photo.jpg", quality=95)
    _smooth(21).save(root / "cat" / "other.jpg", quality=95)
    evaluation = tmp_path / "VOC2012" / "JPEGImages"
    evaluation.mkdir(parents=True)
    near_copy = _smooth(20).resize((80, 60), Image.Resampling.BILINEAR)
    ImageEnhance.Brightness(near_copy).enhance(1.08).save(
        evaluation / "2011_000003.jpg", quality=70
    )
    cfg = compose_config(
        "ingest",
        [
            "ingest=folder",
            f"ingest.root={root}",
            f"ingest.exclude_images=[{evaluation}]",
            f"paths.root_dir={tmp_path}",
            "data.classes=[cat, dog]",
        ],
    )
    out = ingest.run(cfg)
    assert [meta["path"] for _, _, meta in iter_images(out)] == ["cat/other.jpg"]
    failed = {r["path"]: r for r in map(json.loads, (out / FAILED_NAME).open())}
    assert failed["cat/test_photo.jpg"]["kind"] == "evaluation_image"
    assert "2011_000003.jpg" in failed["cat/test_photo.jpg"]["reason"]


def test_urls_and_a_folder_fill_one_set_of_photos(tmp_path, server):
    root = tmp_path / "photos"
    _tree(root)
    vocab = load_vocabulary(["cat", "dining table"])
    out = tmp_path / "images" / "web"
    ingest_folder(root, vocab, out, _settings(), progress=False)
    url_list = tmp_path / "urls.csv"
    pages = ["/good5.jpg", "/missing.jpg", "/a%20cat%C3%A9.jpg"]  # the last repeats cat/copy.jpg
    url_list.write_text("url,class\n" + "".join(f"{server}{p},cat\n" for p in pages))
    manifest = ingest_urls(url_list, vocab, out, _settings(), progress=False)
    origins = sorted(meta.get("url", meta.get("path")) for _, _, meta in iter_images(out))
    assert manifest.source == "web" and origins == [
        "Dining_Table/rotated.jpg",
        "cat/a.jpg",
        "cat/sub/b.png",
        server + "/good5.jpg",
    ]
    failed = [json.loads(line) for line in (out / FAILED_NAME).read_text().splitlines()]
    assert {r.get("url", r.get("path")): r["kind"] for r in failed} == {
        "cat/copy.jpg": "duplicate",
        "Dining_Table/broken.jpg": "decode",
        server + "/missing.jpg": "http",
        server + "/a%20cat%C3%A9.jpg": "duplicate",
    }
    again = ingest_folder(root, vocab, out, _settings(), progress=False)  # resumes across kinds
    assert again.num_images == 4 and len((out / FAILED_NAME).read_text().splitlines()) == 4


def test_settings_are_checked():
    with pytest.raises(IngestError, match="threads"):
        IngestSettings.from_config({"kind": "web", "urls": "x.csv", "threads": 3})
    with pytest.raises(IngestError, match="ingest.timeout must be positive"):
        IngestSettings.from_config({"kind": "web", "urls": "x.csv", "timeout": 0})
