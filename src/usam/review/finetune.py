"""Fine-tuning a trained head on the masks people reviewed in Label Studio or CVAT.

Each SAM proposal of a reviewed image takes the class of the reviewed region it overlaps
best, when their mask IoU reaches ``match_iou``, and background otherwise; the head learns
those per-proposal targets with cross-entropy, plus optionally ``mil_weight`` times the MIL
loss on generated images, so it keeps what it learnt from them. ``docs/method.md``
("Fine-tuning on reviewed annotations") states the rule and which defaults are ours.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from usam.core.errors import UsageError
from usam.core.weights import load_weights
from usam.data.datamodule import collate_records
from usam.formats.embedding_shards import ImageRecord, encode_mask
from usam.inference.predictor import HeadCheckpoint, HeadCheckpointError
from usam.review.reviewed import Review, ReviewedImage
from usam.train.head_metadata import HeadMetadata
from usam.train.lightning_modules import TeacherModule

CHECKPOINT_NAME = "finetune.ckpt"
IGNORED = -100  # the target of padding, which cross-entropy skips


class FineTuneError(UsageError, ValueError):
    """A review, head or proposals that do not fit together."""


@dataclass(frozen=True)
class FineTuneSettings:
    """The ``finetune`` keys that shape training; every default but ``match_iou`` is ours."""

    match_iou: float = 0.5  # a proposal takes a reviewed region's class at mask IoU >= this
    mil_weight: float = 0.0  # weight of the generated images' MIL loss (0: reviewed masks only)
    max_epochs: int = 20
    lr: float = 1.0e-3  # training's (benchmarks/review_loop.py: 1e-4 moved 20 reviews too little)
    batch_size: int = 8  # reviewed images per step
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.match_iou <= 1.0:
            raise ValueError(f"match_iou={self.match_iou} must be in (0, 1]")
        if self.mil_weight < 0.0:
            raise ValueError(f"mil_weight={self.mil_weight} must be >= 0")
        if self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"max_epochs={self.max_epochs} and batch_size={self.batch_size} must be >= 1"
            )
        if self.lr <= 0.0:
            raise ValueError(f"lr={self.lr} must be positive")


def _resized(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Masks on a (height, width) grid, nearest neighbour, as label maps are resized."""
    return np.stack(
        [
            np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
            for mask in masks.astype(np.uint8)
        ]
    ).astype(bool)


def proposal_targets(record: ImageRecord, reviewed: ReviewedImage, match_iou: float) -> np.ndarray:
    """(N,) int64 per SAM proposal: 0 background, 1 + the class of the reviewed region of
    highest mask IoU when that IoU reaches ``match_iou`` (ties go to the earlier region).
    Reviewed masks are resized to the record's grid when SAM saw the image scaled down."""
    targets = np.zeros(record.num_masks, dtype=np.int64)
    if record.num_masks == 0 or len(reviewed.labels) == 0:
        return targets
    regions = reviewed.masks
    if regions.shape[1:] != (record.height, record.width):
        regions = _resized(regions, record.height, record.width)
    region_rles = [encode_mask(mask) for mask in regions]
    ious = np.asarray(
        mask_utils.iou(record.coco_rles(), region_rles, [0] * len(region_rles)), dtype=np.float64
    ).reshape(record.num_masks, len(region_rles))
    best = ious.argmax(1)  # the first of equal maxima
    matched = ious[np.arange(record.num_masks), best] >= match_iou
    targets[matched] = reviewed.labels[best[matched]] + 1
    return targets


@dataclass(frozen=True)
class ReviewedProposals:
    """One training example: an image's SAM proposals and their targets."""

    record: ImageRecord
    targets: np.ndarray  # (N,) int64, from proposal_targets


def collate_reviewed(examples: Sequence[ReviewedProposals]) -> dict[str, Any]:
    """The training stream's padded batch, plus ``targets`` padded with ``IGNORED``."""
    batch = collate_records([example.record for example in examples])
    targets = torch.full(batch["valid"].shape, IGNORED, dtype=torch.int64)
    for row, example in enumerate(examples):
        targets[row, : len(example.targets)] = torch.from_numpy(example.targets)
    batch["targets"] = targets
    return batch


def reviewed_examples(
    review: Review, records: Mapping[str, ImageRecord], match_iou: float
) -> list[ReviewedProposals]:
    """The reviewed images' proposals with targets; images SAM found no mask in teach nothing."""
    examples = []
    for image in review.images:
        if image.file_name not in records:
            raise FineTuneError(
                f"no SAM proposals given for the reviewed image {image.file_name}: extract it "
                "with the head's SAM and mask settings, or leave it out of the review"
            )
        record = records[image.file_name]
        if record.num_masks:
            examples.append(ReviewedProposals(record, proposal_targets(record, image, match_iou)))
    if not examples:
        raise FineTuneError(
            f"{review.source}: none of its {len(review.images)} reviewed images has SAM "
            "proposals to learn from; review images with regions SAM finds"
        )
    return examples


class FineTuneModule(TeacherModule):
    """A trained head learning reviewed per-proposal targets with cross-entropy, plus
    ``mil_weight`` times the MIL loss on generated images when a batch carries them.
    Its metadata is the head's it started from (set by :func:`finetune_head`), with the
    review it learnt from, not a datamodule's."""

    def __init__(self, mil_weight: float = 0.0, **teacher_args: Any) -> None:
        super().__init__(**teacher_args)
        self.mil_weight = mil_weight
        self.review: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """Nothing to read: the starting head's metadata stays."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        reviewed = batch["reviewed"]
        logits = self(reviewed["embeddings"], reviewed["multimask"])
        loss = F.cross_entropy(
            logits.flatten(0, 1), reviewed["targets"].flatten(), ignore_index=IGNORED
        )
        size = len(reviewed["keys"])
        self.log("train/reviewed_ce", loss, batch_size=size)
        if batch.get("generated") is not None:
            _, mil = self.mil_terms(batch["generated"])
            self.log("train/mil", mil, batch_size=len(batch["generated"]["keys"]))
            loss = loss + self.mil_weight * mil
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self._log_provenance("train")
        return loss

    def on_fit_start(self) -> None:
        super().on_fit_start()
        for logger in self.loggers:
            logger.log_hyperparams({f"finetune.review_{k}": v for k, v in self.review.items()})

    def metadata(self) -> HeadMetadata:
        return dataclasses.replace(super().metadata(), review=self.review)


def head_arguments(head: HeadCheckpoint) -> dict[str, Any]:
    """The TeacherModule arguments the head was built with, read from its file: a student
    records its teacher's beside its own, of which those it set win."""
    if head.path is None:
        raise FineTuneError("fine-tuning starts from a head file: load it with load_head")
    hparams = load_weights(head.path, "finetune.head_ckpt", HeadCheckpointError)["hyper_parameters"]
    recorded = {**(hparams.get("teacher_hparams") or {})}
    recorded.update({key: value for key, value in hparams.items() if value is not None})
    names = inspect.signature(TeacherModule).parameters
    return {key: value for key, value in recorded.items() if key in names}


def _training_module(
    head: HeadCheckpoint, review: Review, settings: FineTuneSettings, generated: Any
) -> FineTuneModule:
    arguments = head_arguments(head)
    optimizer = {**(arguments.get("optimizer") or {"name": "adam"}), "lr": settings.lr}
    module = FineTuneModule(mil_weight=settings.mil_weight, **{**arguments, "optimizer": optimizer})
    module.head.load_state_dict(head.head.state_dict())
    meta = head.metadata
    module.provenance = (
        meta.provenance if generated is None else meta.provenance + generated.provenance
    )
    module.mask_settings = meta.mask_settings
    module.sam_backend = meta.sam_backend
    module.review = review.identity()
    return module


def finetune_head(
    head: HeadCheckpoint,
    review: Review,
    records: Mapping[str, ImageRecord],
    settings: FineTuneSettings,
    output_dir: Path,
    loggers: list | None = None,
    generated: L.LightningDataModule | None = None,
) -> Path:
    """Train a copy of ``head`` on ``review`` and write ``<output_dir>/finetune.ckpt``.

    ``records`` maps each reviewed image's ``file_name`` to its SAM proposals, made with
    the head's SAM and mask settings. ``generated`` (a set-up datamodule of generated
    images) adds ``mil_weight`` x its MIL loss to every step when ``mil_weight > 0``; an
    epoch then runs as many steps as the longer of the two, the shorter cycling."""
    if tuple(review.classes) != tuple(head.classes):
        raise FineTuneError(
            f"{review.source} names the classes {list(review.classes)[:5]}..., the head "
            f"{head.path} {head.classes[:5]}...: read the review with the head's classes"
        )
    mixed = generated if generated is not None and settings.mil_weight > 0 else None
    if mixed is not None and list(mixed.classes) != head.classes:
        raise FineTuneError(
            f"the generated images' classes {list(mixed.classes)[:5]}... are not the head's "
            f"{head.classes[:5]}...: set data.classes to the head's"
        )
    L.seed_everything(settings.seed, workers=True)
    examples = reviewed_examples(review, records, settings.match_iou)
    module = _training_module(head, review, settings, mixed)
    shuffled = DataLoader(
        examples,
        batch_size=settings.batch_size,
        shuffle=True,
        collate_fn=collate_reviewed,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    loaders = {"reviewed": shuffled}
    if mixed is not None:
        loaders["generated"] = mixed.train_dataloader()
    trainer = L.Trainer(
        max_epochs=settings.max_epochs,
        accelerator="auto",
        devices=1,
        logger=loggers or False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=output_dir,
    )
    trainer.fit(module, train_dataloaders=CombinedLoader(loaders, mode="max_size_cycle"))
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = output_dir / CHECKPOINT_NAME
    partial = checkpoint.with_suffix(".partial")  # readers see the old head or the new one
    trainer.save_checkpoint(partial)
    os.replace(partial, checkpoint)
    return checkpoint
