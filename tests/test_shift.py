"""The shift report (`budgetlora shift`, and its summary in `budgetlora predict`) on the course's
own hidden test set, and prior correction, with the tiny trained run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from budgetlora.inference.shift import LEAD
from commands import cli, run_cli
from conftest import SHARED, make_rows

COMPETITION = SHARED / "data" / "ag_news" / "competition"
requires_competition = pytest.mark.skipif(
    not (COMPETITION / "test_unlabelled.pkl").is_file(),
    reason="../shared/data/ag_news/competition not present",
)


@requires_competition
def test_predict_on_the_competition_pickle_writes_the_submission_and_the_shift_summary(
    tiny_run, tmp_path: Path
) -> None:
    out = tmp_path / "submission.csv"
    done = run_cli(
        "predict", str(tiny_run.run_dir), str(COMPETITION / "test_unlabelled.pkl"), "--allow-pickle",
        "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["ID"] for r in rows] == [str(i) for i in range(8_000)]
    summary = json.loads(out.with_suffix(".shift.json").read_text())
    assert summary["rows"] == 8_000 and summary["training_rows"] == tiny_run.metrics["data"]["train"]
    # Fixture sentences against real news: the domain classifier tells them apart at once.
    assert summary["domain"]["roc_auc"] > 0.99 and summary["domain"]["unlike_training"] > 0.9
    shares = summary["model"]["predicted_shares"]
    assert list(shares) == list(tiny_run.cfg.data.label_names) and sum(shares.values()) == pytest.approx(1.0)
    for name, e in summary["accuracy"]["estimates"].items():
        assert 0.0 <= e["low"] <= e["estimate"] <= e["high"] <= 1.0, name
    assert summary["accuracy"]["lead"] == LEAD
    assert "expect about" in done.stdout and "ROC AUC" in done.stdout


@requires_competition
def test_shift_writes_its_report_on_the_competition_pickle(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "shift"
    done = run_cli(
        "shift", str(tiny_run.run_dir), str(COMPETITION / "test_unlabelled.pkl"), "--allow-pickle",
        "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "shift.json", "shift.md", "shift_confidence.png", "shift_domain.png", "shift_rows.csv",
    ]  # fmt: skip
    with (out / "shift_rows.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8_000 and rows[0]["ID"] == "0"
    summary = json.loads((out / "shift.json").read_text())
    unlike = np.array([int(r["unlike_training"]) for r in rows])
    assert unlike.mean() == pytest.approx(summary["domain"]["unlike_training"])
    assert sum(int(r["repeated"]) for r in rows) == summary["repeated_rows"] > 0  # the set repeats 84 texts
    page = (out / "shift.md").read_text()
    assert page.startswith("# Shift report") and "](shift_domain.png)" in page and "(lead)" in page
    assert (out / "shift_domain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _csv(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...] = ("text",)) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_shift_finds_no_shift_in_texts_like_the_training_rows(tiny_run, tmp_path: Path) -> None:
    data = _csv(tmp_path / "same.csv", [(t,) for t, _ in make_rows(400, seed=11)])
    done = cli("shift", str(tiny_run.run_dir), str(data), "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "shift.json").read_text())
    assert summary["domain"]["roc_auc"] < 0.65  # the same generator: hard to tell apart
    lead = summary["accuracy"]["estimates"][LEAD]["estimate"]
    assert abs(lead - summary["accuracy"]["validation"]) < 0.1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.csv"], "missing.csv"),
        (["data.pkl"], "--allow-pickle"),
        (["few.csv"], "at least 10"),
        (["data.csv", "--text-column", "body"], "body"),
        (["data.csv", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_input_to_shift_gets_a_clear_error(
    tiny_run, tmp_path: Path, args: list[str], message: str
) -> None:
    _csv(tmp_path / "data.csv", [(t,) for t, _ in make_rows(50, seed=3)])
    _csv(tmp_path / "few.csv", [(t,) for t, _ in make_rows(3, seed=3)])
    (tmp_path / "data.pkl").write_bytes(b"\x80\x04N.")
    path, *rest = args
    done = cli("shift", str(tiny_run.run_dir), str(tmp_path / path), *rest, "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_prior_correction_finds_the_shares_of_an_unbalanced_set(tiny_run, tmp_path: Path) -> None:
    rows = make_rows(800, seed=12)
    kept = [r for r in rows if r[1] == 0][:165] + [r for r in rows if r[1] != 0][:135]  # 55% class 0
    data = _csv(tmp_path / "skewed.csv", [(t,) for t, _ in kept])
    out = tmp_path / "sub.csv"
    out.with_suffix(".shift.json").write_text("{}")  # an earlier submission's report
    done = run_cli(
        "predict",
        str(tiny_run.run_dir),
        str(data),
        "--output",
        str(out),
        "--prior-correction",
        "em",
        "--no-shift",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("class priors re-estimated by EM"))
    world = float(line.split(f"{tiny_run.cfg.data.label_names[0]} ")[1].split("%")[0])
    assert 45 < world < 65
    assert not out.with_suffix(".shift.json").exists()  # --no-shift: the stale report goes too
    with out.with_suffix(".probs.csv").open() as fh:
        probs = [sum(float(v) for k, v in r.items() if k.startswith("p_")) for r in csv.DictReader(fh)]
    assert probs == pytest.approx([1.0] * len(kept), abs=1e-5)
