"""Accuracy on unlabelled texts estimated from a model's confidences, and class priors
re-estimated on them: pure functions of logits (and labels where there are any).

Every estimator is fitted on labelled validation rows and applied to the logits of the
unlabelled target rows:

- ``average_confidence``: the mean top-class probability on the target rows after
  temperature scaling (the temperature that minimises the validation NLL).
- ``doc``: difference of confidences (Guillory et al. 2021): validation accuracy minus the
  drop of the mean top-class probability (uncalibrated) from validation to target.
- ``atc``: average thresholded confidence (Garg et al. 2022), with the negative entropy of
  the calibrated probabilities as the score: the threshold leaves as many validation rows
  above it as validation gets right; the estimate is the share of target rows above it.
- ``class_doc``: DoC class by class, for a shift of the class shares too: the target's class
  priors re-estimated by EM (:func:`em_priors`), each class's validation recall less the drop
  of its mean calibrated confidence (target rows weighted by their EM posterior of the class),
  summed over the classes with the re-estimated priors as weights.

:func:`estimate_accuracy` gives each with a bootstrap interval (validation and target rows
resampled together). :func:`em_priors` re-estimates the class priors of the target rows
by expectation-maximisation (Saerens et al. 2002) and adjusts their probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

__all__ = [
    "ESTIMATORS",
    "fit_temperature",
    "point_estimates",
    "estimate_accuracy",
    "em_priors",
]

ESTIMATORS = ("average_confidence", "doc", "atc", "class_doc")
"""The estimators, in the order the report lists them."""


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the mean NLL of ``softmax(logits / T)``.

    logits: (n, k); labels: (n,) class indices. T is searched over [0.05, 20] (log scale).
    """
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / math.exp(log_t), axis=1)[rows, labels].mean())

    found = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(found.x))


def _negative_entropy(probs: np.ndarray) -> np.ndarray:
    """(n,) the sum of p log p of each row (0 for a one-hot row, -log k for a uniform one)."""
    return np.sum(probs * np.log(np.clip(probs, 1e-12, 1.0)), axis=1)


def _class_doc(
    val_probs: np.ndarray, val_labels: np.ndarray, target_probs: np.ndarray, train_prior: np.ndarray
) -> float:
    """``class_doc`` (see the module docstring) from calibrated probabilities."""
    k = val_probs.shape[1]
    prior, posterior = em_priors(target_probs, train_prior)
    val_conf, target_conf = val_probs.max(axis=1), target_probs.max(axis=1)
    val_right = val_probs.argmax(axis=1) == val_labels
    estimate = 0.0
    for c in range(k):
        rows = val_labels == c
        if not rows.any() or posterior[:, c].sum() == 0:
            continue
        drop = val_conf[rows].mean() - np.average(target_conf, weights=posterior[:, c])
        estimate += prior[c] * (val_right[rows].mean() - drop)
    return float(np.clip(estimate, 0.0, 1.0))


def point_estimates(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    target_logits: np.ndarray,
    train_prior: np.ndarray | None = None,
) -> dict[str, float]:
    """Validation accuracy, the fitted temperature, and each estimator's accuracy on the target rows.

    val_logits: (n, k), val_labels: (n,), target_logits: (m, k); train_prior: (k,) the class
    shares the model was trained on (default: the validation rows').
    """
    val_logits = np.asarray(val_logits, dtype=np.float64)
    target_logits = np.asarray(target_logits, dtype=np.float64)
    correct = val_logits.argmax(axis=1) == val_labels
    accuracy = float(correct.mean())
    temperature = fit_temperature(val_logits, val_labels)
    val_calibrated = softmax(val_logits / temperature, axis=1)
    target_calibrated = softmax(target_logits / temperature, axis=1)
    # DoC compares the model's own confidences (uncalibrated): a drop in confidence is a drop in accuracy.
    raw_drop = (
        softmax(val_logits, axis=1).max(axis=1).mean() - softmax(target_logits, axis=1).max(axis=1).mean()
    )
    val_score, target_score = _negative_entropy(val_calibrated), _negative_entropy(target_calibrated)
    # The threshold under which (1 - accuracy) of the validation rows fall.
    threshold = np.quantile(val_score, 1.0 - accuracy) if 0.0 < accuracy < 1.0 else val_score.min()
    k = val_logits.shape[1]
    if train_prior is None:
        train_prior = np.bincount(val_labels, minlength=k) / len(val_labels)
    return {
        "validation": accuracy,
        "temperature": temperature,
        "average_confidence": float(target_calibrated.max(axis=1).mean()),
        "doc": float(np.clip(accuracy - raw_drop, 0.0, 1.0)),
        "atc": float((target_score >= threshold).mean()),
        "class_doc": _class_doc(val_calibrated, val_labels, target_calibrated, np.asarray(train_prior)),
    }


def estimate_accuracy(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    target_logits: np.ndarray,
    train_prior: np.ndarray | None = None,
    *,
    resamples: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`point_estimates` with a 95% bootstrap interval for each estimator.

    Returns {"validation": acc, "temperature": T, "n_validation": n, "n_target": m,
    "estimates": {name: {"estimate", "low", "high"}}}.
    """
    val_labels = np.asarray(val_labels)
    point = point_estimates(val_logits, val_labels, target_logits, train_prior)
    rng = np.random.default_rng(seed)
    n, m = len(val_labels), len(target_logits)
    draws: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for _ in range(resamples):
        val_rows, target_rows = rng.integers(0, n, n), rng.integers(0, m, m)
        again = point_estimates(
            val_logits[val_rows], val_labels[val_rows], target_logits[target_rows], train_prior
        )
        for name in ESTIMATORS:
            draws[name].append(again[name])
    return {
        "validation": point["validation"],
        "temperature": point["temperature"],
        "n_validation": n,
        "n_target": m,
        "estimates": {
            name: {
                "estimate": point[name],
                "low": float(np.quantile(draws[name], 0.025)),
                "high": float(np.quantile(draws[name], 0.975)),
            }
            for name in ESTIMATORS
        },
    }


def em_priors(
    probs: np.ndarray, train_prior: np.ndarray, *, max_iterations: int = 1000, tolerance: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """The target rows' class priors and their adjusted probabilities (Saerens et al. 2002).

    probs: (m, k) calibrated class probabilities of the target rows under the training
    priors; train_prior: (k,) class shares of the training rows. Iterates: reweight each
    row's probabilities by (target prior / training prior) and renormalise; the new target
    prior is their mean. Returns (prior (k,), adjusted probabilities (m, k)).
    """
    probs = np.asarray(probs, dtype=np.float64)
    train_prior = np.asarray(train_prior, dtype=np.float64)
    prior = train_prior.copy()
    adjusted = probs
    for _ in range(max_iterations):
        weighted = probs * (prior / train_prior)
        adjusted = weighted / weighted.sum(axis=1, keepdims=True)
        new_prior = adjusted.mean(axis=0)
        converged = np.abs(new_prior - prior).max() < tolerance
        prior = new_prior
        if converged:
            break
    return prior, adjusted
