"""The automatic mask generator's settings: the ``amg`` config group.

Two readings of SAM's automatic mode (``proposals``): ``filtered`` is the official
generator's output (IoU, stability and box-NMS filters, up to 3 masks per point, N varies
per image); ``one_per_point`` is the U-SAM paper's ("a set of N binary masks for each
image", "N remains constant for all inputs"): every grid point's mask, the one of its
three outputs with the highest predicted IoU, nothing filtered away.

``precision``: ``fp32`` is exact mode, held to the contract of ``usam.sam.mask_engine``;
``bf16`` runs the encoder and decoder under bfloat16 autocast, faster where the hardware
has bf16 matrix units and outside the contract (``benchmarks/bf16_agreement.py`` measures
its masks against fp32's). Heads and shard sets record it, and masks of the two are never
mixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from usam.core.config import settings_from_config
from usam.core.errors import UsageError

PROPOSALS = ("filtered", "one_per_point")
TUNINGS = ("auto", "cpu", "gpu")
PRECISIONS = ("fp32", "bf16")


class AmgSettingsError(UsageError, ValueError):
    """Mask settings that contradict each other or the installed packages."""


@dataclass(frozen=True)
class AmgSettings:
    """The official generator's settings, with its defaults, and which reading of them."""

    proposals: str = "filtered"  # filtered | one_per_point (see the module docstring)
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    # HQ-SAM's output choices (sam=hq_*), with its generator's defaults: the HQ mask alone
    # instead of SAM's best mask plus the HQ mask; SAM's single-mask output instead of its best
    # multimask one. Other backends have neither and refuse other values.
    hq_token_only: bool = False
    multimask_output: bool = True
    precision: str = "fp32"  # fp32 | bf16 (see the module docstring)
    # The device the engine's work is laid out for (usam.sam.mask_engine): gpu decodes and
    # finishes each batch of points_per_batch points at once; cpu decodes one point at a
    # time and runs the ViT encoder's attention in cache-sized pieces; auto: the model's.
    # The masks are the same within the exactness contract.
    tuned_for: str = "auto"

    def __post_init__(self) -> None:
        self._check_proposals()
        if self.tuned_for not in TUNINGS:
            raise AmgSettingsError(
                f"amg.tuned_for={self.tuned_for!r} is not one of {', '.join(TUNINGS)}"
            )
        if self.precision not in PRECISIONS:
            raise AmgSettingsError(
                f"amg.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise AmgSettingsError(
                f"points_per_side ({self.points_per_side}) and points_per_batch "
                f"({self.points_per_batch}) must be at least 1"
            )
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1:
            raise AmgSettingsError(
                f"crop_n_layers ({self.crop_n_layers}) must be >= 0 and "
                f"crop_n_points_downscale_factor ({self.crop_n_points_downscale_factor}) >= 1"
            )
        if self.min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401
            except ImportError as error:
                raise AmgSettingsError(
                    f"min_mask_region_area={self.min_mask_region_area} needs OpenCV, as in the "
                    "official generator: install opencv-python-headless, or set it to 0"
                ) from error

    def _check_proposals(self) -> None:
        """``one_per_point`` keeps N = points_per_side**2 masks: no setting may drop or add any."""
        if self.proposals not in PROPOSALS:
            raise AmgSettingsError(
                f"amg.proposals={self.proposals!r} is not one of {', '.join(PROPOSALS)}"
            )
        if self.proposals == "filtered":
            return
        dropping = {
            "pred_iou_thresh": self.pred_iou_thresh > 0.0,
            "stability_score_thresh": self.stability_score_thresh > 0.0,
            "box_nms_thresh": self.box_nms_thresh < 1.0,
            "crop_n_layers": self.crop_n_layers > 0,
            "min_mask_region_area": self.min_mask_region_area > 0,
        }
        changed = [f"amg.{key}={getattr(self, key)}" for key, drops in dropping.items() if drops]
        if changed:
            raise AmgSettingsError(
                f"amg.proposals=one_per_point keeps every grid point's mask, but "
                f"{', '.join(changed)} would drop or add masks: set pred_iou_thresh, "
                "stability_score_thresh, crop_n_layers and min_mask_region_area to 0 and "
                "box_nms_thresh to 1.0 (amg=paper does), or use amg.proposals=filtered "
                "(amg=official_filtered)"
            )

    @classmethod
    def recorded(cls, values: Mapping[str, Any]) -> AmgSettings:
        """The settings a shard manifest or a head recorded, in this or an earlier usam:
        ``approximate`` (retired; exact mode is the only one) is dropped when false, and
        ``proposals``, absent before the paper's reading, defaults to the filtered one, and
        ``precision``, absent before bf16 existed, to fp32."""
        values = dict(values)
        if values.pop("approximate", False):
            raise AmgSettingsError(
                "these masks were made with amg.approximate=true, a mode usam no longer has: "
                "re-extract the shard set and retrain the head"
            )
        return settings_from_config(cls, values, "amg")

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the official generator: with ``one_per_point`` its filters
        are off (checked above), and picking each point's best mask is left to the caller
        (``PointGridEngine.reference_masks``); HQ-SAM's output choices go to its generator's
        ``generate`` and predictor (``usam.sam.hq_backend``); the official generators run in
        the model's own precision.
        """
        kwargs = asdict(self)
        usam_only = ("proposals", "hq_token_only", "multimask_output", "precision", "tuned_for")
        for engine_only in usam_only:
            del kwargs[engine_only]
        return kwargs
