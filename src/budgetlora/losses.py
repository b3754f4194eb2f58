"""Training losses as pure functions: tensors in, a scalar tensor out.

``batch`` is the number of samples and ``labels`` the number of classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015):
    ``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    student_logits: (batch, labels); teacher_logits: (batch, labels), no gradient flows
    into them; labels: (batch,) int64 class indices. The cross-entropy uses
    ``label_smoothing``; the KL divergence is summed over classes and averaged over the
    batch ("batchmean", the true KL per sample). The T² factor keeps the soft term's
    gradient on the scale of the hard term's as T changes. Returns a float32 scalar.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    student = student_logits.float()  # (batch, labels); float32 even under bf16 autocast
    hard = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return hard
    teacher = teacher_logits.detach().float()
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft
