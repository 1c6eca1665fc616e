"""A head checkpoint with the SAM it was trained on: the Python API for labelling images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from usam.core.errors import UsageError
from usam.data.sources import load_rgb
from usam.formats.embedding_shards import ImageRecord
from usam.formats.image_shards import to_rgb
from usam.inference.predictor import InferenceSettings, Prediction, Predictor, load_head
from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_engine import PointGridEngine
from usam.sam.registry import SamSettings, build_engine


class AnnotationError(UsageError, ValueError):
    """A head, SAM or folder that cannot be annotated with."""


class Annotator:
    """A head checkpoint with the SAM it was trained on: images in, labelled instances out."""

    def __init__(
        self,
        predictor: Predictor,
        sam: str | SamSettings | None = None,
        sam_checkpoint: str | Path | None = None,
        amg: AmgSettings | None = None,
    ) -> None:
        """``sam``: a model type (its weights ``sam_checkpoint``, else the default cache) or
        a command's whole ``SamSettings``; None: the model type the head was trained on.
        ``amg``: None makes masks with the settings the head recorded (those of its
        training shards; the defaults where it records none), as ``usam.annotate`` does;
        settings of another precision than the head's are refused."""
        if not isinstance(sam, SamSettings):
            model_type = sam or predictor.checkpoint.sam_model_type
            if model_type is None:
                raise AnnotationError(
                    "the head does not say which SAM it was trained on; pass sam="
                )
            checkpoint = None if sam_checkpoint is None else str(sam_checkpoint)
            sam = SamSettings(model_type, checkpoint)
        predictor.checkpoint.check_sam(sam.model_type, AnnotationError)
        amg = amg or predictor.checkpoint.metadata.mask_settings or AmgSettings()
        predictor.checkpoint.check_precision(amg.precision)
        self.predictor = predictor
        self.sam = sam
        self.amg = amg
        self._engine: PointGridEngine | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        sam: str | None = None,
        sam_checkpoint: str | Path | None = None,
        amg: AmgSettings | None = None,
        inference: InferenceSettings | None = None,
        device: str | torch.device = "auto",
    ) -> Annotator:
        """``sam`` defaults to the model type the head was trained on; ``device``: ``auto``
        runs the head and SAM on CUDA when torch sees a GPU, else on the CPU."""
        return cls(Predictor(load_head(path), inference, device), sam, sam_checkpoint, amg)

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    @property
    def sam_model_type(self) -> str:
        return self.sam.model_type

    @property
    def sam_checkpoint(self) -> str | None:
        return self.sam.checkpoint

    @property
    def engine(self) -> PointGridEngine:
        """SAM, built on first use on the predictor's device (the command extracts through
        its own)."""
        if self._engine is None:
            sam, _ = self.sam.build()
            model = sam.to(self.predictor.device)
            self._engine = build_engine(self.sam.model_type, model, self.amg)
        return self._engine

    def annotate_record(self, record: ImageRecord) -> Prediction:
        """The Predictor's instances of an extracted image that have pixels."""
        return self.predictor(record).with_pixels()

    def __call__(
        self, image: Image.Image | np.ndarray | str | Path, key: str = "image"
    ) -> Prediction:
        """Annotate one image (a PIL image, an HxWx3 uint8 array or a file path): masks,
        labels (indices into ``classes``), scores, ``semantic_map()`` and ``uncertainty()``."""
        if isinstance(image, str | Path):
            image = load_rgb(image)
        if isinstance(image, Image.Image):
            image = np.asarray(to_rgb(image))
        record = self.engine.generate(np.ascontiguousarray(image)).to_record(key)
        return self.annotate_record(record)
