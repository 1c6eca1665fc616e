"""Web and folder ingestion, against a local HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import usam.ingest as ingest
from usam.core.vocabulary import load_vocabulary
from usam.formats.image_shards import ImageShardWriter, iter_images, read_image_manifest
from usam.images.web_crawl import (
    FAILED_NAME,
    HostGate,
    IngestError,
    IngestSettings,
    ingest_folder,
    ingest_urls,
    read_url_list,
    scan_folder,
)

from helpers.commands import compose_config

VOCAB = load_vocabulary(["cat", "dog", "car"])


def _encoded(seed: int, fmt: str = "JPEG", mode: str = "RGB", size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


GOOD = _encoded(1)
ROUTES = {  # path -> (status, content type, body, extra headers)
    "/good1.jpg": (200, "image/jpeg", GOOD, {}),
    "/dup.jpg": (200, "image/jpeg", GOOD, {}),
    "/rgba.png": (200, "image/png", _encoded(2, "PNG", "RGBA"), {}),
    "/gray.jpg": (200, "image/jpeg", _encoded(3, mode="L"), {}),
    "/octet": (200, "application/octet-stream", _encoded(4), {}),
    "/good5.jpg": (200, "image/jpeg", _encoded(5), {}),
    "/missing.jpg": (404, "text/html", b"not here", {}),
    "/page.html": (200, "text/html", b"<html>no image</html>", {}),
    "/truncated.jpg": (200, "image/jpeg", _encoded(6, size=(200, 200))[:1500], {}),
    "/big.jpg": (200, "image/jpeg", _encoded(7, size=(200, 200)), {}),
    "/redirect-good": (302, "text/plain", b"", {"Location": "/good5.jpg"}),
    "/redirect-file": (302, "text/plain", b"", {"Location": "file:///etc/hostname"}),
}
MAX_BYTES = 8000
assert len(ROUTES["/big.jpg"][2]) > MAX_BYTES > len(_encoded(4))


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.hits[self.path] += 1
        if self.path == "/slow.jpg":
            time.sleep(1.0)
            status, content_type, body, headers = ROUTES["/good1.jpg"]
        elif self.path == "/flaky.jpg":  # fails once, then works: a retry must get it
            first = self.hits[self.path] == 1
            status, content_type, body = (503, "text/plain", b"busy") if first else (200, "", b"")
            body = body or _encoded(8)
            content_type = content_type or "image/jpeg"
            headers = {}
        elif self.path == "/chunked-big.jpg":  # no Content-Length: the cap applies while reading
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(ROUTES["/big.jpg"][2])
            self.close_connection = True
            return
        else:
            status, content_type, body, headers = ROUTES.get(
                self.path, (404, "text/plain", b"unknown", {})
            )
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the slow route)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def _settings(**changes) -> IngestSettings:
    base = dict(
        workers=4,
        timeout=0.4,
        max_seconds=5.0,
        retries=1,
        backoff=0.05,
        max_bytes=MAX_BYTES,
        politeness_delay=0.0,
        images_per_shard=3,
        contact_sheet_max=4,
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
    "/slow.jpg": "timeout",
    "/redirect-file": "scheme",
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
    assert _Handler.hits["/slow.jpg"] == 2  # a timeout is, once
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
    gate = HostGate(0.15)
    start = time.monotonic()
    for _ in range(3):
        gate.wait("a.example")
    gate.wait("b.example")
    assert 0.3 <= time.monotonic() - start < 0.45


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
    assert manifest.source == "folder" and manifest.per_class == {"cat": 2, "dining table": 1}
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
            "data.classes=[cat, dining table]",
        ],
    )
    out = ingest.run(cfg)
    assert out.parent == tmp_path / "data" / "images" and out.name.endswith("_folder")
    assert read_image_manifest(out).num_images == 3
    cfg = compose_config("ingest", [f"paths.root_dir={tmp_path}"])
    with pytest.raises(IngestError, match="ingest.urls is not set"):
        ingest.run(cfg)


def test_settings_are_checked():
    with pytest.raises(IngestError, match="unknown ingest setting"):
        IngestSettings.from_config({"kind": "web", "urls": "x.csv", "threads": 3})
    with pytest.raises(IngestError, match="ingest.timeout must be positive"):
        IngestSettings.from_config({"kind": "web", "urls": "x.csv", "timeout": 0})
