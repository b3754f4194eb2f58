"""The Python API at the package's top level: one keyword per flag, checked as the CLI checks
them, and results that show themselves in Jupyter (reports with their plots inline)."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

import budgetlora
from budgetlora.cli import build_parser, config_from_args
from budgetlora.config import ConfigError
from budgetlora.errors import BudgetloraError
from conftest import make_rows


def test_keywords_are_the_flags_and_build_the_config_the_cli_builds(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from_python = budgetlora.resolve_config(
        model=str(tiny_model_dir),
        lora_r=2,
        target_modules=("query",),
        epochs=1,
        lr=3e-3,
        dora=True,
        output="x",
    )
    argv = [
        "train", "--model", str(tiny_model_dir), "--lora-r", "2", "--target-modules", "query", "--epochs", "1",
        "--lr", "3e-3", "--dora", "--output", "x",
    ]  # fmt: skip
    assert from_python == config_from_args(build_parser().parse_args(argv))
    with pytest.raises(BudgetloraError, match=r"'lora_rank' \(did you mean lora_r"):
        budgetlora.train(lora_rank=8)
    with pytest.raises(ConfigError, match="train.lr"):
        budgetlora.resolve_config(lr=-1.0)  # the config tree's own check and message
    preset = Path(__file__).resolve().parents[1] / "configs" / "presets" / "starter.yaml"
    assert budgetlora.resolve_config(preset, epochs=7).train.epochs == 7  # a file, then keywords over it


def test_the_functions_at_the_top_are_not_the_modules_that_do_the_work() -> None:
    import budgetlora.inference.predict
    import budgetlora.training.train

    assert (
        budgetlora.train.__module__ == "budgetlora.api" and budgetlora.predict.__module__ == "budgetlora.api"
    )
    from budgetlora.training.train import prepare_run  # the work stays importable from its sub-package

    assert callable(prepare_run)


def test_the_plan_gives_the_keywords_that_train_each_row(tiny_model_dir: Path) -> None:
    table = budgetlora.plan(str(tiny_model_dir), budget=5_000)
    row = table[table["fits"]].iloc[0]
    keywords = dict(pair.split("=") for pair in row["options"].split())
    assert set(keywords) == {"head", "target_modules", "lora_r"}
    cfg = budgetlora.resolve_config(model=str(tiny_model_dir), budget=5_000, **keywords)
    assert (cfg.model.head, cfg.model.lora.target_modules) == (row["head"], tuple(row["targets"].split(",")))
    assert cfg.model.lora.r == row["rank"]


@pytest.mark.slow
def test_a_course_job_from_python(tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path) -> None:
    run = budgetlora.train(
        model=str(tiny_model_dir), data=str(tiny_data_csv), output=str(tmp_path / "run"), epochs=2,
        lr=1e-2, batch_size=16, max_length=32, validation_size=0.2, test_size=0.2, progress=False,
    )  # fmt: skip
    # the default LoRA: r=8 on query, value of 2 layers (2 * 2 * 64 * 8 = 2,048) and the head (1,188)
    assert run.metrics["budget"]["trainable"] == 3_236 and run.config.model.lora.r == 8
    shown = run._repr_markdown_()
    assert (
        shown.startswith("# ") and "data:image/png;base64," in shown and "](learning_curves.png)" not in shown
    )

    table = budgetlora.plan(str(tiny_model_dir), budget=5_000)
    assert isinstance(table, pd.DataFrame) and {"head", "targets", "rank", "trainable"} <= set(table.columns)

    report = budgetlora.evaluate(run, split="test")
    assert (
        report.path == run.path / "eval-test" / "report.md" and "data:image/png;base64," in report.markdown()
    )

    texts = tmp_path / "texts.csv"
    with texts.open("w", newline="") as fh:
        csv.writer(fh).writerows([["text"], *([t] for t, _ in make_rows(40, seed=5))])
    submission = budgetlora.predict(run, texts, output=tmp_path / "submission.csv")
    assert list(submission.columns) == ["ID", "Label"] and len(submission) == 40
    assert submission.attrs["path"] == str(tmp_path / "submission.csv")

    page = budgetlora.shift(run, texts)
    assert page.path == run.path / "shift-texts" / "shift.md"
    assert "expect" in page.markdown() and "data:image/png;base64," in page.markdown()
