"""Classification metrics: arrays in, plain Python numbers (JSON-ready) out.

``n`` is the number of samples and ``k`` the number of classes. Labels and predictions
are class indices in ``0..k-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import log_softmax
from scipy.special import softmax as _scipy_softmax
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from budgetlora.errors import BudgetloraError

__all__ = ["classification_metrics", "softmax", "mean_cross_entropy", "score"]


def _as_logits(logits: Any) -> np.ndarray:
    # float64 so half-precision logits from the model do not overflow in exp/log.
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"logits must have shape (n, k), got shape {array.shape}")
    return array


def _as_labels(name: str, values: Any, num_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must have shape (n,), got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise BudgetloraError(
            f"{name} contain class index {int(bad[0])}, but there are {num_classes} classes "
            f"(valid indices 0..{num_classes - 1})"
        )
    return array


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise class probabilities, stable for large logits.

    logits: (n, k). Returns float64 (n, k); every row sums to 1.
    """
    return np.asarray(_scipy_softmax(_as_logits(logits), axis=1))


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class, natural log (what the training loss is).

    logits: (n, k) unnormalised scores; labels: (n,) class indices. Returns a float >= 0.
    Computed from log-softmax, not from clipped probabilities, so a confidently wrong
    prediction costs its true (large) value.
    """
    scores = _as_logits(logits)
    targets = _as_labels("labels", labels, scores.shape[1])
    if targets.shape[0] != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} rows of logits but {targets.shape[0]} labels")
    if targets.size == 0:
        raise BudgetloraError("cannot compute a loss over 0 samples")
    log_probs = log_softmax(scores, axis=1)  # (n, k)
    return float(-log_probs[np.arange(targets.size), targets].mean())


def classification_metrics(labels: np.ndarray, preds: np.ndarray, label_names: Sequence[str]) -> dict:
    """Accuracy, precision/recall/F1 (per class, macro, weighted), confusion matrix.

    labels, preds: (n,) class indices in ``0..k-1``, ``k = len(label_names)``.

    ``per_class``, ``confusion_matrix`` (rows = true class, columns = predicted class) and
    ``predicted_distribution`` cover all ``k`` classes, also those absent from both arrays.
    Macro averages follow scikit-learn's default and average over the classes present in
    ``labels`` or ``preds``: a class the split does not contain and the model never
    predicts would otherwise count as F1 = 0. Weighted averages weight by support, so
    absent classes do not matter there. Undefined ratios (no predictions, no support)
    are 0.
    """
    names = [str(name) for name in label_names]
    k = len(names)
    if k == 0:
        raise ValueError("label_names is empty")
    if len(set(names)) != k:
        raise ValueError(f"label_names has duplicates: {names}")
    y_true = _as_labels("labels", labels, k)
    y_pred = _as_labels("predictions", preds, k)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} labels but {y_pred.size} predictions")
    if y_true.size == 0:
        raise BudgetloraError("cannot compute metrics over 0 samples")

    all_classes = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=all_classes, average=None, zero_division=0
    )
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        averages[average] = (float(p), float(r), float(f))
    matrix = confusion_matrix(y_true, y_pred, labels=all_classes)  # (k, k)
    predicted_counts = np.bincount(y_pred, minlength=k)  # (k,)

    return {
        "n": int(y_true.size),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": averages["macro"][0],
        "macro_recall": averages["macro"][1],
        "macro_f1": averages["macro"][2],
        "weighted_precision": averages["weighted"][0],
        "weighted_recall": averages["weighted"][1],
        "weighted_f1": averages["weighted"][2],
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": matrix.astype(int).tolist(),
        "label_names": names,
        "predicted_distribution": {name: int(predicted_counts[i]) for i, name in enumerate(names)},
    }


def score(logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
    """:func:`classification_metrics` of the arg-max of ``logits`` (n, k), plus their mean
    cross-entropy as ``loss``."""
    metrics = classification_metrics(labels, np.asarray(logits).argmax(axis=1), label_names)
    metrics["loss"] = mean_cross_entropy(logits, labels)
    return metrics


def lower_is_better(metric: str) -> bool:
    """True for the loss; accuracy and macro-F1 are better higher."""
    return metric == "loss"


def as_score(metric: str, value: float) -> float:
    """A validation ``metric``'s value as a score where higher is better: the loss negated."""
    return -float(value) if lower_is_better(metric) else float(value)
