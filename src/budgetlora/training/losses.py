"""Every training loss: pure functions of tensors, and the :data:`LossFn` forms that the
training loop calls with a batch's logits and the batch.

``batch`` is the number of samples and ``labels`` the number of classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LossFn", "cross_entropy_loss", "distillation_loss", "distillation_loss_fn"]

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
"""(logits (batch, labels), the batch: labels, index, ...) -> a scalar loss."""


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=label_smoothing)

    return loss


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


def distillation_loss_fn(
    train_logits: np.ndarray, alpha: float, temperature: float, label_smoothing: float = 0.0
) -> LossFn:
    """A :data:`LossFn` that looks up each sample's teacher logits by its
    ``batch["index"]`` (its row in ``Splits.train``). train_logits: (n_train, labels)."""
    table = torch.from_numpy(np.ascontiguousarray(train_logits, dtype=np.float32))

    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal table
        if table.device != logits.device:
            table = table.to(logits.device)
        teacher = table[batch["index"].to(logits.device)]  # (batch, labels)
        return distillation_loss(logits, teacher, batch["labels"], alpha, temperature, label_smoothing)

    return loss
