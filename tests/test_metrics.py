"""Metrics against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from budgetlora.errors import BudgetloraError
from budgetlora.reporting.metrics import classification_metrics, mean_cross_entropy, softmax

# Three classes, ten samples.
#   true:  a a a a b b b c c c      (support a=4, b=3, c=3)
#   pred:  a a b c b b a c c b
# Confusion matrix (rows true, cols predicted):
#        a  b  c
#   a  [ 2, 1, 1 ]
#   b  [ 1, 2, 0 ]
#   c  [ 0, 1, 2 ]
# Predicted counts (column sums): a=3, b=4, c=3. Correct = 2+2+2 = 6 -> accuracy 0.6.
#   a: P = 2/3, R = 2/4 = 1/2, F1 = 2*(2/3*1/2)/(2/3+1/2) = (2/3)/(7/6) = 4/7
#   b: P = 2/4 = 1/2, R = 2/3, F1 = 4/7
#   c: P = 2/3, R = 2/3, F1 = 2/3
# Macro:    P = (2/3+1/2+2/3)/3 = 11/18,  R = (1/2+2/3+2/3)/3 = 11/18,
#           F1 = (4/7+4/7+2/3)/3 = (38/21)/3 = 38/63
# Weighted: P = (4*2/3 + 3*1/2 + 3*2/3)/10 = (37/6)/10 = 37/60,
#           R = (4*1/2 + 3*2/3 + 3*2/3)/10 = 6/10 (always equals accuracy),
#           F1 = (4*4/7 + 3*4/7 + 3*2/3)/10 = (4 + 2)/10 = 6/10
NAMES = ["a", "b", "c"]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PREDS = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 1])


def test_three_class_example_by_hand() -> None:
    m = classification_metrics(LABELS, PREDS, NAMES)
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_class"]["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1 / 2, "f1": 4 / 7, "support": 4}
    )
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 1 / 2, "recall": 2 / 3, "f1": 4 / 7, "support": 3}
    )
    assert m["per_class"]["c"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert m["macro_precision"] == pytest.approx(11 / 18)
    assert m["macro_recall"] == pytest.approx(11 / 18)
    assert m["macro_f1"] == pytest.approx(38 / 63)
    assert m["weighted_precision"] == pytest.approx(37 / 60)
    assert m["weighted_recall"] == pytest.approx(0.6)
    assert m["weighted_f1"] == pytest.approx(0.6)
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m["label_names"] == NAMES
    assert m["predicted_distribution"] == {"a": 3, "b": 4, "c": 3}


def test_result_is_plain_json() -> None:
    m = classification_metrics(LABELS, PREDS, NAMES)
    assert json.loads(json.dumps(m)) == m
    assert type(m["accuracy"]) is float and type(m["n"]) is int
    assert type(m["confusion_matrix"][0][0]) is int
    assert type(m["per_class"]["a"]["support"]) is int


def test_classes_absent_from_labels_and_predictions() -> None:
    # true: a a b b, pred: a b b b; classes c and d never occur.
    #   a: P = 1/1, R = 1/2, F1 = 2/3;  b: P = 2/3, R = 2/2, F1 = 0.8;  c, d: all 0, support 0.
    # Macro averages over the classes that occur (a, b):
    #   P = (1 + 2/3)/2 = 5/6, R = (1/2 + 1)/2 = 3/4, F1 = (2/3 + 4/5)/2 = 11/15
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b", "c", "d"])
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["d"]["support"] == 0
    assert m["predicted_distribution"] == {"a": 1, "b": 3, "c": 0, "d": 0}
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["macro_precision"] == pytest.approx(5 / 6)
    assert m["macro_recall"] == pytest.approx(3 / 4)
    assert m["macro_f1"] == pytest.approx(11 / 15)
    # Weighted by support 2, 2: same as macro here.
    assert m["weighted_f1"] == pytest.approx(11 / 15)


def test_class_predicted_but_never_true_counts_in_macro() -> None:
    # true: a a b, pred: a c b.  c: P = 0/1, R = 0 (no support), F1 = 0.
    #   a: P = 1, R = 1/2, F1 = 2/3;  b: P = R = F1 = 1.
    # Macro over a, b, c: P = 2/3, R = (1/2 + 1 + 0)/3 = 1/2, F1 = (2/3 + 1 + 0)/3 = 5/9
    m = classification_metrics(np.array([0, 0, 1]), np.array([0, 2, 1]), ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_precision"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx(1 / 2)
    assert m["macro_f1"] == pytest.approx(5 / 9)
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(BudgetloraError, match="class index 3"):
        classification_metrics(np.array([0, 3]), np.array([0, 1]), NAMES)
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        classification_metrics(np.array([0, 1, 2]), np.array([0, 1]), NAMES)
    with pytest.raises(BudgetloraError, match="0 samples"):
        classification_metrics(np.array([], dtype=int), np.array([], dtype=int), NAMES)
    with pytest.raises(ValueError, match="duplicates"):
        classification_metrics(np.array([0]), np.array([0]), ["a", "a"])


def test_softmax_by_hand_and_rows_sum_to_one() -> None:
    # exp(0) : exp(ln 3) = 1 : 3  ->  1/4, 3/4
    probs = softmax(np.array([[0.0, math.log(3.0)], [2.0, 2.0]]))
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.5, 0.5]])
    random = softmax(np.random.default_rng(0).normal(size=(5, 7)))
    np.testing.assert_allclose(random.sum(axis=1), np.ones(5))


def test_softmax_is_stable_for_large_logits() -> None:
    probs = softmax(
        np.array([[1000.0, 1000.0, 1000.0], [-1000.0, 0.0, 1000.0], [1e4, 1e4 + math.log(3.0), -1e4]])
    )
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[0], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(probs[1], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(probs[2], [0.25, 0.75, 0.0])
    # float16 logits (as a half-precision model returns them) do not overflow either.
    np.testing.assert_allclose(softmax(np.array([[60000.0, 60000.0]], dtype=np.float16)), [[0.5, 0.5]])


def test_mean_cross_entropy_by_hand() -> None:
    # Row 1: p(class 1) = 3/4 -> -ln(3/4);  row 2: p(class 0) = 1/2 -> -ln(1/2).
    # Mean = (ln(4/3) + ln 2) / 2 = ln(8/3) / 2 ~= 0.490415
    logits = np.array([[0.0, math.log(3.0)], [0.0, 0.0]])
    assert mean_cross_entropy(logits, np.array([1, 0])) == pytest.approx(math.log(8 / 3) / 2)
    assert mean_cross_entropy(logits, np.array([1, 0])) == pytest.approx(0.4904146, abs=1e-6)


def test_mean_cross_entropy_confidently_wrong_is_not_clipped() -> None:
    # log-softmax of class 1 in [1000, 0] is -1000 - log(1 + e^-1000) = -1000.
    assert mean_cross_entropy(np.array([[1000.0, 0.0]]), np.array([1])) == pytest.approx(1000.0)
    assert mean_cross_entropy(np.array([[1000.0, 0.0]]), np.array([0])) == pytest.approx(0.0, abs=1e-12)


def test_mean_cross_entropy_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="2 rows of logits but 1 labels"):
        mean_cross_entropy(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(BudgetloraError, match="class index 3"):
        mean_cross_entropy(np.zeros((1, 3)), np.array([3]))
