"""What a head checkpoint says about its head, written and read only here.

A head means something only with the mask tokens and mask settings it was trained on:
``usam.eval`` and ``usam.annotate`` make masks the same way, refuse another SAM's tokens
and masks of another precision (``amg.precision``), and say when the training data make
its numbers no results. The teacher and student modules store a :class:`HeadMetadata` as
``checkpoint["usam"]``; :meth:`from_checkpoint` also reads the layout of checkpoints
written before it (no ``format_version``: a ``random_weights`` flag and the mask settings
as a plain dict), and those written before heads could be fine-tuned (no ``review``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from usam.core.config import ConfigError
from usam.core.errors import UsageError
from usam.core.provenance import Provenance
from usam.sam.amg_settings import AmgSettings, AmgSettingsError

FORMAT_VERSION = 2
# what a checkpoint of the first layout says when its flag is set: it named no reason
LEGACY_REASON = "synthetic embeddings or untrained models (a checkpoint that names no reason)"


class MaskPrecisionError(UsageError, ValueError):
    """Masks of another precision (``amg.precision``) than a head was trained on."""


@dataclass(frozen=True)
class HeadMetadata:
    classes: tuple[str, ...]
    input_view: str
    stage: str  # the module class that wrote it: TeacherModule, StudentModule or FineTuneModule
    sam_model_type: str | None = None  # whose mask tokens the head reads
    sam_backend: str | None = None  # that model's backend, as its shard manifests name it
    mask_settings: AmgSettings | None = None  # the amg of its training shards
    provenance: Provenance = field(default_factory=Provenance)  # of its training shards
    review: dict[str, Any] | None = None  # a fine-tuned head's Review.identity(); else None

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain values only, so checkpoints load with ``weights_only=True``."""
        return {
            "format_version": FORMAT_VERSION,
            "classes": list(self.classes),
            "input_view": self.input_view,
            "stage": self.stage,
            "sam_model_type": self.sam_model_type,
            "sam_backend": self.sam_backend,
            "amg": None if self.mask_settings is None else dataclasses.asdict(self.mask_settings),
            "not_meaningful_because": list(self.provenance.reasons),
            "review": None if self.review is None else dict(self.review),
        }

    @classmethod
    def from_checkpoint(
        cls, meta: Mapping[str, Any], where: str, error: type[Exception]
    ) -> HeadMetadata:
        """``where`` names the file in ``error``'s message when ``meta`` cannot be read."""
        try:
            if "format_version" in meta:
                reasons = meta["not_meaningful_because"]
            else:
                reasons = [LEGACY_REASON] if meta["random_weights"] else []
            amg = meta.get("amg")
            return cls(
                classes=tuple(meta["classes"]),
                input_view=meta["input_view"],
                stage=meta["stage"],
                sam_model_type=meta["sam_model_type"],
                sam_backend=meta.get("sam_backend"),
                mask_settings=None if not amg else AmgSettings.recorded(amg),
                provenance=Provenance.of(reasons),
                review=meta.get("review"),
            )
        except (KeyError, TypeError, ConfigError, AmgSettingsError) as reason:
            raise error(
                f"{where} holds usam head metadata this version cannot read ({reason}); "
                "retrain the head with `python -m usam.fit`"
            ) from reason

    def check_sam(self, sam: str, where: str, error: type[Exception]) -> None:
        """Mask tokens of another SAM than the head was trained on mean nothing to it."""
        if self.sam_model_type and sam != self.sam_model_type:
            raise error(
                f"{where} was trained on {self.sam_model_type} mask tokens but sam={sam}; "
                f"run with sam={self.sam_model_type} (and that model's checkpoint)"
            )

    @property
    def mask_precision(self) -> str | None:
        """``amg.precision`` of its training masks; None where it records no mask settings."""
        return None if self.mask_settings is None else self.mask_settings.precision

    def check_precision(self, precision: str, where: str) -> None:
        """bf16 masks and tokens are not fp32's (``benchmarks/bf16_agreement.py``): a head
        is given masks of the precision it was trained on, never the other."""
        if self.mask_precision not in (None, precision):
            raise MaskPrecisionError(
                f"{where} was trained on amg.precision={self.mask_precision} masks but "
                f"amg.precision={precision}; run with amg.precision={self.mask_precision} "
                f"(leaving amg unset uses the head's settings) or retrain it on {precision} shards"
            )
