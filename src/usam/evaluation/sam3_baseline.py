"""The SAM 3 baseline: SAM 3 finds each class by its name, with no SAM-1 masks and no head.

``python -m usam.eval baseline=sam3 eval_data=voc_val``

Every class name of the evaluation set goes to SAM 3 (transformers' ``Sam3Model``) as a
text concept prompt, the bare noun phrase ("potted plant", no "a photo of a" template).
SAM 3's own post-processing (``Sam3Processor.post_process_instance_segmentation``) turns
each prompt's queries into instances: score = query probability x the prompt's presence
probability, kept above ``baseline.sam3.score_threshold``, masks cut at ``mask_threshold``.

SAM 3's instances are not the SAM-1 automatic masks of the evaluation shard set, so they
are written as an ``eval`` shard set of their own in the run folder (``sam3_detections/``),
one record per image whose masks are SAM 3's detections. That keeps
:func:`usam.evaluation.scoring.evaluate` the one metrics path, with no second reader of
ground truth, and leaves the detections on disk next to the metrics they gave. Per
detection the record holds:

- ``rles``, ``boxes``: SAM 3's mask and box (XYWH) at image size;
- ``iou_preds``: its score; ``stability``: the prompt's presence probability alone;
- ``embeddings``: a one-hot over the classes, of the class whose prompt found it (so the
  manifest's ``embed_dim`` is the class count);
- ``points``: the box centre (SAM 3 takes no point); ``multimask``: 0 (one mask each).

:class:`Sam3Predictor` reads a record back as the (N, C+1) probability array a head gives:
the detection's score at its class column, 0 elsewhere (background too). usam's threshold,
NMS, semantic map, mIoU, mAP50 and sweep then apply as for the head and SAM+CLIP. The same
object found by two prompts is two detections; class-agnostic NMS keeps the surer one.

Weights: ``baseline.sam3.checkpoint`` (a local folder) or the hub id ``baseline.sam3.model``
(gated: access is requested on the hub page). ``model: tiny`` is a small random SAM 3 built
in code, for tests and the demo; every result from it says so.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usam.core.config import ConfigError
from usam.core.errors import UsageError
from usam.core.progress import progress_bar
from usam.core.provenance import Provenance, untrained
from usam.data.sources import ImageSource, SourceImage
from usam.formats.embedding_shards import ImageRecord, Manifest, ShardSetWriter, encode_mask
from usam.inference.predictor import InferenceSettings, Predictor
from usam.testing.tiny_sam3 import tiny_sam3

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "baseline.sam3.checkpoint"
HUB_URL = "https://huggingface.co/facebook/sam3"
TINY = "tiny"
UNTRAINED = untrained(f"SAM 3 (baseline.sam3.model={TINY})")
MODEL_TYPE = "sam3"  # the manifest's SAM model type: no SAM-1 shard set passes for SAM 3's


class Sam3WeightsError(UsageError, RuntimeError):
    """SAM 3 weights that cannot be found or loaded."""


@dataclass(frozen=True)
class Sam3Settings:
    """``baseline.sam3``: which SAM 3, and SAM 3's own post-processing thresholds."""

    model: str = "facebook/sam3"
    checkpoint: str | None = None
    score_threshold: float = 0.3
    mask_threshold: float = 0.5
    prompts_per_batch: int = 8

    def check(self) -> None:
        for key in ("score_threshold", "mask_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"baseline.sam3.{key}={getattr(self, key)} must be in [0, 1]")
        if self.prompts_per_batch < 1:
            raise ConfigError(
                f"baseline.sam3.prompts_per_batch={self.prompts_per_batch} must be at least 1"
            )


@dataclass
class Sam3Checkpoint:
    """What ``evaluate`` reads from a head checkpoint, for SAM 3 (which brings its own masks)."""

    classes: list[str]
    provenance: Provenance
    sam_model_type: str = MODEL_TYPE


@dataclass
class Sam3:
    model: torch.nn.Module
    processor: Any  # transformers' Sam3Processor: image resizing, tokenizer, post-processing
    weights: str  # the folder or hub id it was loaded from, or "tiny"
    random_weights: bool


def load_sam3(
    settings: Sam3Settings,
    classes: Sequence[str],
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Sam3:
    """SAM 3 from ``settings.checkpoint``, else the hub id ``settings.model``; with
    ``model: tiny`` and no checkpoint a random one whose tokenizer knows ``classes``' words."""
    if settings.checkpoint is None and settings.model == TINY:
        model, processor = tiny_sam3(classes, seed)
        return Sam3(model.to(device), processor, TINY, random_weights=True)
    from transformers import Sam3Model, Sam3Processor  # optional: only the baseline needs it

    weights = settings.model
    if settings.checkpoint is not None:
        folder = Path(settings.checkpoint).expanduser()
        if not folder.is_dir():
            raise Sam3WeightsError(
                f"{CHECKPOINT_KEY}={settings.checkpoint} is not a folder; set it to a folder "
                f"saved by save_pretrained or a downloaded snapshot of {HUB_URL}"
            )
        weights = str(folder)
    try:
        processor = Sam3Processor.from_pretrained(weights)
        model = Sam3Model.from_pretrained(weights)
    except (OSError, ValueError) as error:
        cause = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
        raise Sam3WeightsError(
            f"SAM 3 weights {weights!r} could not be loaded ({cause}). SAM 3 is gated: request "
            f"access at {HUB_URL} (accept the licence there, then `hf auth login`), or set "
            f"{CHECKPOINT_KEY}=/path/to/sam3, a local folder with its files"
        ) from error
    return Sam3(model.to(device).eval(), processor, weights, random_weights=False)


class Sam3Detector:
    """SAM 3 prompted with every class name on one image at a time; the class names' text
    features are computed once and the image's features once per image."""

    def __init__(
        self,
        sam3: Sam3,
        classes: Sequence[str],
        settings: Sam3Settings,
        device: str | torch.device = "cpu",
    ) -> None:
        self.sam3 = sam3
        self.classes = list(classes)
        self.settings = settings
        self.device = torch.device(device)
        prompts = sam3.processor(text=self.classes, return_tensors="pt").to(self.device)
        self.text_mask = prompts["attention_mask"]
        with torch.no_grad():
            self.text = sam3.model.get_text_features(
                input_ids=prompts["input_ids"], attention_mask=self.text_mask
            ).pooler_output

    @torch.no_grad()
    def __call__(self, item: SourceImage) -> ImageRecord:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        image = item.image
        pixels = self.sam3.processor(images=image, return_tensors="pt")["pixel_values"]
        vision = self.sam3.model.get_vision_features(pixel_values=pixels.to(self.device))
        masks, boxes, scores, presence, labels = [], [], [], [], []
        for start in range(0, len(self.classes), self.settings.prompts_per_batch):
            prompts = slice(start, start + self.settings.prompts_per_batch)
            count = len(self.classes[prompts])
            outputs = self.sam3.model(
                vision_embeds=_repeated(vision, count),
                text_embeds=BaseModelOutputWithPooling(pooler_output=self.text[prompts]),
                attention_mask=self.text_mask[prompts],
            )
            found = self.sam3.processor.post_process_instance_segmentation(
                outputs,
                threshold=self.settings.score_threshold,
                mask_threshold=self.settings.mask_threshold,
                target_sizes=[(image.height, image.width)] * count,
            )
            prompt_presence = outputs.presence_logits.sigmoid()[:, 0].cpu().numpy()
            for offset, instances in enumerate(found):
                kept = len(instances["scores"])
                masks.extend(instances["masks"].bool().cpu().numpy())
                boxes.append(instances["boxes"].float().cpu().numpy().reshape(kept, 4))
                scores.append(instances["scores"].float().cpu().numpy())
                presence.append(np.full(kept, prompt_presence[offset], np.float32))
                labels.append(np.full(kept, start + offset, np.int64))
        return detection_record(
            item,
            masks,
            np.concatenate(boxes),
            np.concatenate(scores),
            np.concatenate(presence),
            np.concatenate(labels),
            len(self.classes),
        )


def _repeated(vision: Any, count: int) -> Any:
    """One image's features for ``count`` prompts: SAM 3 pairs image i with prompt i."""
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    def expand(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(t.expand(count, *t.shape[1:]) for t in tensors)

    return Sam3VisionEncoderOutput(
        fpn_hidden_states=expand(vision.fpn_hidden_states),
        fpn_position_encoding=expand(vision.fpn_position_encoding),
    )


def detection_record(
    item: SourceImage,
    masks: Sequence[np.ndarray],
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    presence: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
) -> ImageRecord:
    """One image's SAM 3 detections as a shard record, its fields as the module docstring says."""
    x0, y0, x1, y1 = boxes_xyxy.T
    boxes = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    return ImageRecord(
        key=item.key,
        height=item.image.height,
        width=item.image.width,
        embeddings=np.eye(num_classes, dtype=np.float16)[labels],
        iou_preds=scores.astype(np.float32),
        stability=presence.astype(np.float32),
        boxes=boxes.astype(np.float32),
        points=np.stack([(x0 + x1) / 2, (y0 + y1) / 2], axis=1).astype(np.float32),
        multimask=np.zeros(len(labels), np.int8),
        rles=[encode_mask(mask)["counts"] for mask in masks],
        ground_truth=item.ground_truth,
        source=item.source,
    )


def write_detections(
    detector: Sam3Detector,
    source: ImageSource,
    directory: str | Path,
    config: dict[str, Any],
) -> Path:
    """SAM 3's detections on every image of ``source`` as an eval shard set in ``directory``
    (replaced if a previous run left one there)."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    manifest = Manifest(
        classes=list(source.classes),
        embed_dim=len(source.classes),
        kind="eval",
        sam={
            "model_type": MODEL_TYPE,
            "weights": detector.sam3.weights,
            "random_weights": detector.sam3.random_weights,
        },
        config=config,
    )
    with ShardSetWriter(directory, manifest) as writer, progress_bar() as bar:
        task = bar.add_task("SAM 3", total=len(source))
        for item in source:
            writer.write(detector(item))
            bar.advance(task)
    for path, reason in source.rejected:
        log.warning("skipped %s: %s", path, reason)
    return directory


class Sam3Predictor(Predictor):
    """A Predictor whose masks are SAM 3's detections and whose probabilities their scores.

    NMS and the rest are inherited unchanged.
    """

    def __init__(
        self,
        classes: Sequence[str],
        random_weights: bool,
        settings: InferenceSettings | None = None,
    ) -> None:  # no super().__init__: there is no head to load
        random = Provenance((UNTRAINED,)) if random_weights else Provenance()
        self.checkpoint = Sam3Checkpoint(list(classes), random)
        self.settings = settings or InferenceSettings()
        self.device = torch.device("cpu")

    def mask_probabilities(self, record: ImageRecord) -> np.ndarray:
        """(N, C+1): each detection's score at its class column, 0 elsewhere."""
        probs = np.zeros((record.num_masks, len(self.classes) + 1), dtype=np.float32)
        probs[:, 1:] = record.embeddings.astype(np.float32) * record.iou_preds[:, None]
        return probs


def sam3_baseline(
    settings: Sam3Settings,
    source: ImageSource,
    inference: InferenceSettings,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
) -> tuple[Sam3Predictor, Path]:
    """SAM 3 run over ``source`` (weights checked first), its detections written under
    ``out_dir``; returns the predictor and the shard set that ``evaluate`` scores."""
    sam3 = load_sam3(settings, source.classes, device)
    detector = Sam3Detector(sam3, source.classes, settings, device)
    config = {"baseline": {"sam3": asdict(settings)}}
    shards = write_detections(detector, source, Path(out_dir) / "sam3_detections", config)
    return Sam3Predictor(source.classes, sam3.random_weights, inference), shards
