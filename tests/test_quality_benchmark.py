"""benchmarks/quality.py end to end on the tiny model: its split of the real AG News rows, two arms
through the real CLI, results that resume, and the table assembled from them."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from budgetlora.config import config_from_dict
from budgetlora.model.budget import measure
from commands import run_benchmark
from conftest import AG_NEWS_SAMPLE, requires_shared

REPO = Path(__file__).resolve().parents[1]
pytestmark = [requires_shared, pytest.mark.slow]


def test_two_arms_on_one_split_resume_and_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    results, work = tmp_path / "results", tmp_path / "work"
    common = [
        "--model",
        str(tiny_model_dir),
        "--epochs",
        "0.02",
        "--workdir",
        str(work),
        "--results",
        str(results),
    ]
    first = run_benchmark("quality.py", *common, "--arm", "defaults", "--arm", "preset:adam-r4-lora-only")
    assert first.returncode == 0, first.stderr[-2000:]

    # The split: the release's own lines, disjoint, stratified 980 / 140 / 280 per class.
    original = AG_NEWS_SAMPLE.read_text(encoding="utf-8").splitlines()
    splits = {
        s: (work / "split" / f"{s}.csv").read_text(encoding="utf-8").splitlines()
        for s in ("train", "validation", "test")
    }
    assert sorted(line for lines in splits.values() for line in lines) == sorted(original)
    for split, per_class in (("train", 980), ("validation", 140), ("test", 280)):
        assert Counter(line.split(",", 1)[0] for line in splits[split]) == {
            f'"{c}"': per_class for c in "1234"
        }

    folder = results / f"quality_{tiny_model_dir.name}"
    records = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert set(records) == {"defaults-seed42", "preset-adam-r4-lora-only-seed42"}
    for record in records.values():
        assert record["status"] == "ok"
        assert record["test_rows"] == 1120 and record["epochs"] == 0.02
        cfg = config_from_dict(record["config"])
        assert cfg.data.source.endswith("split") and cfg.train.epochs == 0.02
        assert cfg.train.best_metric == "accuracy"  # pinned: these arms' results were recorded with it
        # The recorded count is the skeleton's count of the config the run wrote.
        assert (
            record["trainable"]
            == measure(cfg.model, ("World", "Sports", "Business", "Sci/Tech"), cfg.budget).trainable
        )
        # A label for every test row, in test.csv's order: they score what training recorded.
        labels = [int(line.split(",", 1)[0].strip('"')) - 1 for line in splits["test"]]
        predictions = [int(c) for c in record["test_predictions"]]
        assert len(predictions) == 1120
        right = sum(p == y for p, y in zip(predictions, labels, strict=True))
        assert right / 1120 == pytest.approx(record["test_accuracy"], abs=1e-12)
    adam = config_from_dict(records["preset-adam-r4-lora-only-seed42"]["config"])
    assert (adam.train.optimizer, adam.model.lora.r, adam.model.lora.bias) == (
        "adam",
        4,
        "lora_only",
    )  # the recipe kept

    # A second call skips what is there and rebuilds the same table.
    again = run_benchmark("quality.py", *common, "--arm", "defaults")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "defaults seed 42: already in" in again.stdout
    rows = json.loads((results / f"quality_{tiny_model_dir.name}.json").read_text())
    assert {r["arm"] for r in rows} == {"defaults", "preset:adam-r4-lora-only"}
    accuracies = [r["test_accuracy"] for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)  # ranked, best first
    table = (results / f"quality_{tiny_model_dir.name}.md").read_text()
    for row in rows:
        assert f"| {row['arm']} | {row['trainable']:,} |" in table
        assert f"{row['test_accuracy'] * 100:.2f}%" in table
    # The paired comparison with the only preset: its discordant rows make up the accuracy gap.
    (defaults,) = [r for r in rows if r["arm"] == "defaults"]
    (paired,) = defaults["paired_vs"]  # one seed in common
    assert paired["arm"] == "preset:adam-r4-lora-only" and paired["seed"] == 42
    gap = (
        records["defaults-seed42"]["test_accuracy"]
        - records["preset-adam-r4-lora-only-seed42"]["test_accuracy"]
    )
    assert paired["only_this"] - paired["only_preset"] == round(gap * 1120)
    assert f"p={paired['p']:.2f}" in table and "(best preset)" in table


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_rows() -> None:
    from scipy.stats import binomtest

    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality import mcnemar

    rng = np.random.RandomState(0)
    labels = rng.randint(0, 4, size=300).tolist()
    a = "".join(str(y if rng.rand() < 0.9 else (y + 1) % 4) for y in labels)
    b = "".join(str(y if rng.rand() < 0.8 else (y + 2) % 4) for y in labels)
    only_a, only_b, p = mcnemar(a, b, labels)
    right_a = sum(x == str(y) for x, y in zip(a, labels, strict=True))
    right_b = sum(x == str(y) for x, y in zip(b, labels, strict=True))
    assert only_a - only_b == right_a - right_b and only_a > only_b
    assert p == pytest.approx(binomtest(only_a, only_a + only_b).pvalue, rel=1e-9)
    assert mcnemar(a, a, labels)[2] == 1.0


def test_an_unknown_arm_is_refused(tmp_path: Path) -> None:
    out = run_benchmark(
        "quality.py", "--arm", "no-such-arm", "--workdir", str(tmp_path), "--results", str(tmp_path)
    )
    assert out.returncode != 0
    assert "unknown arm(s) no-such-arm" in out.stderr
