from __future__ import annotations

import math

import pytest
import torch

from usam.train.head import MaskClassifierHead, input_dim, select_input_view
from usam.train.losses import (
    mil_image_scores,
    mil_loss,
    normalised_entropy,
    select_bad_masks,
    top_k_counts,
    uncertainty_loss,
)


def test_top_k_as_count_or_fraction():
    counts = torch.tensor([1, 5, 10])
    assert top_k_counts(counts, 3).tolist() == [1, 3, 3]
    assert top_k_counts(counts, 0.25).tolist() == [1, 2, 3]  # ceil(0.25 N), at least 1
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"model\.teacher\.top_k"):
            top_k_counts(counts, bad)


def test_mil_loss_matches_a_hand_computed_example():
    # one image, 3 real masks + 1 padding row, background + 2 classes
    logits = torch.tensor(
        [
            [
                [0.0, 2.0, -1.0],
                [1.0, 0.0, 3.0],
                [4.0, 1.0, 0.0],
                [99.0, 99.0, 99.0],  # padding: must be ignored
            ]
        ]
    )
    valid = torch.tensor([[True, True, True, False]])
    labels = torch.tensor([[1.0, 0.0]])
    # k = 2: per output, mean of the two largest real logits
    scores = mil_image_scores(logits, valid, top_k=2)
    expected_scores = torch.tensor([[(4 + 1) / 2, (2 + 1) / 2, (3 + 0) / 2]])
    torch.testing.assert_close(scores, expected_scores)
    # target: background + class 1, normalised -> [0.5, 0.5, 0]
    s = [2.5, 1.5, 1.5]
    log_z = math.log(sum(math.exp(v) for v in s))
    expected = -(0.5 * (s[0] - log_z) + 0.5 * (s[1] - log_z))
    assert mil_loss(logits, valid, labels, top_k=2).item() == pytest.approx(expected, rel=1e-6)
    # without background in the label the whole mass is on class 1
    no_background = mil_loss(logits, valid, labels, top_k=2, background_in_label=False)
    assert no_background.item() == pytest.approx(-(s[1] - log_z), rel=1e-6)


def test_mil_loss_averages_images_with_their_own_k():
    logits = torch.randn(2, 5, 4)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    labels = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    batched = mil_loss(logits, valid, labels, top_k=0.5)
    alone = [
        mil_loss(
            logits[i : i + 1, : int(valid[i].sum())],
            valid[i : i + 1, : int(valid[i].sum())],
            labels[i : i + 1],
            top_k=0.5,
        )
        for i in range(2)
    ]
    assert batched.item() == pytest.approx(sum(a.item() for a in alone) / 2, rel=1e-6)


def confident(index: int, outputs: int = 4, margin: float = 10.0) -> list[float]:
    row = [0.0] * outputs
    row[index] = margin
    return row


def test_bad_masks_are_exactly_the_uncertain_and_the_confidently_wrong():
    # outputs: background, cat, dog, car; the image is labelled {cat}
    teacher = torch.tensor(
        [
            [
                confident(1),  # confident cat: allowed
                confident(0),  # confident background: allowed
                confident(3),  # confident car on a cat image: confidently wrong
                [0.0, 0.0, 0.0, 0.0],  # uniform: uncertain
                [1.0, 0.0, 3.0, 0.0],  # leaning dog: normalised entropy 0.485
                confident(2),  # confident dog, but padding: never selected
            ]
        ]
    )
    valid = torch.tensor([[True, True, True, True, True, False]])
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    uncertain, wrong = select_bad_masks(teacher, valid, labels, entropy_threshold=0.4)
    assert uncertain.tolist() == [[False, False, False, True, True, False]]
    assert wrong.tolist() == [[False, False, True, False, False, False]]
    uncertain, wrong = select_bad_masks(teacher, valid, labels, entropy_threshold=0.6)
    assert uncertain.tolist() == [[False, False, False, True, False, False]]
    assert wrong.tolist() == [[False, False, True, False, True, False]]  # now confident enough: dog


def test_uncertainty_loss_targets():
    teacher = torch.tensor([[confident(3), [0.0, 0.0, 0.0, 0.0], confident(1)]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    student = torch.randn(1, 3, 4)
    log_p = student.log_softmax(-1)
    loss, bad = uncertainty_loss(student, teacher, valid, labels, 0.5, "background")
    assert bad.tolist() == [[True, True, False]]
    assert loss.item() == pytest.approx(-(log_p[0, 0, 0] + log_p[0, 1, 0]).item() / 2, rel=1e-5)
    loss, _ = uncertainty_loss(student, teacher, valid, labels, 0.5, "label_restricted")
    # restricted to {background, cat}: mask 0 (car-confident) -> renormalised, mask 1 -> 50/50
    q0 = teacher[0, 0].softmax(-1)[[0, 1]]
    q0 = q0 / q0.sum()
    expected = -(q0[0] * log_p[0, 0, 0] + q0[1] * log_p[0, 0, 1])
    expected = expected - 0.5 * (log_p[0, 1, 0] + log_p[0, 1, 1])
    assert loss.item() == pytest.approx(expected.item() / 2, rel=1e-5)
    with pytest.raises(ValueError, match="uncertainty_target"):
        uncertainty_loss(student, teacher, valid, labels, 0.5, "entropy")


def test_label_restricted_target_survives_a_teacher_sure_of_a_class_not_there():
    """All of the teacher's mass on a class the image lacks: p restricted to the allowed
    outputs sums to 0 in float32; the target is still their renormalised distribution."""
    teacher = torch.tensor([[[-60.0, -50.0, -40.0, 60.0]]])  # car, on a cat image
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    assert (teacher.softmax(-1)[0, 0, :2] == 0).all()  # what a plain renormalisation divides by
    student = torch.zeros(1, 1, 4, requires_grad=True)
    loss, bad = uncertainty_loss(student, teacher, torch.ones(1, 1, dtype=torch.bool), labels, 0.5)
    assert bad.tolist() == [[True]] and torch.isfinite(loss)
    q = torch.tensor([-60.0, -50.0]).softmax(-1)  # background, cat
    assert loss.item() == pytest.approx(-(q * math.log(0.25)).sum().item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 0, 3] > 0


def test_the_papers_literal_incorrect_set_counts_confident_background():
    teacher = torch.tensor([[confident(0), confident(1), confident(3)]])  # bg, cat, car
    valid = torch.ones(1, 3, dtype=torch.bool)
    labels = torch.tensor([[1.0, 0.0, 0.0]])  # a cat image
    _, ours = select_bad_masks(teacher, valid, labels, 0.5)
    _, literal = select_bad_masks(teacher, valid, labels, 0.5, "labels")
    assert ours.tolist() == [[False, False, True]]
    assert literal.tolist() == [[True, False, True]]  # y_hat != y: background is not the label
    with pytest.raises(ValueError, match="model.student.correct_outputs"):
        select_bad_masks(teacher, valid, labels, 0.5, "everything")


def test_no_bad_masks_gives_zero_loss():
    teacher = torch.tensor([[confident(1), confident(0)]])
    loss, bad = uncertainty_loss(
        torch.randn(1, 2, 4),
        teacher,
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([[1.0, 0.0, 0.0]]),
        0.5,
    )
    assert not bad.any() and loss.item() == 0.0


def test_normalised_entropy_bounds():
    assert normalised_entropy(torch.full((5,), 0.2)).item() == pytest.approx(1.0)
    assert normalised_entropy(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_input_views_pick_the_right_token():
    embeddings = torch.arange(2 * 3 * 8, dtype=torch.float16).reshape(2, 3, 8)  # 4 tokens of 2
    multimask = torch.tensor([[0, 1, 2], [2, 2, 0]])
    own = select_input_view(embeddings, multimask, "mask_token")
    assert own.shape == (2, 3, 2) and own.dtype == torch.float32
    for b in range(2):
        for n in range(3):
            token = int(multimask[b, n]) + 1
            assert (
                own[b, n].tolist() == embeddings[b, n, 2 * token : 2 * token + 2].float().tolist()
            )
    assert select_input_view(embeddings, multimask, "tokens").shape == (2, 3, 8)
    own_first = select_input_view(embeddings, multimask, "own_first")
    assert own_first.shape == (2, 3, 10)
    assert torch.equal(own_first[..., :2], own)
    assert torch.equal(own_first[..., 2:], embeddings.float())
    assert input_dim("mask_token", 1024) == 256 and input_dim("tokens", 1024) == 1024
    assert input_dim("own_first", 1024) == 1280
    with pytest.raises(ValueError, match="model.input_view='cls'"):
        select_input_view(embeddings, multimask, "cls")
    with pytest.raises(ValueError, match="model.input_view"):
        input_dim("cls", 1024)


def test_head_has_four_linear_layers_of_the_configured_widths():
    head = MaskClassifierHead(1024, 21, hidden_dims=(64, 32, 16))
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (1024, 64),
        (64, 32),
        (32, 16),
        (16, 21),
    ]
    with pytest.raises(ValueError, match="must list 3 widths"):
        MaskClassifierHead(1024, 21, hidden_dims=(64, 32))
