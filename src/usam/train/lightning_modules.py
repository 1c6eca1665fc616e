"""Teacher and student LightningModules: the head trained with MIL, then with MIL + uncertainty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from usam.core.config import ConfigError
from usam.core.provenance import Provenance
from usam.core.weights import WeightsFileError, load_weights
from usam.sam.amg_settings import AmgSettings
from usam.train.head import MaskClassifierHead, input_dim, select_input_view
from usam.train.head_metadata import HeadMetadata
from usam.train.losses import (
    check_correct_outputs,
    check_top_k,
    check_uncertainty_target,
    mil_image_scores,
    mil_loss,
    uncertainty_loss,
)

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(
    params: list[nn.Parameter], name: str = "adam", **options: Any
) -> torch.optim.Optimizer:
    """``model.optimizer``: Adam as in the paper, or AdamW; the other keys are its options."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"model.optimizer.name={name!r} is not one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, **options)


class TeacherModule(L.LightningModule):
    """The head trained with the MIL loss of Eq. 1-2 on image-level labels."""

    def __init__(
        self,
        classes: Sequence[str],
        input_view: str = "tokens",
        embed_dim: int = 1024,
        sam_model_type: str | None = None,
        head: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        top_k: float = 0.1,
        background_in_label: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classes = list(classes)
        self.input_view = input_view
        self.top_k = check_top_k(top_k)  # before any data is prepared
        self.background_in_label = background_in_label
        self.optimizer_config = dict(optimizer or {"name": "adam", "lr": 1e-3})
        self.head = MaskClassifierHead(
            input_dim(input_view, embed_dim), len(self.classes) + 1, **dict(head or {})
        )
        # what the training shards say, read in setup and saved with the head
        self.provenance = Provenance()
        self.mask_settings: AmgSettings | None = None
        self.sam_backend: str | None = None
        # metric objects reduce by image count across DDP ranks, whatever each rank saw
        self.held_out = nn.ModuleDict(
            {
                stage: nn.ModuleDict({"loss": MeanMetric(), "image_acc": MeanMetric()})
                for stage in ("val", "test")
            }
        )

    def forward(self, embeddings: torch.Tensor, multimask: torch.Tensor) -> torch.Tensor:
        """Mask logits (..., C+1) from stored embeddings; index 0 is background."""
        return self.head(select_input_view(embeddings, multimask, self.input_view))

    def mil_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["embeddings"], batch["multimask"])
        loss = mil_loss(
            logits, batch["valid"], batch["labels"], self.top_k, self.background_in_label
        )
        return logits, loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, loss = self.mil_terms(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["keys"]))
        # the progress bar shows the losses, so it says random weights next to them
        self._log_provenance("train")
        return loss

    def held_out_step(self, batch: dict[str, Any], stage: str) -> None:
        """MIL loss and image accuracy (top class among the image's labels) on held-out images."""
        logits, loss = self.mil_terms(batch)
        scores = mil_image_scores(logits, batch["valid"], self.top_k)
        predicted = scores[:, 1:].argmax(1)
        correct = batch["labels"].gather(1, predicted[:, None]).squeeze(1)
        metrics = self.held_out[stage]
        metrics["loss"].update(loss, weight=len(batch["keys"]))
        metrics["image_acc"].update(correct)
        self.log(f"{stage}/loss", metrics["loss"], prog_bar=True)
        self.log(f"{stage}/image_acc", metrics["image_acc"], prog_bar=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.held_out_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.held_out_step(batch, "test")

    def _start_held_out_epoch(self, stage: str) -> None:
        # fresh states; those left by an earlier loop may be inference tensors
        for metric in self.held_out[stage].values():
            metric.reset()

    def on_validation_epoch_start(self) -> None:
        self._start_held_out_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._start_held_out_epoch("test")

    def _log_provenance(self, stage: str) -> None:
        shown = self.provenance.random_weights
        for name, value in self.provenance.scalars(stage).items():
            self.log(name, value, sync_dist=stage != "train", prog_bar=shown)

    def on_validation_epoch_end(self) -> None:
        self._log_provenance("val")

    def on_test_epoch_end(self) -> None:
        self._log_provenance("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return build_optimizer(params, **self.optimizer_config)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.provenance = getattr(datamodule, "provenance", Provenance())
        train = getattr(datamodule, "manifests", {}).get("train")
        if train is not None:
            amg = train.config.get("amg")
            self.mask_settings = AmgSettings.recorded(amg) if amg else None
            self.sam_backend = train.sam.get("backend")

    def on_fit_start(self) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(self.provenance.fields())

    def metadata(self) -> HeadMetadata:
        """What a checkpoint of this head records (eval and annotate make masks the same way)."""
        return HeadMetadata(
            classes=tuple(self.classes),
            input_view=self.input_view,
            stage=type(self).__name__,
            sam_model_type=self.hparams.sam_model_type,
            sam_backend=self.sam_backend,
            mask_settings=self.mask_settings,
            provenance=self.provenance,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["usam"] = self.metadata().to_checkpoint()


class StudentModule(TeacherModule):
    """MIL plus lambda * the uncertainty loss on masks the frozen teacher gets wrong or doubts.

    Build it with :meth:`from_teacher` so the teacher's weights travel inside the
    student's checkpoint and reloading it needs no teacher file. Its own head starts
    untrained, as in the paper, unless ``init_from_teacher`` copies the teacher's.
    """

    def __init__(
        self,
        teacher_hparams: dict[str, Any],
        lambda_uncertainty: float = 1.0,
        entropy_threshold: float = 0.5,
        uncertainty_target: str = "label_restricted",
        correct_outputs: str = "labels_and_background",
        optimizer: dict[str, Any] | None = None,
        top_k: float | None = None,
    ) -> None:
        teacher_args = dict(teacher_hparams)
        teacher_args["optimizer"] = optimizer or teacher_args.get("optimizer")
        if top_k is not None:
            teacher_args["top_k"] = top_k
        super().__init__(**teacher_args)
        self.save_hyperparameters()
        self.lambda_uncertainty = lambda_uncertainty
        self.entropy_threshold = entropy_threshold
        self.uncertainty_target = check_uncertainty_target(uncertainty_target)
        self.correct_outputs = check_correct_outputs(correct_outputs)
        self.teacher = TeacherModule(**teacher_hparams)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    @classmethod
    def from_teacher(
        cls, teacher_checkpoint: str, init_from_teacher: bool = False, **student_args: Any
    ) -> StudentModule:
        """The teacher is read weights-only (never code from the file), and must be one."""
        checkpoint = load_weights(teacher_checkpoint, "teacher_ckpt")
        meta = checkpoint.get("usam") if isinstance(checkpoint, dict) else None
        stage = meta.get("stage") if isinstance(meta, dict) else None  # in every layout
        if stage != TeacherModule.__name__:
            raise WeightsFileError(
                f"teacher_ckpt={teacher_checkpoint} is not a teacher checkpoint (it holds "
                f"{stage or 'no usam head'}): pass one from checkpoints/teacher of a fit run"
            )
        teacher = TeacherModule(**checkpoint["hyper_parameters"])
        teacher.load_state_dict(checkpoint["state_dict"])
        student = cls(dict(teacher.hparams), **student_args)
        student.teacher.load_state_dict(teacher.state_dict())
        if init_from_teacher:
            student.head.load_state_dict(teacher.head.state_dict())
        return student

    def train(self, mode: bool = True) -> StudentModule:
        super().train(mode)
        self.teacher.eval()
        return self

    def student_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits, mil = self.mil_terms(batch)
        with torch.no_grad():
            teacher_logits = self.teacher(batch["embeddings"], batch["multimask"])
        unc, bad = uncertainty_loss(
            logits,
            teacher_logits,
            batch["valid"],
            batch["labels"],
            self.entropy_threshold,
            self.uncertainty_target,
            self.correct_outputs,
        )
        bad_fraction = bad.sum() / batch["valid"].sum().clamp(min=1)
        loss = mil + self.lambda_uncertainty * unc
        return {"loss": loss, "mil": mil, "uncertainty": unc, "bad_fraction": bad_fraction}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.student_terms(batch)
        size = len(batch["keys"])
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=size)
        for name in ("mil", "uncertainty", "bad_fraction"):
            self.log(f"train/{name}", terms[name], batch_size=size)
        return terms["loss"]
