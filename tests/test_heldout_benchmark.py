"""benchmarks/heldout.py end to end on the tiny model: K stratified folds of the real AG News rows,
budgetlora's defaults through the real CLI on each, every row held out once, results that resume,
and the pooled table."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from budgetlora.config import TrainSettings
from commands import run_benchmark
from conftest import AG_NEWS_SAMPLE, requires_shared

pytestmark = [requires_shared]
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_last_of_five_folds_is_the_quality_benchmarks_test_set() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from heldout import folds
    from quality import split_rows

    lines, parts = folds(5)
    assert sorted(len(part) for part in parts) == [1120] * 5
    assert sorted(row for part in parts for row in part) == list(range(len(lines)))  # each row once
    assert parts[4] == split_rows()[1]["test"]


@pytest.mark.slow
def test_two_folds_hold_out_every_row_once_and_pool(tiny_model_dir: Path, tmp_path: Path) -> None:
    results, work = tmp_path / "results", tmp_path / "work"
    common = [
        "--model",
        str(tiny_model_dir),
        "--folds",
        "2",
        "--workdir",
        str(work),
        "--results",
        str(results),
    ]
    common += ["--name", "short", "--flag=--max-steps", "--flag=2"]
    first = run_benchmark("heldout.py", *common)
    assert first.returncode == 0, first.stderr[-2000:]

    # The folds: the release's own lines, each held out once, stratified (700 per class each).
    original = AG_NEWS_SAMPLE.read_text(encoding="utf-8").splitlines()
    folds = [work / "folds2" / f"fold{i}" for i in range(2)]
    held_out = [(f / "test.csv").read_text(encoding="utf-8").splitlines() for f in folds]
    assert sorted(held_out[0] + held_out[1]) == sorted(original)
    for i, fold in enumerate(folds):
        assert Counter(line.split(",", 1)[0] for line in held_out[i]) == {f'"{c}"': 700 for c in "1234"}
        assert (fold / "train.csv").read_text(encoding="utf-8").splitlines() == held_out[1 - i]

    records = [
        json.loads((results / f"heldout_{tiny_model_dir.name}" / f"short-fold{i}.json").read_text())
        for i in range(2)
    ]
    for i, record in enumerate(records):
        assert record["status"] == "ok" and record["fold"] == i and record["test_rows"] == 2800
        # budgetlora's defaults held 5% of the fold's training rows out for validation.
        assert record["train_rows"] == 2800 - 140 and record["steps"] == 2
        assert record["config"]["data"]["source"].endswith(f"fold{i}")
        assert record["config"]["train"]["epochs"] == TrainSettings().epochs  # nothing else was passed
        assert record["command"].startswith(
            f"budgetlora train --model MODEL --data FOLD{i} --output RUNS/short-fold{i}"
        )

        # A label for every held-out row, in test.csv's order: they score what training recorded.
        labels = [int(line.split(",", 1)[0].strip('"')) - 1 for line in held_out[i]]
        predictions = [int(c) for c in record["test_predictions"]]
        assert len(predictions) == 2800
        assert record["test_correct"] == sum(p == y for p, y in zip(predictions, labels, strict=True))

    pooled = sum(r["test_correct"] for r in records) / 5600
    table = (results / f"heldout_{tiny_model_dir.name}.md").read_text()
    assert f"| short | 2 of 2 | 5,600 | **{pooled * 100:.2f}%** |" in table

    # A second call skips what is there, and gives a result recorded without test predictions
    # the predictions of its run, which is still there.
    path = results / f"heldout_{tiny_model_dir.name}" / "short-fold1.json"
    path.write_text(json.dumps({k: v for k, v in records[1].items() if k != "test_predictions"}))
    again = run_benchmark("heldout.py", *common, "--fold", "1")
    assert again.returncode == 0 and "short fold 1: already in" in again.stdout
    assert json.loads(path.read_text())["test_predictions"] == records[1]["test_predictions"]

    # The defaults on fold 0 only: "short" is compared with them on that fold's rows.
    defaults = run_benchmark("heldout.py", *common[:-4], "--fold", "0", "--flag=--max-steps", "--flag=1")
    assert defaults.returncode == 0, defaults.stderr[-2000:]
    reference = json.loads((results / f"heldout_{tiny_model_dir.name}" / "defaults-fold0.json").read_text())
    labels = [int(line.split(",", 1)[0].strip('"')) - 1 for line in held_out[0]]
    labels_1 = [int(line.split(",", 1)[0].strip('"')) - 1 for line in held_out[1]]
    mine, theirs = records[0]["test_predictions"], reference["test_predictions"]
    only_mine = sum(a == str(y) != b for a, b, y in zip(mine, theirs, labels, strict=True))
    only_theirs = sum(b == str(y) != a for a, b, y in zip(mine, theirs, labels, strict=True))
    assert only_mine - only_theirs == records[0]["test_correct"] - reference["test_correct"]
    table = (results / f"heldout_{tiny_model_dir.name}.md").read_text()
    delta = (only_mine - only_theirs) / 2800 * 100
    assert f"| {delta:+.2f} ({only_mine}/{only_theirs}, p=" in table and " on fold 0 |" in table
    assert "| defaults | 1 of 2 | 2,800 |" in table and "| (reference) |" in table

    # The bag of words, on every row of both folds, and against the defaults on fold 0's rows.
    sys.path.insert(0, str(BENCHMARKS))
    from heldout import bag_of_words

    baseline = bag_of_words(2)
    words = baseline[0]["test_predictions"] + baseline[1]["test_predictions"]
    right = sum(p == str(y) for p, y in zip(words, labels + labels_1, strict=True))
    fold0 = baseline[0]["test_predictions"]
    only_mine = sum(a == str(y) != b for a, b, y in zip(theirs, fold0, labels, strict=True))
    only_words = sum(b == str(y) != a for a, b, y in zip(theirs, fold0, labels, strict=True))
    assert f"(K = 2): **{right / 5600 * 100:.2f}%** held out over all 5,600 rows." in table
    delta = (only_mine - only_words) / 2800 * 100
    assert f"The defaults minus it: {delta:+.2f} ({only_mine}/{only_words}, p=" in table

    # Another encoder (a copy of the tiny model under another name) on the same fold: each
    # model's table compares its defaults with the other's on those rows.
    other = tmp_path / "tiny-other"
    shutil.copytree(tiny_model_dir, other)
    second = run_benchmark(
        "heldout.py",
        *("--model", str(other), "--folds", "2", "--workdir", str(tmp_path / "work-other")),
        *("--results", str(results), "--fold", "0", "--flag=--max-steps", "--flag=2"),
    )
    assert second.returncode == 0, second.stderr[-2000:]
    rebuilt = run_benchmark(
        "heldout.py", "--model", str(tiny_model_dir), "--folds", "2", "--results", str(results), "--table"
    )
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert "## The defaults against another encoder's" in rebuilt.stdout
    assert "| tiny-other | " in rebuilt.stdout and " on fold 0 |" in rebuilt.stdout.split("tiny-other")[1]


def test_a_fold_out_of_range_is_refused(tmp_path: Path) -> None:
    out = run_benchmark("heldout.py", "--folds", "3", "--fold", "3", "--results", str(tmp_path))
    assert out.returncode == 2 and "--fold 3: folds are 0..2" in out.stderr
    assert not any(tmp_path.iterdir())


def test_a_bag_of_words_learns_the_topics_from_the_other_folds_only() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from heldout import bag_of_words, fold_labels

    baseline = bag_of_words(2)
    assert [(r["folds"], r["fold"]) for r in baseline] == [(2, 0), (2, 1)]
    for record in baseline:
        labels = fold_labels(2, record["fold"])
        predictions = [int(c) for c in record["test_predictions"]]
        assert len(predictions) == len(labels) == 2800
        # Real topics from real words: far above the 25% of chance, and below the 96% it scores
        # on a fold when that fold is among its training rows.
        accuracy = sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)
        assert 0.8 < accuracy < 0.93
        assert Counter(predictions).keys() == {0, 1, 2, 3}


def test_the_variants_vote_row_by_row() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from heldout import fold_labels, together

    labels = [fold_labels(2, i) for i in range(2)]
    truth = "".join(str(y) for fold in labels for y in fold)
    wrong = {c: str((int(c) + 1) % 4) for c in "0123"}

    def variant(name: str, misses: range, budget: int = 1_000_000, trainable: int = 1_000) -> list[dict]:
        """A variant that gets every row right but those in ``misses`` (over both folds, in order)."""
        text = "".join(wrong[c] if n in misses else c for n, c in enumerate(truth))
        folds = [text[:2800], text[2800:]]
        return [
            {"name": name, "folds": 2, "fold": i, "status": "ok", "test_predictions": folds[i]}
            | {"trainable": trainable, "config": {"budget": budget}}
            for i in range(2)
        ]

    named = {"defaults": variant("defaults", range(0, 600)), "a": variant("a", range(500, 1000))}
    assert together(named) is None  # two variants: no majority to speak of
    named["b"] = variant("b", range(900, 1300))
    named["over"] = variant("over", range(0, 5600), trainable=2_000_000)  # over the budget: left out
    named["half"] = variant("half", range(0, 0))[:1]  # one fold of two: left out
    combined = together(named)
    assert combined is not None
    names, voted, anyone = combined
    assert names == ["b", "a", "defaults"]  # 400, 500 and 600 rows wrong
    # Rows 500-599 and 900-999 are wrong in two variants, each the same wrong label: the vote loses them.
    assert voted == (5600 - 200) / 5600 and anyone == 1.0
    # Three different labels on a row: the most accurate variant's wins.
    named["b"] = variant("b", range(0, 0))
    named["a"] = [
        r | {"test_predictions": r["test_predictions"].translate(str.maketrans("0123", "2301"))}
        for r in named["a"]
    ]  # every row wrong, and wrong otherwise than the defaults
    assert together(named) == (["b", "defaults", "a"], 1.0, 1.0)
