"""The U-SAM training objectives on padded per-image mask sets.

Shapes: logits (B, N, C+1) with index 0 = background; ``valid`` (B, N) marks real
masks (images have different mask counts); ``labels`` (B, C) multi-hot over the
user's classes. Formulas are written out in ``docs/method.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from usam.core.config import ConfigError

UNCERTAINTY_TARGETS = ("label_restricted", "background")
# Which teacher predictions count as correct when picking confidently wrong masks:
# the image's labels or background (ours), or the labels alone (the paper's "y_hat != y").
CORRECT_OUTPUTS = ("labels_and_background", "labels")


def check_top_k(top_k: float) -> float:
    if top_k >= 1 and top_k != int(top_k):
        raise ConfigError(
            f"model.teacher.top_k={top_k}: use an integer count >= 1 or a fraction in (0, 1)"
        )
    if top_k <= 0:
        raise ConfigError(f"model.teacher.top_k={top_k} must be positive")
    return top_k


def check_uncertainty_target(target: str) -> str:
    if target not in UNCERTAINTY_TARGETS:
        raise ConfigError(
            f"model.student.uncertainty_target={target!r} is not one of {UNCERTAINTY_TARGETS}"
        )
    return target


def check_correct_outputs(correct_outputs: str) -> str:
    if correct_outputs not in CORRECT_OUTPUTS:
        raise ConfigError(
            f"model.student.correct_outputs={correct_outputs!r} is not one of {CORRECT_OUTPUTS}"
        )
    return correct_outputs


def top_k_counts(num_valid: torch.Tensor, top_k: float) -> torch.Tensor:
    """k per image: an integer >= 1 is a count (capped at N); a value in (0, 1) a fraction of N."""
    if check_top_k(top_k) >= 1:
        k = num_valid.clamp(max=int(top_k))
    else:
        k = torch.ceil(num_valid.float() * top_k).long()
    if bool((num_valid < 1).any()):
        raise ValueError("an image without masks reached the MIL loss; drop such images first")
    return k.clamp(min=1)


def mil_image_scores(logits: torch.Tensor, valid: torch.Tensor, top_k: float) -> torch.Tensor:
    """Per image and class, the mean of that class's top-k mask logits (Eq. 1). (B, C+1)."""
    k = top_k_counts(valid.sum(1), top_k)
    k_max = int(k.max())
    masked = logits.masked_fill(~valid[..., None], float("-inf"))
    top = masked.topk(k_max, dim=1).values  # (B, k_max, C+1), sorted descending
    in_top_k = torch.arange(k_max, device=logits.device)[None, :, None] < k[:, None, None]
    return top.masked_fill(~in_top_k, 0.0).sum(1) / k[:, None].to(logits.dtype)


def label_distribution(labels: torch.Tensor, background_in_label: bool) -> torch.Tensor:
    """Normalised multi-hot target over C+1 outputs (Eq. 2); background optionally present."""
    background = torch.full_like(labels[:, :1], 1.0 if background_in_label else 0.0)
    target = torch.cat([background, labels.float()], dim=1)
    return target / target.sum(1, keepdim=True).clamp(min=1e-12)


def mil_loss(
    logits: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
    top_k: float,
    background_in_label: bool = True,
) -> torch.Tensor:
    """Cross-entropy between softmax of the top-k image scores and the normalised label."""
    scores = mil_image_scores(logits, valid, top_k)
    target = label_distribution(labels, background_in_label)
    return -(target * F.log_softmax(scores, dim=1)).sum(1).mean()


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy divided by log(#outputs), so thresholds live in [0, 1] for any class count."""
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    return entropy / math.log(probs.shape[-1])


def allowed_outputs(labels: torch.Tensor, background: bool = True) -> torch.Tensor:
    """(B, C+1) bool: the image's labelled classes, plus background unless told otherwise."""
    background_column = torch.full_like(labels[:, :1], background, dtype=torch.bool)
    return torch.cat([background_column, labels.bool()], dim=1)


def select_bad_masks(
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
    entropy_threshold: float,
    correct_outputs: str = "labels_and_background",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks the teacher is uncertain about, and masks it is confidently wrong about.

    Returns (uncertain, confidently_wrong), each (B, N) bool and disjoint.
    """
    probs = teacher_logits.softmax(-1)
    uncertain = (normalised_entropy(probs) > entropy_threshold) & valid
    predicted = probs.argmax(-1)
    background_is_correct = check_correct_outputs(correct_outputs) == "labels_and_background"
    contradicts_label = ~allowed_outputs(labels, background_is_correct).gather(1, predicted)
    confidently_wrong = contradicts_label & ~uncertain & valid
    return uncertain, confidently_wrong


def uncertainty_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
    entropy_threshold: float,
    target: str = "label_restricted",
    correct_outputs: str = "labels_and_background",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 as implemented here: cross-entropy on the bad masks only. Returns (loss, bad).

    ``label_restricted``: the teacher's distribution restricted to the image's labels
    plus background, renormalised. ``background``: the bad masks are pushed to
    background. The loss is averaged over bad masks (0 when there are none).

    The restricted distribution is the softmax of the teacher's logits over the allowed
    outputs alone: equal to renormalising p, without dividing by a sum of probabilities
    that underflows to 0 when the teacher puts all its mass outside them.
    """
    uncertain, confidently_wrong = select_bad_masks(
        teacher_logits, valid, labels, entropy_threshold, correct_outputs
    )
    bad = uncertain | confidently_wrong
    if check_uncertainty_target(target) == "label_restricted":
        allowed = allowed_outputs(labels)[:, None, :]
        soft_target = teacher_logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    else:  # background
        soft_target = F.one_hot(
            torch.zeros_like(valid, dtype=torch.long), student_logits.shape[-1]
        ).to(student_logits.dtype)
    per_mask = -(soft_target * F.log_softmax(student_logits, dim=-1)).sum(-1)
    loss = (per_mask * bad).sum() / bad.sum().clamp(min=1)
    return loss, bad
