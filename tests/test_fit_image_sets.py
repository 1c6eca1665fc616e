"""``usam.ingest`` then ``usam.fit`` on what it stored, run as a user runs them from a folder of
their own: a folder of photos per class (``ingest=folder``, then ``data.source`` naming the
set it printed) and a web-crawled URL list (the paper's Table 4 setting,
``experiment=voc_wc``), served here from loopback. Tiny random SAM, 2 x 2 points, one epoch
per stage."""

from __future__ import annotations

import csv
import io
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from PIL import Image

from usam.formats.embedding_shards import read_manifest
from usam.formats.image_shards import read_image_manifest
from usam.inference.predictor import load_head

from helpers.commands import TINY_TEACHER_FIT, run_python
from helpers.official_amg import shapes_image
from helpers.web_server import local_server, reply

CLASSES = ("cat", "dog")
PER_CLASS = 4
# the tiny SAM (experiment=voc_wc picks vit_h), 2 x 2 points and half the images held out
# by key hash: of 8, both splits get some in all but 1 set in 128
TINY_SAM = [
    "sam=tiny",
    "amg.points_per_side=2",
    "amg.stability_score_thresh=0",
    "extract.val_fraction=0.5",
]


def _photo(cls: str, index: int) -> Image.Image:
    """A distinct shapes photo per class and index, so no image is dropped as a duplicate."""
    return Image.fromarray(shapes_image(96, 128, seed=10 * CLASSES.index(cls) + index))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _image_set(ingest: str, tmp_path: Path) -> Path:
    """The folder ``usam.ingest`` printed as its last line, checked to hold every photo."""
    stored = Path(ingest.strip().splitlines()[-1])
    assert stored.parent == tmp_path / "data" / "images"
    assert read_image_manifest(stored).per_class == dict.fromkeys(CLASSES, PER_CLASS)
    return stored


def _assert_trained_on(fit_stdout: str, tmp_path: Path, image_set: Path) -> None:
    """fit's console names the shard set it extracted from ``image_set``, and that set holds
    every stored image."""
    into = f"extracting SAM embeddings of {len(CLASSES) * PER_CLASS} images into "
    (line,) = [line for line in fit_stdout.splitlines() if line.startswith(into)]
    shard_set = Path(line.removeprefix(into))
    assert shard_set.parent == tmp_path / "data" / "shards"
    assert shard_set.name.startswith(f"{image_set.name}-tiny-")
    train, val = (read_manifest(shard_set / split) for split in ("train", "val"))
    assert train.num_images + val.num_images == len(CLASSES) * PER_CLASS
    assert train.num_images >= 1 and val.num_images >= 1
    assert train.classes == list(CLASSES) and train.sam["random_weights"]


def test_fit_trains_on_an_ingested_folder_of_photos(tmp_path):
    for cls in CLASSES:
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for index in range(PER_CLASS):
            _photo(cls, index).save(tmp_path / "photos" / cls / f"{index}.jpg")
    classes = f"data.classes=[{','.join(CLASSES)}]"
    ingest = run_python(
        "-m", "usam.ingest", classes, "ingest=folder", "ingest.root=photos", cwd=tmp_path
    )
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    image_set = _image_set(ingest.stdout, tmp_path)
    source = image_set.name.rsplit("_", 1)[1]  # sets are named <vocabulary>_<source>

    fit = run_python(
        *("-m", "usam.fit", *TINY_TEACHER_FIT, f"data.source={source}", *TINY_SAM),
        *("paths.output_dir=run", f"paths.cache_dir={tmp_path / 'cache'}"),  # run/: relative
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    _assert_trained_on(fit.stdout, tmp_path, image_set)
    run = tmp_path / "run"
    assert "\nusam.fit finished: run\n" in fit.stdout
    (teacher,) = (run / "checkpoints" / "teacher").glob("epoch*.ckpt")
    ending = fit.stdout[fit.stdout.index("usam.fit finished") :]
    assert f"teacher  {teacher.relative_to(run)}" in ending
    assert tuple(load_head(teacher).metadata.classes) == CLASSES
    with (run / "csv" / "teacher" / "version_0" / "metrics.csv").open() as metrics:
        rows = list(csv.DictReader(metrics))
    assert any(row["val/loss"] for row in rows) and any(row["test/image_acc"] for row in rows)
    assert "RANDOM WEIGHTS" in ending


WEB_ROUTES = {f"/{cls}/{index}.jpg": (cls, index) for cls in CLASSES for index in range(PER_CLASS)}


class _Photos(BaseHTTPRequestHandler):
    """Serves WEB_ROUTES' photos; any other path (robots.txt included) is a 404."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path in WEB_ROUTES:
            reply(self, 200, "image/jpeg", _jpeg(_photo(*WEB_ROUTES[self.path])))
        else:
            reply(self, 404, "text/plain", b"not here")


@pytest.fixture
def photo_server(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # the commands reach loopback directly
    with local_server(_Photos) as url:
        yield url


def test_fit_trains_the_web_crawled_experiment_on_an_ingested_url_list(tmp_path, photo_server):
    rows = [f"{photo_server}{path},{cls}" for path, (cls, _) in WEB_ROUTES.items()]
    missing = f"{photo_server}/gone.jpg"
    (tmp_path / "urls.csv").write_text("\n".join(["url,class", *rows, f"{missing},cat"]) + "\n")
    classes = f"data.classes=[{','.join(CLASSES)}]"
    ingest = run_python(
        *("-m", "usam.ingest", classes, "ingest.urls=urls.csv"),
        *("ingest.allow_private_addresses=true", "ingest.politeness_delay=0"),
        cwd=tmp_path,
    )
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    image_set = _image_set(ingest.stdout, tmp_path)
    assert image_set.name.endswith("_web")  # the set experiment=voc_wc reads
    failed = [json.loads(line) for line in (image_set / "failed.jsonl").read_text().splitlines()]
    assert [(record["url"], record["kind"]) for record in failed] == [(missing, "http")]

    fit = run_python(
        *("-m", "usam.fit", "experiment=voc_wc", *TINY_TEACHER_FIT, *TINY_SAM),
        *("stage=both", "logger=wandb", f"paths.cache_dir={tmp_path / 'cache'}"),
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    _assert_trained_on(fit.stdout, tmp_path, image_set)
    (run,) = (tmp_path / "outputs" / "fit").glob("voc-tiny/*")  # the default run folder
    assert f"usam.fit finished: {run}" in fit.stdout
    for stage in ("teacher", "student"):
        (tested,) = (run / "checkpoints" / stage).glob("epoch*.ckpt")
        assert f"{stage}  {tested.relative_to(run)}" in fit.stdout
        assert tuple(load_head(tested).metadata.classes) == CLASSES
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))  # what wandb sync uploads
    assert len(logs) == 2  # one run per stage, written before the command exited
    for log in logs:
        for marker in (b"experiment:voc_wc", b"source:web", b"random-weights", b"val/loss"):
            assert marker in log.read_bytes(), (log, marker)
