"""Why a run's numbers are not results: one value, carried from the shard manifest to the head
checkpoint to the evaluation outputs, and every form in which people and dashboards see it.

Untrained weights (SAM, the image generator, CLIP, SAM 3) and synthetic embeddings only
exercise the pipeline. Each reason is worded once, where it arises (a manifest, a baseline),
and travels as a :class:`Provenance`; the console banner, the W&B tag, the
``<stage>/random_weights`` metrics and the fields of ``metrics.json`` and of the head
checkpoint are all made here, so they cannot disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_TAG = "random-weights"  # the W&B tag of a run whose numbers are not results
_RULE = "=" * 78


@dataclass(frozen=True)
class Provenance:
    """The reasons, in the order they arose, each once; no reason: the numbers can be results."""

    reasons: tuple[str, ...] = ()

    @classmethod
    def of(cls, reasons: Iterable[str]) -> Provenance:
        return cls(tuple(dict.fromkeys(reasons)))

    @classmethod
    def merged(cls, parts: Iterable[Provenance]) -> Provenance:
        return cls.of(reason for part in parts for reason in part.reasons)

    def __add__(self, other: Provenance) -> Provenance:
        return Provenance.merged((self, other))

    @property
    def random_weights(self) -> bool:
        return bool(self.reasons)

    def about(self, subject: str) -> Provenance:
        """The same reasons, each saying what it concerns (``evaluation masks: ...``)."""
        return Provenance(tuple(f"{subject}: {reason}" for reason in self.reasons))

    def scalars(self, prefix: str) -> dict[str, float]:
        """``<prefix>/random_weights``: 1 or 0, a metric beside the numbers it qualifies."""
        return {f"{prefix}/random_weights": float(self.random_weights)}

    def tags(self) -> list[str]:
        return [RANDOM_WEIGHTS_TAG] if self.random_weights else []

    def fields(self) -> dict[str, Any]:
        """What ``metrics.json``, annotation files and loggers' hyperparameters record."""
        return {"meaningful": not self.random_weights, "not_meaningful_because": list(self.reasons)}

    def note(self) -> str:
        """A suffix for a one-line summary; empty when the numbers can be results."""
        return f" (RANDOM WEIGHTS: {'; '.join(self.reasons)})" if self.reasons else ""

    def banner(self, consequence: str) -> str:
        """``consequence`` says what the run's outputs are instead (``... NOT results``)."""
        because = f"because of: {'; '.join(self.reasons)}"
        return "\n".join([_RULE, f"RANDOM WEIGHTS: {consequence}", because, _RULE])


def untrained(model: str) -> str:
    """The reason a model with random weights gives, worded the same wherever one is used."""
    return f"an untrained {model}"


def report(provenance: Provenance, consequence: str) -> None:
    """The banner a command shows when its outputs are not results (nothing otherwise), logged
    so that it reaches the console and the run's log file alike."""
    if provenance.random_weights:
        log.warning("\n%s", provenance.banner(consequence))
