"""The estimators of accuracy without labels and the EM prior re-estimation, on values worked
out by hand and on synthetic data whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import softmax

from budgetlora.reporting.estimate import em_priors, estimate_accuracy, fit_temperature, point_estimates


def _calibrated(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): perfectly calibrated at temperature 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, k))
    probs = softmax(logits, axis=1)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return logits, labels


def test_the_fitted_temperature_undoes_a_scaling_of_calibrated_logits() -> None:
    logits, labels = _calibrated(20_000, 4, seed=0)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)
    assert fit_temperature(3.0 * logits, labels) == pytest.approx(3.0, rel=0.05)  # overconfident x3
    assert fit_temperature(0.5 * logits, labels) == pytest.approx(0.5, rel=0.05)


def test_point_estimates_by_hand() -> None:
    # Validation: 4 rows, 3 right (accuracy 0.75); logits (x, 0) for 2 classes at temperature 1.
    val = np.array([[4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    labels = np.array([0, 0, 0, 1])
    target = np.array([[4.0, 0.0], [0.5, 0.0], [0.2, 0.0], [0.1, 0.0]])
    got = point_estimates(val, labels, target)
    assert got["validation"] == 0.75
    t = got["temperature"]
    # The NLL's minimum: the derivative of the mean NLL in 1/T is zero there.
    nll = lambda temp: -np.mean(np.log(softmax(val / temp, axis=1)[np.arange(4), labels]))  # noqa: E731
    assert nll(t) <= min(nll(t * 0.98), nll(t * 1.02))
    top = lambda x, temp: softmax(x / temp, axis=1).max(axis=1)  # noqa: E731
    assert got["average_confidence"] == pytest.approx(top(target, t).mean())
    # DoC: 0.75 minus the drop of the raw mean confidence.
    assert got["doc"] == pytest.approx(0.75 - (top(val, 1).mean() - top(target, 1).mean()))
    # ATC: the threshold leaves 3 of the 4 validation rows (their accuracy) above it, so it lies
    # between the margins 1 and 2 (with 2 classes the entropy falls as the margin grows); of the
    # target rows only the one with margin 4 is above it.
    assert got["atc"] == 0.25


def test_each_estimator_finds_the_accuracy_of_an_unshifted_set_and_its_interval_holds_it() -> None:
    val_logits, val_labels = _calibrated(3_000, 4, seed=1)
    target_logits, target_labels = _calibrated(3_000, 4, seed=2)
    truth = float((target_logits.argmax(1) == target_labels).mean())
    result = estimate_accuracy(val_logits, val_labels, target_logits, resamples=100)
    assert result["n_validation"] == 3_000 and result["n_target"] == 3_000
    for name, e in result["estimates"].items():
        assert abs(e["estimate"] - truth) < 0.03, (name, e, truth)
        assert e["low"] <= e["estimate"] <= e["high"] and e["high"] - e["low"] < 0.08, (name, e)


def test_confidence_estimators_follow_a_calibrated_drop_that_validation_misses() -> None:
    val_logits, val_labels = _calibrated(3_000, 4, seed=1)
    target_logits = _calibrated(3_000, 4, seed=2)[0] * 0.6  # flatter: a harder set, still calibrated
    rng = np.random.default_rng(3)
    target_labels = np.array([rng.choice(4, p=p) for p in softmax(target_logits, axis=1)])
    truth = float((target_logits.argmax(1) == target_labels).mean())
    estimates = point_estimates(val_logits, val_labels, target_logits)
    assert estimates["validation"] - truth > 0.1  # the shift is real
    # The average confidence and DoC follow it; ATC, which counts rows above a confidence
    # threshold, assumes the shift leaves that relation alone and is not asked to here.
    assert abs(estimates["average_confidence"] - truth) < 0.03
    assert abs(estimates["doc"] - truth) < 0.03


def test_em_recovers_a_shifted_prior_from_calibrated_posteriors() -> None:
    # Two classes, x ~ N(+1, 1) or N(-1, 1); under equal training priors P(y=0 | x) = sigmoid(2x).
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.2).astype(int)  # target prior 80/20
    x = rng.normal(np.where(y == 0, 1.0, -1.0), 1.0)
    p0 = 1 / (1 + np.exp(-2 * x))
    prior, adjusted = em_priors(np.c_[p0, 1 - p0], np.array([0.5, 0.5]))
    assert prior == pytest.approx([0.8, 0.2], abs=0.02)
    assert adjusted.sum(axis=1) == pytest.approx(np.ones(len(x)))
    # Bayes with the estimated prior: each posterior's odds scale by prior[0] / prior[1] (from 1).
    expected = 1 / (1 + (1 - p0) / p0 * prior[1] / prior[0])
    assert adjusted[:, 0] == pytest.approx(expected, abs=1e-6)
    assert (adjusted.argmax(1) == y).mean() > ((np.c_[p0, 1 - p0]).argmax(1) == y).mean()


def test_em_keeps_the_training_prior_where_the_posteriors_already_average_to_it() -> None:
    probs = np.array([[0.9, 0.1], [0.1, 0.9]])
    prior, adjusted = em_priors(probs, np.array([0.5, 0.5]))
    assert prior == pytest.approx([0.5, 0.5])
    assert adjusted == pytest.approx(probs)
    assert math.isclose(float(prior.sum()), 1.0)


def test_class_doc_follows_a_shift_of_the_class_shares() -> None:
    # A Bayes-optimal model under equal training priors: x ~ N(mean of its class, 1) in 2 dimensions,
    # logits = log-likelihoods. Classes 0 and 1 lie close (hard), 2 and 3 far (easy).
    means = np.array([[0.0, 0.0], [1.2, 0.0], [6.0, 6.0], [-6.0, 6.0]])
    rng = np.random.default_rng(0)

    def draw(n: int, prior: list[float]) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(4, size=n, p=prior)
        x = means[y] + rng.normal(size=(n, 2))
        return -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1), y

    val_logits, val_labels = draw(4_000, [0.25] * 4)
    target_logits, target_labels = draw(4_000, [0.55, 0.15, 0.15, 0.15])  # the hard class grows
    truth = float((target_logits.argmax(1) == target_labels).mean())
    got = point_estimates(val_logits, val_labels, target_logits, np.full(4, 0.25))
    assert got["validation"] - truth > 0.05  # validation misses the drop
    assert abs(got["class_doc"] - truth) < 0.015
