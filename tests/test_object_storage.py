"""Shard sets at URLs: extraction into S3 (killed and resumed), training and evaluation
streaming from it, against moto's S3 server on 127.0.0.1, and reading over HTTPS."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usam.commands.eval import run as run_eval
from usam.commands.fit import run as run_fit
from usam.data.datamodule import ShardDataModule
from usam.evaluation.scoring import evaluate
from usam.formats import storage
from usam.formats.embedding_shards import iter_records, read_manifest
from usam.inference.predictor import InferenceSettings, Predictor
from usam.testing.synthetic import write_synthetic_shard_set

from helpers.commands import ROOT, TINY_EVAL, compose_config, run_overrides, wait_for
from helpers.evaluation import head_checkpoint, write_voc
from helpers.s3_server import s3_filesystem, s3_server, with_environment
from helpers.web_server import TLS_CERT, local_server

IMAGES = 12


def image_folder(root: Path) -> Path:
    """``IMAGES`` photos of a rectangle on a background, each its own colours."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        pixels = np.full((48, 64, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        top, left = rng.integers(0, 24), rng.integers(0, 32)
        pixels[top : top + 24, left : left + 32] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(root / f"photo{index:02d}.jpg")
    return root


def extract_command(folder: Path, out: str | Path, hydra_dir: Path) -> list[str]:
    """``usam.extract`` of ``folder`` with the tiny SAM, one image per shard."""
    return [
        *(sys.executable, "-m", "usam.extract", "source=folder", f"source.root={folder}"),
        *("data.classes=[cat,dog]", f"out_dir={out}", "sam=tiny", "amg.points_per_side=4"),
        *("extract.images_per_shard=1", "extract.num_workers=0"),
        *("extract.trainer.accelerator=cpu", "extract.trainer.enable_progress_bar=false"),
        f"hydra.run.dir={hydra_dir}",
    ]


def compose_eval(root: Path, *overrides: str):
    """``usam.eval`` with the tiny SAM on CPU, its run folder under ``root``."""
    paths = [f"paths.root_dir={root}", f"paths.output_dir={root / 'run'}"]
    threshold = "inference.confidence_threshold=0.3"
    return compose_config("eval", [*paths, *TINY_EVAL, threshold, "num_overlays=0", *overrides])


@pytest.fixture(scope="module")
def s3():
    """The server's environment, also set in this process while the module runs; s3fs
    clients cached by an earlier server are dropped."""
    import s3fs

    with s3_server() as environment:
        saved = {name: os.environ.get(name) for name in environment}
        os.environ.update(environment)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield environment
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def new_bucket(s3: dict[str, str], name: str):
    filesystem = s3_filesystem(s3)
    filesystem.mkdir(name)
    return filesystem


def sample_keys(directory: storage.Location) -> list[str]:
    return [record.key for record in iter_records(directory)]


@pytest.mark.slow
def test_killed_extraction_into_s3_resumes_with_every_image_once(tmp_path, s3):
    bucket = new_bucket(s3, "extract")
    folder = image_folder(tmp_path / "images")
    url = "s3://extract/sets/folder"
    # staging in the test's own temporary folder, as a resumed run on this machine finds it
    environment = {**with_environment(s3), "TMPDIR": str(tmp_path / "staging")}
    (tmp_path / "staging").mkdir()
    log = tmp_path / "killed.log"

    def shards_uploaded() -> int:
        return len(bucket.glob("extract/sets/folder/eval/shard-*.tar"))

    command = extract_command(folder, url, tmp_path / "hydra")
    with (
        log.open("w") as output,
        subprocess.Popen(
            command, cwd=tmp_path, env=environment, stdout=output, stderr=subprocess.STDOUT
        ) as process,
    ):
        try:
            wait_for(
                lambda: shards_uploaded() >= 1,
                "a first shard in the bucket",
                process=process,
                output=log.read_text,
            )
        finally:
            process.kill()
    assert 1 <= shards_uploaded() < IMAGES, "the run must be killed midway to mean anything"
    assert not bucket.exists("extract/sets/folder/eval/manifest.json")
    assert not (tmp_path / "s3:").exists()  # nothing went to a local folder named like the URL

    resumed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"eval: {IMAGES} images" in resumed.stdout and f"in {url}/eval" in resumed.stdout

    local = tmp_path / "local"
    uninterrupted = subprocess.run(
        extract_command(folder, local, tmp_path / "hydra-local"),
        cwd=ROOT,
        env=with_environment({}),
        capture_output=True,
        text=True,
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    remote_keys = sample_keys(f"{url}/eval")
    assert len(remote_keys) == len(set(remote_keys)) == IMAGES
    assert sorted(remote_keys) == sorted(sample_keys(local / "eval"))
    manifest = read_manifest(f"{url}/eval")
    assert manifest.num_images == IMAGES and manifest.shards == sorted(
        manifest.shards, key=lambda shard: shard["name"]
    )
    names = {shard["name"] for shard in manifest.shards}
    assert names == {path.rsplit("/", 1)[1] for path in bucket.glob(f"{url[5:]}/eval/*.tar")}
    assert not bucket.exists("extract/sets/folder/eval/pending.json")


def test_fit_writes_and_streams_synthetic_sets_in_s3(tmp_path, s3):
    bucket = new_bucket(s3, "fit")
    url = "s3://fit/synthetic"
    sets = [f"data.train_dir={url}/train", f"data.val_dir={url}/val"]
    overrides = run_overrides(tmp_path, tmp_path / "data", *sets, "logger=csv")
    checkpoints = run_fit(compose_config("fit", [*overrides, "trainer.max_epochs=1"]))
    assert checkpoints["teacher"].is_file() and checkpoints["student"].is_file()
    assert bucket.exists("fit/synthetic/train/manifest.json")
    assert not (tmp_path / "s3:").exists() and not (ROOT / "s3:").exists()
    logged = (tmp_path / "run").rglob("metrics.csv")
    assert any("val/loss" in path.read_text() for path in logged)

    # what the loaders stream from the bucket is the sets' every image, the same as a copy
    local = tmp_path / "copy"
    bucket.get("fit/synthetic", str(local), recursive=True)
    classes = read_manifest(f"{url}/train").classes
    streamed = {}
    for directory in (url, local):
        data = ShardDataModule(classes, f"{directory}/train", f"{directory}/val", batch_size=4)
        data.prepare_data()
        data.setup()
        streamed[str(directory)] = [
            sorted(key for batch in loader() for key in batch["keys"])
            for loader in (data.train_dataloader, data.val_dataloader)
        ]
    assert streamed[url] == streamed[str(local)]
    assert len(streamed[url][0]) == read_manifest(f"{url}/train").num_images


def test_eval_scores_a_shard_set_in_s3(tmp_path, s3):
    bucket = new_bucket(s3, "eval")
    voc = write_voc(tmp_path / "VOC2012")
    ckpt = head_checkpoint(tmp_path / "head.ckpt")
    local = tmp_path / "evalset"
    data = [f"eval_data.source.root={voc}"]
    assert run_eval(compose_eval(tmp_path, *data, f"eval_data.shards_dir={local}")) is None
    bucket.put(str(local / "eval"), "eval/set/eval", recursive=True)

    remote = [*data, "eval_data.shards_dir=s3://eval/set", f"ckpt={ckpt}"]
    summary = run_eval(compose_eval(tmp_path / "remote", *remote))
    assert summary["shards"] == "s3://eval/set/eval" and summary["images"] == 2
    predictor = Predictor.from_checkpoint(ckpt, InferenceSettings(confidence_threshold=0.3))
    expected = evaluate(local / "eval", predictor)
    for name, value in expected.headline.items():
        assert summary[name] == pytest.approx(value, abs=1e-6), name


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


READ_OVER_HTTPS = """
import hashlib, json, sys
from usam.formats import storage
from usam.formats.embedding_shards import iter_records, read_manifest
url = sys.argv[1]
print(json.dumps({
    "manifest": read_manifest(url).to_json(),
    "listed": storage.file_names(url, "shard-*.tar"),
    "records": [
        [r.key, hashlib.sha256(r.embeddings.tobytes()).hexdigest(), r.rles]
        for r in iter_records(url)
    ],
}))
"""


def test_a_shard_set_is_read_over_https(tmp_path):
    """In a child process: aiohttp reads SSL_CERT_FILE (which trusts the test certificate)
    once, when it is first imported."""
    local = tmp_path / "served" / "train"
    write_synthetic_shard_set(local, classes=["cat", "dog"], images_per_class=5, images_per_shard=3)
    handler = functools.partial(_QuietFiles, directory=str(tmp_path / "served"))
    environment = with_environment({"SSL_CERT_FILE": str(TLS_CERT)})
    with local_server(handler, tls=True) as base:
        assert base.startswith("https://")
        read = subprocess.run(
            [sys.executable, "-c", READ_OVER_HTTPS, f"{base}/train"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert read.returncode == 0, read.stderr[-3000:]
    served = json.loads(read.stdout.splitlines()[-1])
    manifest = read_manifest(local)
    assert served["manifest"] == manifest.to_json()
    assert served["listed"] == [shard["name"] for shard in manifest.shards]
    copies = [
        [r.key, hashlib.sha256(r.embeddings.tobytes()).hexdigest(), r.rles]
        for r in iter_records(local)
    ]
    assert served["records"] == copies and len(copies) == 10
