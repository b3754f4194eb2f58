"""benchmarks/quality.py end to end on the tiny model: its split of the real AG News rows, two arms
through the real CLI, results that resume, and the table assembled from them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from budgetlora.budget import measure
from budgetlora.config import config_from_dict
from conftest import AG_NEWS_SAMPLE, requires_shared

REPO = Path(__file__).resolve().parents[1]
pytestmark = [requires_shared, pytest.mark.slow]


def run_quality(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)


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
    first = run_quality(*common, "--arm", "defaults", "--arm", "preset:adam-r4-lora-only")
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
        # The recorded count is the skeleton's count of the config the run wrote.
        assert (
            record["trainable"]
            == measure(cfg.model, ("World", "Sports", "Business", "Sci/Tech"), cfg.budget).trainable
        )
    adam = config_from_dict(records["preset-adam-r4-lora-only-seed42"]["config"])
    assert (adam.train.optimizer, adam.model.lora.r, adam.model.lora.bias) == (
        "adam",
        4,
        "lora_only",
    )  # the recipe kept

    # A second call skips what is there and rebuilds the same table.
    again = run_quality(*common, "--arm", "defaults")
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


def test_an_unknown_arm_is_refused(tmp_path: Path) -> None:
    out = run_quality("--arm", "no-such-arm", "--workdir", str(tmp_path), "--results", str(tmp_path))
    assert out.returncode != 0
    assert "unknown arm(s) no-such-arm" in out.stderr
