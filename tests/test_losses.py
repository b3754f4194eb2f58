"""The distillation loss against values worked out by hand (ln 2 = 0.693147, ln 3 = 1.098612)."""

from __future__ import annotations

import math

import pytest
import torch

from budgetlora.training.losses import distillation_loss

LN3 = math.log(3)


def loss(student: list[list[float]], teacher: list[list[float]], labels: list[int], **kw: float) -> float:
    return distillation_loss(
        torch.tensor(student),
        torch.tensor(teacher),
        torch.tensor(labels),
        **kw,  # type: ignore[arg-type]
    ).item()


def test_temperature_one_mixes_cross_entropy_and_kl() -> None:
    # Student [0, 0] -> q = [1/2, 1/2]; teacher [ln 3, 0] -> p = [3/4, 1/4]; label 0.
    # CE = -ln(1/2) = 0.693147
    # KL(p || q) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.304099 - 0.173287 = 0.130812
    # alpha 0.5, T 1: 0.5 * 0.693147 + 0.5 * 1 * 0.130812 = 0.411980
    assert loss([[0, 0]], [[LN3, 0]], [0], alpha=0.5, temperature=1) == pytest.approx(0.411980, abs=1e-6)


def test_temperature_softens_the_teacher_and_scales_by_t_squared() -> None:
    # T 2: teacher / T = [ln 3 / 2, 0] = [ln sqrt(3), 0] -> p = [sqrt3 / (1 + sqrt3), 1 / (1 + sqrt3)]
    #   = [0.633975, 0.366025]; student / T is still uniform.
    # KL = 0.633975 ln(1.267949) + 0.366025 ln(0.732051) = 0.150518 - 0.114177 = 0.036341
    # T^2 * KL = 4 * 0.036341 = 0.145363
    # alpha 0.25: 0.75 * 0.693147 + 0.25 * 0.145363 = 0.519860 + 0.036341 = 0.556201
    assert loss([[0, 0]], [[LN3, 0]], [0], alpha=0.25, temperature=2) == pytest.approx(0.556201, abs=1e-6)


def test_kl_is_averaged_over_the_batch() -> None:
    # Row 1 as above (KL 0.130812), row 2 student == teacher (KL 0): batchmean = 0.065406.
    # alpha 1 leaves only the soft term; the labels do not matter.
    got = loss([[0, 0], [1, 2]], [[LN3, 0], [1, 2]], [1, 0], alpha=1, temperature=1)
    assert got == pytest.approx(0.065406, abs=1e-6)


def test_alpha_zero_is_cross_entropy_with_label_smoothing() -> None:
    # Student [ln 3, 0] -> q = [3/4, 1/4]; label 0 smoothed by 0.2 over 2 classes -> target [0.9, 0.1].
    # CE = -0.9 ln(3/4) - 0.1 ln(1/4) = 0.258914 + 0.138629 = 0.397543; the teacher is ignored.
    got = loss([[LN3, 0]], [[0, 50]], [0], alpha=0, temperature=3, label_smoothing=0.2)
    assert got == pytest.approx(0.397543, abs=1e-6)


def test_identical_logits_leave_only_the_hard_term() -> None:
    # KL(p || p) = 0, so alpha 0.5 gives half the cross-entropy: 0.5 * ln 2 = 0.346574.
    assert loss([[2, 2]], [[2, 2]], [1], alpha=0.5, temperature=4) == pytest.approx(0.346574, abs=1e-6)


def test_gradient_flows_to_the_student_only() -> None:
    # alpha 1, T 1, batch 1: d KL / d student logits = q - p = [1/2 - 3/4, 1/2 - 1/4] = [-0.25, 0.25].
    student = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.tensor([[LN3, 0.0]], requires_grad=True)
    distillation_loss(student, teacher, torch.tensor([0]), alpha=1.0, temperature=1.0).backward()
    assert student.grad is not None
    torch.testing.assert_close(student.grad, torch.tensor([[-0.25, 0.25]]))
    assert teacher.grad is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5, "temperature": 1.0}, "alpha"),
        ({"alpha": 0.5, "temperature": 0.0}, "temperature"),
    ],
)
def test_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loss([[0, 0]], [[0, 0]], [0], **kwargs)


def test_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        loss([[0, 0]], [[0, 0, 0]], [0], alpha=0.5, temperature=1)
