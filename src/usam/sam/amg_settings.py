"""The automatic mask generator's settings: the ``amg`` config group, with the official defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class AmgSettings:
    """The official generator's settings, with its defaults."""

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
    approximate: bool = False  # faster, close to but not bit-identical with the official output

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError(
                f"points_per_side ({self.points_per_side}) and points_per_batch "
                f"({self.points_per_batch}) must be at least 1"
            )
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1:
            raise ValueError(
                f"crop_n_layers ({self.crop_n_layers}) must be >= 0 and "
                f"crop_n_points_downscale_factor ({self.crop_n_points_downscale_factor}) >= 1"
            )
        if self.min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401
            except ImportError as error:
                raise ValueError(
                    f"min_mask_region_area={self.min_mask_region_area} needs OpenCV, as in the "
                    "official generator: install opencv-python-headless, or set it to 0"
                ) from error

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``SamAutomaticMaskGenerator`` with the same behaviour.

        ``approximate`` is left out: the official generator only has the exact mode.
        """
        kwargs = asdict(self)
        del kwargs["approximate"]
        return kwargs
