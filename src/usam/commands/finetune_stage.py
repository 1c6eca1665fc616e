"""``python -m usam.fit stage=finetune finetune.head_ckpt=H finetune.review=R finetune.images=DIR``:
a trained head learns the masks people corrected.

The inputs are checked first, each with one line naming its key. The review is read with
the head's classes, its images' SAM proposals are extracted from the annotated folder as
``usam.annotate`` makes them (the head's SAM and mask settings; cached under the run's
``sam/`` folder, so a rerun in the same folder extracts nothing), and
:func:`usam.review.finetune.finetune_head` writes ``checkpoints/finetune/finetune.ckpt``.
Generated images and their shards are made only when ``finetune.mil_weight > 0``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from usam.cli import command_line_sets
from usam.commands.fit import NOT_RESULTS, data_settings_of, finish_loggers, stage_loggers
from usam.commands.mask_settings import head_mask_settings
from usam.core.config import ConfigError, settings_from_config
from usam.core.provenance import Provenance, report
from usam.core.vocabulary import load_vocabulary
from usam.data.eval_shards import require_masks
from usam.data.extraction import ExtractSettings, run_extraction, shard_set_dir
from usam.data.rejections import REJECTED_NAME
from usam.data.sources import FolderSource
from usam.formats.embedding_shards import ImageRecord, iter_records
from usam.inference.predictor import HeadCheckpoint, load_head
from usam.review.finetune import FineTuneError, FineTuneSettings, finetune_head
from usam.review.read import read_review
from usam.review.reviewed import Review
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings

# the finetune keys that say what to read; the others are FineTuneSettings
INPUT_KEYS = ("head_ckpt", "review", "images", "max_side")


def _settings(cfg: DictConfig) -> FineTuneSettings:
    values = OmegaConf.to_container(cfg.finetune, resolve=True)
    trained = {key: value for key, value in values.items() if key not in INPUT_KEYS}
    return settings_from_config(FineTuneSettings, {**trained, "seed": cfg.seed}, "finetune")


def _head(path: str | None) -> HeadCheckpoint:
    if not path:
        raise ConfigError(
            "stage=finetune needs finetune.head_ckpt: set it to a head checkpoint from "
            "checkpoints/teacher or checkpoints/student of a fit run"
        )
    return load_head(path, "finetune.head_ckpt")


def _images(folder: str | None) -> Path:
    if not folder or not Path(folder).is_dir():
        raise ConfigError(
            f"finetune.images={folder} is not a folder: set it to the folder of images that "
            "was annotated (the review names each image by its path under it)"
        )
    return Path(folder)


def _review_source(source: str | None) -> str:
    if not source:
        raise ConfigError(
            "stage=finetune needs finetune.review: a Label Studio export (.json), a CVAT for "
            "images 1.1 XML file (.xml) or http(s)://HOST[:PORT]/projects/<id>"
        )
    if "://" not in source and not Path(source).is_file():
        raise ConfigError(
            f"finetune.review={source} is not a file: export the reviewed tasks from Label "
            "Studio (JSON) or CVAT (CVAT for images 1.1) and point finetune.review at the file"
        )
    return source


def reviewed_proposals(
    review: Review,
    images: Path,
    sam: SamSettings,
    amg: AmgSettings,
    extract: ExtractSettings,
    work_root: Path,
    max_side: int | None,
) -> tuple[Review, dict[str, ImageRecord], Provenance]:
    """SAM's proposals of the reviewed images, by file name; the review without the images
    SAM could not read (a skipped line each); and why the proposals are no SAM's."""
    if not review.images:
        return review, {}, Provenance()
    reviewed = {image.file_name for image in review.images}
    folder = FolderSource(images, review.classes, max_side)
    source = folder.subset(lambda _, path: path.relative_to(folder.root).as_posix() in reviewed)
    work = shard_set_dir(work_root, "review", source, sam, amg, 0.0)
    manifests = run_extraction(source, work, sam, amg, extract)
    require_masks(manifests["eval"], work / "eval", amg)
    records = {record.source["path"]: record for record in iter_records(work / "eval")}
    names = {
        key: path.relative_to(source.root).as_posix()
        for key, path in zip(source.keys, source.paths)
    }
    reasons = {}
    if (work / REJECTED_NAME).is_file():
        for line in (work / REJECTED_NAME).read_text().splitlines():
            entry = json.loads(line)
            reasons[names[entry["key"]]] = entry["reason"]
    kept = tuple(image for image in review.images if image.file_name in records)
    skipped = tuple(
        f"{image.file_name}: not a usable image ({reasons.get(image.file_name, 'not extracted')}); "
        "left out"
        for image in review.images
        if image.file_name not in records
    )
    usable = dataclasses.replace(review, images=kept, skipped=review.skipped + skipped)
    return usable, records, manifests["eval"].provenance


def run_finetune(cfg: DictConfig) -> dict[str, Path]:
    """Read the review, extract its images' proposals, fine-tune; returns the checkpoint."""
    settings = _settings(cfg)
    head = _head(cfg.finetune.head_ckpt)
    images = _images(cfg.finetune.images)
    source = _review_source(cfg.finetune.review)
    sam = settings_from_config(SamSettings, cfg.sam, "sam")
    head.check_sam(sam.model_type, ConfigError)
    configured = settings_from_config(AmgSettings, cfg.amg, "amg")
    amg = head_mask_settings(configured, head, command_line_sets("amg"))
    extract = settings_from_config(ExtractSettings, cfg.extract, "extract")
    review = read_review(source, head.classes, images)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    review, records, proposals = reviewed_proposals(
        review, images, sam, amg, extract, output_dir / "sam", cfg.finetune.max_side
    )
    for line in review.skipped:
        print(line)
    print(f"finetune: {len(review.images)} images, {review.regions} regions from {review.source}")
    if not review.images:
        raise FineTuneError(
            f"{review.source}: no reviewed image is usable (the lines above say why); fix "
            "finetune.review or finetune.images"
        )
    generated = _generated(cfg, head) if settings.mil_weight > 0 else None
    # the fine-tuned head's training data: the head's, the reviewed images' proposals and
    # the generated images it keeps learning from
    data = head.metadata.provenance + proposals
    if generated is not None:
        data += generated.provenance
    report(data, NOT_RESULTS)
    head = dataclasses.replace(head, metadata=dataclasses.replace(head.metadata, provenance=data))
    loggers = stage_loggers(cfg, "finetune", data)
    try:
        checkpoint = finetune_head(
            head,
            review,
            records,
            settings,
            output_dir / "checkpoints" / "finetune",
            loggers,
            generated,
        )
    finally:
        finish_loggers(loggers)
    print(f"finetune checkpoint: {checkpoint.resolve()}")
    if data.random_weights:  # last, so that no one reads the lines above without it
        print(f"  {NOT_RESULTS}{data.note()}")
    return {"finetune": checkpoint}


def _generated(cfg: DictConfig, head: HeadCheckpoint) -> Any:
    """The fit run's datamodule of generated images, made if missing, for the MIL term."""
    classes = list(load_vocabulary(cfg.data.classes).classes)
    if classes != head.classes:  # before hours of image generation
        raise ConfigError(
            f"finetune.mil_weight > 0 learns from generated images of data.classes, "
            f"{classes[:5]}..., which are not the head's {head.classes[:5]}...: set "
            "data.classes to the head's vocabulary"
        )
    datamodule = instantiate(cfg.data, _partial_=True)(**data_settings_of(cfg))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule
