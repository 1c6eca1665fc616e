"""Checkpoint resolution, download (from a local HTTP server only) and loading errors."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from usam.core.config import settings_from_config
from usam.sam import checkpoints
from usam.sam.checkpoints import CheckpointError
from usam.sam.registry import SamSettings

from helpers.commands import compose_config

PAYLOAD = b"not really a checkpoint, just bytes to download\n" * 1000


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        _Handler.requests.append(self.path)
        if self.path != "/sam_test.pth":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.requests.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("USAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("USAM_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache" / "checkpoints"


def test_download_verifies_and_lands_atomically_in_the_cache(server, cache):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    path = checkpoints.resolve("sam_test.pth", f"{server}/sam_test.pth", sha)
    assert path == cache / "sam_test.pth"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["sam_test.pth"]
    # A second resolution uses the cache, not the network.
    assert checkpoints.resolve("sam_test.pth", f"{server}/sam_test.pth", sha) == path
    assert _Handler.requests == ["/sam_test.pth"]


def test_bad_checksum_discards_the_download(server, cache):
    with pytest.raises(CheckpointError) as error:
        checkpoints.resolve("sam_test.pth", f"{server}/sam_test.pth", "0" * 64)
    message = str(error.value)
    assert hashlib.sha256(PAYLOAD).hexdigest() in message and "0" * 64 in message
    assert "sam.checkpoint=" in message
    assert not cache.exists() or list(cache.iterdir()) == []


def test_failed_download_names_file_url_and_config_key(server, cache):
    url = f"{server}/missing.pth"
    with pytest.raises(CheckpointError) as error:
        checkpoints.resolve("missing.pth", url, None)
    message = str(error.value)
    assert "missing.pth" in message and url in message and "sam.checkpoint=" in message
    assert not cache.exists() or list(cache.iterdir()) == []


def test_offline_fails_at_once_without_touching_the_network(server, cache, monkeypatch):
    monkeypatch.setenv("USAM_OFFLINE", "1")
    url = f"{server}/sam_test.pth"
    with pytest.raises(CheckpointError, match="offline") as error:
        checkpoints.resolve("sam_test.pth", url, None)
    assert url in str(error.value) and "sam.checkpoint=/path/to/sam_test.pth" in str(error.value)
    assert _Handler.requests == []


def test_explicit_path_wins_and_a_missing_one_is_reported(tmp_path, cache):
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    assert checkpoints.resolve("other.pth", None, None, explicit=explicit) == explicit
    with pytest.raises(CheckpointError, match="sam.checkpoint") as error:
        checkpoints.resolve("other.pth", None, None, explicit=tmp_path / "nope.pth")
    assert "nope.pth" in str(error.value)


def test_paths_cache_dir_is_where_sam_checkpoints_are_found_and_downloaded(server, cache, tmp_path):
    mine = tmp_path / "mine"
    cfg = compose_config("extract", ["sam=vit_b", f"paths.cache_dir={mine}"])
    sam = settings_from_config(SamSettings, cfg.sam, "sam")
    assert sam.cache_dir == f"{mine}/checkpoints"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    assert sam.ensure_weights() == mine / "checkpoints" / "sam_vit_b_01ec64.pth"
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    url = f"{server}/sam_test.pth"
    path = checkpoints.resolve("sam_test.pth", url, sha, cache_dir=sam.cache_dir)
    assert path == mine / "checkpoints" / "sam_test.pth" and path.read_bytes() == PAYLOAD
    assert not cache.exists()  # $USAM_CACHE is only the default of paths.cache_dir
    with pytest.raises(CheckpointError, match=f"place it in {mine}/checkpoints .sam.cache_dir"):
        checkpoints.resolve("custom.pth", None, None, cache_dir=sam.cache_dir)


def test_no_url_and_no_cached_file(cache):
    with pytest.raises(CheckpointError, match="no download address"):
        checkpoints.resolve("custom.pth", None, None)


def test_load_rejects_unreadable_and_non_state_dict_files(tmp_path):
    model = torch.nn.Linear(2, 2)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 definitely not a zip or pickle")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        checkpoints.load_into(model, garbage, "tiny")
    nested = tmp_path / "nested.pth"
    torch.save({"model": model.state_dict()}, nested)
    with pytest.raises(CheckpointError, match="not a SAM state dict"):
        checkpoints.load_into(model, nested, "tiny")


def test_load_refuses_to_unpickle_code(tmp_path):
    path = tmp_path / "code.pth"
    torch.save({"weight": torch.zeros(2, 2), "bias": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        checkpoints.load_into(torch.nn.Linear(2, 2), path, "tiny")


class _Opaque:
    pass


def test_mismatched_state_dict_says_which_model_it_fits(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_into(
            torch.nn.Linear(2, 2), path, "vit_b", identify=lambda state: "a 3-wide layer"
        )
    message = str(error.value)
    assert "does not fit sam=vit_b" in message and "it looks like a 3-wide layer" in message
    assert "size mismatch" in message
