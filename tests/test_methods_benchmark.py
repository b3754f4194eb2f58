"""benchmarks/methods.py end to end on the tiny model: two methods through the real CLI, one at its
own learning rate, results that resume, and the table assembled from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from budgetlora.config import load_config
from budgetlora.model.budget import measure
from commands import run_benchmark
from conftest import requires_shared

pytestmark = [requires_shared, pytest.mark.slow]


def test_two_methods_under_one_budget_resume_and_tabulate(tiny_model_dir: Path, tmp_path: Path) -> None:
    results, work = tmp_path / "results", tmp_path / "work"
    common = ["--model", str(tiny_model_dir), "--budgets", "5000", "--methods", "lora,ia3"]
    common += ["--max-train-samples", "64", "--work", str(work), "--results", str(results)]
    first = run_benchmark("methods.py", *common, "--lr-for", "ia3=1e-2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("+ ") and "benchmarks/methods.py" in first.stdout.splitlines()[0]

    folder = results / f"methods_{tiny_model_dir.name}"
    records = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert set(records) == {"5000-lora", "5000-ia3-lr0.01"}  # a rate other than 2e-3 names its file
    for name, record in records.items():
        assert record["status"] == "ok", record
        cfg = load_config(work / "runs" / name / "config.yaml")
        assert cfg.model.method == record["method"] and cfg.train.lr == record["lr"]
        assert cfg.model.head == "linear" and cfg.budget == 5000
        counted = measure(cfg.model, cfg.data.label_names or (), cfg.budget)
        assert record["trainable"] == counted.trainable <= 5000
        assert 0 <= record["test_accuracy"] <= 1 and record["test_rows"] == 1120
    assert records["5000-ia3-lr0.01"]["lr"] == 0.01 and records["5000-lora"]["lr"] == 0.002
    assert records["5000-ia3-lr0.01"]["size"] is None and records["5000-lora"]["size"] >= 1

    table = (results / f"methods_{tiny_model_dir.name}.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 5,000 |")]
    assert (
        len(rows) == 2
        and any("| ia3 | 0.01 |" in r for r in rows)
        and any("| lora | 0.002 |" in r for r in rows)
    )

    # A second run finds both results and trains nothing; a bad --lr-for stops before any work.
    written = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    again = run_benchmark("methods.py", *common, "--lr-for", "ia3=1e-2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} == written
    assert not any(line.startswith("+ budgetlora train") for line in again.stdout.splitlines())
    bad = run_benchmark("methods.py", *common, "--lr-for", "ia3")
    assert bad.returncode == 2 and "--lr-for 'ia3'" in bad.stderr
