from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usam.data.extraction import extract, shard_set_id, split_of
from usam.data.sources import FolderSource, ImageShardSource
from usam.formats.embedding_shards import iter_records, read_manifest
from usam.formats.image_shards import ImageShardWriter, encode_jpeg
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings, build_sam
from usam.sam.sam1_backend import AutomaticMaskEngine

from helpers.commands import ROOT, run_python, wait_for

SETTINGS = AmgSettings(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.3)
CLASSES = ["cat", "dog"]
FAST = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


def shapes_image(seed: int, size: tuple[int, int] = (48, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.full((*size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    y0, x0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    pixels[y0 : y0 + size[0] // 2, x0 : x0 + size[1] // 2] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def image_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shapes_image(i).save(root / f"photo.{i:02d}.jpg")
    return root


@pytest.fixture(scope="module")
def tiny_sam():
    return build_sam("tiny")


def test_folder_extraction_matches_the_engine_and_rejects_bad_files(tmp_path, tiny_sam):
    folder = image_folder(tmp_path / "images", 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    sam, info = tiny_sam
    engine = AutomaticMaskEngine(sam, SETTINGS)
    source = FolderSource(folder, CLASSES)
    manifests = extract(source, tmp_path / "out", engine, info, trainer_args=FAST)
    assert set(manifests) == {"eval"}
    manifest = manifests["eval"]
    assert manifest.kind == "eval" and manifest.num_images == 3
    assert manifest.provenance.reasons == ("an untrained SAM (tiny)",)
    assert manifest.config["source_fingerprint"] == source.fingerprint()
    rejected = [
        json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().split("\n") if x
    ]
    assert sorted(Path(r["path"]).name for r in rejected) == ["broken.jpg", "empty.png"]
    records = {r.key: r for r in iter_records(tmp_path / "out" / "eval")}
    for index, key in enumerate(source.keys):
        if key not in records:
            continue
        direct = engine.generate(np.asarray(source.load(index).image))
        record = records[key]
        assert record.rles == direct.rles and record.source["path"].startswith("photo.")
        np.testing.assert_array_equal(record.embeddings, direct.tokens.astype(np.float16))
        np.testing.assert_array_equal(record.iou_preds, direct.iou_preds)
    assert sum(r.num_masks for r in records.values()) == manifest.num_masks > 0
    # finished: a second run changes nothing and extracts nothing
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "out" / "eval").iterdir())
    extract(source, tmp_path / "out", engine, info, trainer_args=FAST)
    assert before == sorted(p.stat().st_mtime_ns for p in (tmp_path / "out" / "eval").iterdir())


def test_training_images_keep_labels_and_split_by_key(tmp_path, tiny_sam):
    with ImageShardWriter(
        tmp_path / "images", vocabulary="custom", classes=CLASSES, source="folder"
    ) as writer:
        for i in range(8):
            meta = {"class_name": CLASSES[i % 2], "class_index": i % 2, "source": "folder"}
            writer.write(f"img-{i:02d}", encode_jpeg(shapes_image(i)), {**meta, "path": f"{i}.jpg"})
    source = ImageShardSource(tmp_path / "images")
    sam, info = tiny_sam
    manifests = extract(
        source,
        tmp_path / "out",
        AutomaticMaskEngine(sam, SETTINGS),
        info,
        val_fraction=0.3,
        trainer_args=FAST,
    )
    assert set(manifests) == {"train", "val"}
    assert manifests["train"].num_images + manifests["val"].num_images == 8
    for split in ("train", "val"):
        for record in iter_records(tmp_path / "out" / split):
            assert split_of(record.key, "train", 0.3) == split
            index = int(record.key.split("-")[1])
            assert record.labels == [1 - index % 2, index % 2]
    assert manifests["val"].num_images == sum(
        split_of(f"img-{i:02d}", "train", 0.3) == "val" for i in range(8)
    )


def test_cache_id_follows_inputs_and_settings(tmp_path):
    folder = image_folder(tmp_path / "images", 2)
    sam = SamSettings("tiny")
    source = FolderSource(folder, CLASSES)
    first = shard_set_id(source, sam, SETTINGS, 0.05)
    assert first == shard_set_id(FolderSource(folder, CLASSES), sam, SETTINGS, 0.05)
    assert first != shard_set_id(source, sam, AmgSettings(points_per_side=8), 0.05)
    assert first != shard_set_id(source, SamSettings("tiny", "other.pth"), SETTINGS, 0.05)
    shapes_image(9).save(folder / "new.jpg")
    assert first != shard_set_id(FolderSource(folder, CLASSES), sam, SETTINGS, 0.05)


def extract_command(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "usam.extract",
        "source=folder",
        f"source.root={folder}",
        "data.classes=[cat,dog]",
        f"out_dir={out}",
        "sam=tiny",
        "amg.points_per_side=4",  # the paper's reading: 16 masks per image
        "extract.images_per_shard=1",
        "extract.num_workers=0",
        "extract.trainer.accelerator=cpu",
        "extract.trainer.enable_progress_bar=false",
        f"hydra.run.dir={out.parent / 'hydra'}",
        *extra,
    ]


def keys_in(out: Path) -> list[str]:
    return [r.key for r in iter_records(out / "eval")]


def test_killed_run_resumes_with_every_image_exactly_once(tmp_path):
    folder = image_folder(tmp_path / "images", 24)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "killed.log"

    def shards() -> int:
        return len(list((out / "eval").glob("shard-*.tar")))

    with (
        log.open("w") as output,
        subprocess.Popen(
            [sys.executable, *extract_command(folder, out)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        ) as process,
    ):
        try:  # the kill lands once three images are on disk, however long that takes
            wait_for(lambda: shards() >= 3, "a third shard", process=process, output=log.read_text)
        finally:
            process.kill()
    written = shards()
    assert 3 <= written < 24, "the run must be killed midway for this test to mean anything"
    assert not (out / "eval" / "manifest.json").exists()
    result = run_python(*extract_command(folder, out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "eval: 24 images" in result.stdout and "(RANDOM WEIGHTS: an untrained SAM" in result.stdout
    )
    keys = keys_in(out)
    assert len(keys) == len(set(keys)) == 24
    assert read_manifest(out / "eval").num_images == 24


def test_two_process_ddp_extracts_every_image_once(tmp_path):
    folder = image_folder(tmp_path / "images", 7)
    out = tmp_path / "out"
    result = run_python(
        *extract_command(folder, out, "extract.trainer.devices=2", "extract.trainer.strategy=ddp")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (out / "eval").glob("shard-*.tar"))
    assert {n.split("-")[1] for n in names} == {"r0", "r1"}  # one series per rank
    keys = keys_in(out)
    assert len(keys) == len(set(keys)) == 7
    manifest = read_manifest(out / "eval")
    assert [s["name"] for s in manifest.shards] == names and manifest.num_images == 7


def test_a_file_name_that_is_not_utf8_is_extracted_under_a_safe_key(tmp_path, tiny_sam):
    folder = image_folder(tmp_path / "images", 1)
    latin1 = os.fsdecode(b"\xe9t\xe9.jpg")
    shapes_image(5).save(folder / latin1)
    sam, info = tiny_sam
    source = FolderSource(folder, CLASSES)
    manifests = extract(
        source, tmp_path / "out", AutomaticMaskEngine(sam, SETTINGS), info, trainer_args=FAST
    )
    assert manifests["eval"].num_images == 2
    paths = {record.source["path"] for record in iter_records(tmp_path / "out" / "eval")}
    assert paths == {"photo.00.jpg", latin1}
