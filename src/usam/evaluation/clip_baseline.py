"""The SAM+CLIP baseline U-SAM is compared against: CLIP names each SAM mask zero-shot.

``python -m usam.eval baseline=sam_clip eval_data=voc_val sam=vit_h``

Every SAM mask of an evaluation shard set becomes a pooled image, the mask
multiplied into the full image as in the paper (``baseline.clip.view:
masked_image``; ``masked_crop`` also cuts it to the mask's box), which CLIP
scores against "a photo of a {class}" for every class. The softmax over the classes fills the
same (N, C+1) probability array a U-SAM head gives (background column 0), so
the threshold (0.7 in the paper), NMS, semantic map and metrics are the very
ones of :class:`usam.inference.predictor.Predictor` and :func:`usam.evaluation.scoring.evaluate`.

Weights come from ``baseline.clip.checkpoint`` (a local file) or the open_clip
``pretrained`` tag (downloaded when online). With neither, the weights are
random and every result says so.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from usam.core.config import ConfigError
from usam.core.errors import UsageError
from usam.core.provenance import Provenance, untrained
from usam.data.sources import ImageSource
from usam.formats.embedding_shards import ImageRecord, ShardSetError
from usam.inference.predictor import InferenceSettings, Predictor

CHECKPOINT_KEY = "baseline.clip.checkpoint"
VIEWS = ("masked_image", "masked_crop")
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class ClipWeightsError(UsageError, RuntimeError):
    """CLIP weights that cannot be found or loaded."""


@dataclass(frozen=True)
class ClipSettings:
    """``baseline.clip``: which CLIP, what it sees of each mask, and its prompts."""

    model: str = "ViT-B-16"  # an open_clip architecture name
    pretrained: str | None = "openai"  # an open_clip pretrained tag
    checkpoint: str | None = None  # a local file with those weights; before the download
    view: str = "masked_image"
    template: str = "a photo of a {}"
    batch_size: int = 64

    def check(self) -> None:
        check_view(self.view)
        if self.batch_size < 1:
            raise ConfigError(f"baseline.clip.batch_size={self.batch_size} must be at least 1")


@dataclass
class ClipCheckpoint:
    """What ``evaluate`` reads from a head checkpoint, for CLIP (which fits any SAM)."""

    classes: list[str]
    provenance: Provenance
    sam_model_type: str | None = None


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: Any  # PIL image -> (3, S, S) tensor, CLIP's own evaluation transform
    tokenizer: Any
    random_weights: bool


def load_clip(
    model: str,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Clip:
    """An open_clip model from a local ``checkpoint``, a ``pretrained`` tag, or random weights
    drawn from ``seed``.

    The tag also tells how the weights were trained (QuickGELU, normalisation), so
    give it with a local checkpoint of tagged weights.
    """
    import open_clip  # optional: only the baseline needs it

    if model not in open_clip.list_models():
        raise ClipWeightsError(
            f"unknown open_clip model {model!r}; pick one of open_clip.list_models(), "
            "e.g. ViT-B-16 or ViT-L-14"
        )
    tag: dict[str, Any] = {}
    if pretrained:
        tag = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag:
            raise ClipWeightsError(
                f"open_clip has no pretrained tag {pretrained!r} for {model}; its tags are "
                f"{open_clip.list_pretrained_tags_by_model(model)}"
            )
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise ClipWeightsError(f"CLIP checkpoint {checkpoint} does not exist; fix {CHECKPOINT_KEY}")
    weights = str(Path(checkpoint).expanduser()) if checkpoint is not None else pretrained
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random weights are the same every run, as for the tiny SAM
            network, _, preprocess = open_clip.create_model_and_transforms(
                model,
                pretrained=weights,
                device=device,
                force_quick_gelu=bool(tag.get("quick_gelu", False)),
                **{f"image_{key}": tag[key] for key in _PREPROCESS_KEYS if key in tag},
            )
    except (RuntimeError, OSError, ValueError) as error:
        raise ClipWeightsError(
            f"CLIP weights for {model} (pretrained tag {pretrained!r}) could not be loaded: "
            f"{str(error).rstrip('.')}. Offline? Fetch them where there is a network "
            "(open_clip downloads them on first use) and set "
            f"{CHECKPOINT_KEY}=/path/to/open_clip_pytorch_model.bin"
        ) from error
    return Clip(network.eval(), preprocess, open_clip.get_tokenizer(model), weights is None)


def check_view(view: str) -> str:
    if view not in VIEWS:
        raise ConfigError(f"baseline.clip.view={view!r} is not one of {VIEWS}")
    return view


def masked_views(image: np.ndarray, record: ImageRecord, view: str) -> Iterator[Image.Image]:
    """Each mask multiplied into the image: the whole image (``masked_image``) or cut to the
    mask's box (``masked_crop``). Each RLE is decoded once."""
    check_view(view)
    for rle in record.coco_rles():
        mask = mask_utils.decode(rle)[..., None]
        if view == "masked_image":
            yield Image.fromarray(image * mask)
            continue
        x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(rle))
        if w == 0 or h == 0:  # an empty mask: nothing for CLIP to see
            yield Image.new("RGB", (1, 1))
            continue
        yield Image.fromarray(image[y : y + h, x : x + w] * mask[y : y + h, x : x + w])


class ClipPredictor(Predictor):
    """A Predictor whose mask probabilities come from CLIP instead of a trained head.

    It reads each image's pixels from ``source``, the source the shard set was
    extracted from; NMS and the rest are inherited unchanged.
    """

    def __init__(
        self,
        clip: Clip,
        classes: Sequence[str],
        source: ImageSource,
        settings: InferenceSettings | None = None,
        *,
        template: str = "a photo of a {}",
        view: str = "masked_image",
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:  # no super().__init__: there is no head to load
        random = Provenance((untrained("CLIP"),)) if clip.random_weights else Provenance()
        self.checkpoint = ClipCheckpoint(list(classes), random)
        self.settings = settings or InferenceSettings()
        self.device = torch.device(device)
        self.clip = clip
        self.source = source
        self.batch_size = batch_size
        self.view = view
        self._index = {key: i for i, key in enumerate(source.keys)}
        prompts = [template.format(name) for name in classes]
        with torch.no_grad():
            text = clip.model.encode_text(clip.tokenizer(prompts).to(self.device))
        self.text = torch.nn.functional.normalize(text.float(), dim=-1)

    def image_of(self, record: ImageRecord) -> np.ndarray:
        if record.key not in self._index:
            raise ShardSetError(
                f"image {record.key!r} is not in the image source; the baseline needs the images "
                "its shard set was extracted from"
            )
        image = np.asarray(self.source.load(self._index[record.key]).image)
        if image.shape[:2] != (record.height, record.width):
            raise ShardSetError(
                f"image {record.key!r} is {image.shape[1]}x{image.shape[0]} but its masks are "
                f"{record.width}x{record.height}; the shard set is stale, re-extract it"
            )
        return image

    @torch.no_grad()
    def mask_probabilities(self, record: ImageRecord) -> np.ndarray:
        """(N, C+1): column 0 (background) is 0, the rest CLIP's softmax over the classes."""
        probs = np.zeros((record.num_masks, len(self.classes) + 1), dtype=np.float32)
        if not record.num_masks:
            return probs
        images = masked_views(self.image_of(record), record, self.view)
        scale = self.clip.model.logit_scale.exp().float()
        for start in range(0, record.num_masks, self.batch_size):
            batch = [self.clip.preprocess(i) for _, i in zip(range(self.batch_size), images)]
            pixels = torch.stack(batch).to(self.device)
            features = self.clip.model.encode_image(pixels).float()
            logits = scale * torch.nn.functional.normalize(features, dim=-1) @ self.text.T
            probs[start : start + len(batch), 1:] = logits.softmax(-1).cpu().numpy()
        return probs


def clip_predictor(
    clip_settings: ClipSettings,
    source: ImageSource,
    settings: InferenceSettings,
    device: str | torch.device = "cpu",
) -> ClipPredictor:
    """The baseline ``baseline.clip`` describes, over ``source``'s classes."""
    clip = load_clip(
        clip_settings.model, clip_settings.pretrained, clip_settings.checkpoint, device
    )
    return ClipPredictor(
        clip,
        source.classes,
        source,
        settings,
        template=clip_settings.template,
        view=clip_settings.view,
        batch_size=clip_settings.batch_size,
        device=device,
    )
