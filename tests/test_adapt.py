"""Adapting to unlabelled texts within the same budget: self-training (real processes, its run
folders), training-time augmentation, and task-adaptive pretraining through the adapter."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from budgetlora.config import AugmentSettings, TaptSettings
from commands import main_exit, run_cli
from conftest import make_rows


def _texts_csv(path: Path, n: int, seed: int) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text"])
        writer.writerows([t] for t, _ in make_rows(n, seed=seed))
    return path


def _tiny_train_args(tiny_model_dir: Path, tiny_data_csv: Path, out: Path) -> list[str]:
    return [
        "train", "--model", str(tiny_model_dir), "--data", str(tiny_data_csv), "--output", str(out),
        "--epochs", "2", "--lr", "1e-2", "--batch-size", "16", "--lora-r", "4", "--max-length", "32",
        "--mixed-precision", "no", "--no-progress",
    ]  # fmt: skip


def test_self_training_runs_its_rounds_in_run_folders_and_reports_them(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    unlabelled = _texts_csv(tmp_path / "unlabelled.csv", 200, seed=21)
    out = tmp_path / "run"
    args = _tiny_train_args(tiny_model_dir, tiny_data_csv, out)
    done = run_cli(
        *args, "--unlabelled", str(unlabelled), "--self-training-rounds", "2", "--self-training-share", "0.5"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rounds_dir = out / "self-training"
    assert sorted(p.name for p in rounds_dir.iterdir()) == ["round-0", "round-1", "rounds.json"]
    assert all((rounds_dir / r / "metrics.json").is_file() for r in ("round-0", "round-1"))
    rounds = json.loads((rounds_dir / "rounds.json").read_text())
    # Round r of 2 takes r/2 of half the 200 rows, as many of each of the 4 classes: 12 each, then 25.
    assert [r["rows"] for r in rounds] == [48, 100]
    assert [set(r["per_class"].values()) for r in rounds] == [{12}, {25}]
    assert rounds[0]["labelled_by"] == str(rounds_dir / "round-0") and rounds[1]["labelled_by"] == str(
        rounds_dir / "round-1"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    plain = json.loads((rounds_dir / "round-0" / "metrics.json").read_text())
    assert metrics["data"]["pseudo_labelled"] == 100
    assert metrics["data"]["train"] == plain["data"]["train"] + 100
    assert metrics["budget"] == plain["budget"]  # the same model: only the rows change
    report = (out / "report.md").read_text()
    assert "## Self-training" in report and "## Shift of the unlabelled texts" in report
    assert (out / "shift" / "shift.md").is_file() and "expect about" in done.stdout
    config = (out / "config.yaml").read_text()
    assert f"unlabelled: {unlabelled}" in config and "rounds: 2" in config


def test_self_training_from_a_finished_run_trains_one_round(
    tiny_run, tiny_data_csv: Path, tmp_path: Path
) -> None:
    unlabelled = _texts_csv(tmp_path / "unlabelled.csv", 120, seed=22)
    out = tmp_path / "run"
    args = _tiny_train_args(Path(tiny_run.cfg.model.name_or_path), tiny_data_csv, out)
    done = run_cli(
        *args, "--unlabelled", str(unlabelled), "--self-training-rounds", "1",
        "--self-training-labeller", str(tiny_run.run_dir), "--no-self-training-balance",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (out / "self-training").iterdir()) == ["rounds.json"]
    (only,) = json.loads((out / "self-training" / "rounds.json").read_text())
    assert only["rows"] == 60 and only["labelled_by"] == str(tiny_run.run_dir)


def test_self_training_needs_unlabelled_texts(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    args = _tiny_train_args(tiny_model_dir, tiny_data_csv, tmp_path / "run")
    code, err = main_exit(*args, "--self-training-rounds", "1")
    assert code == 2 and "self_training.rounds=1 needs unlabelled texts: set data.unlabelled" in err
    code, err = main_exit(*args, "--unlabelled", str(tmp_path / "none.csv"), "--self-training-rounds", "1")
    assert code == 2 and "data.unlabelled" in err and "none.csv" in err
    assert not (tmp_path / "run").exists()


def test_augmentation_alters_the_training_rows_it_says(tiny_config, tmp_path: Path) -> None:
    from budgetlora.data.augment import augment_table
    from budgetlora.data.tables import load_splits
    from budgetlora.training.train import train

    cfg = replace(
        tiny_config(tmp_path / "run", epochs=1), augment=AugmentSettings(lowercase=0.5, word_dropout=0.2)
    )
    result = train(cfg)
    _, expected = augment_table(load_splits(cfg.data).train, cfg.augment, cfg.train.seed)
    assert result.metrics["data"]["augmented"] == expected
    assert (
        0.3 < expected["lowercase"] / result.metrics["data"]["train"] < 0.7 and expected["word_dropout"] > 0
    )
    report = (result.run_dir / "report.md").read_text()
    assert f"{expected['lowercase']:,} were lowercased without punctuation" in report


@pytest.fixture(scope="module")
def tiny_mlm_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny RoBERTa as a masked-LM checkpoint (random weights): it ships an MLM head."""
    from transformers import AutoConfig, AutoTokenizer, RobertaForMaskedLM

    folder = tmp_path_factory.mktemp("tiny-mlm")
    torch.manual_seed(0)
    RobertaForMaskedLM(AutoConfig.from_pretrained(tiny_model_dir)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_tapt_trains_the_adapter_and_nothing_else(tiny_mlm_dir: Path, tiny_config, tmp_path: Path) -> None:
    from budgetlora.model.modeling import build_model, load_tokenizer
    from budgetlora.runtime import make_runtime
    from budgetlora.training.tapt import pretrain

    cfg = tiny_config(tmp_path / "run")
    cfg = replace(
        cfg,
        model=replace(cfg.model, name_or_path=str(tiny_mlm_dir)),
        tapt=TaptSettings(steps=40, mlm_lr=1e-2),
    )
    model = build_model(cfg.model, ("a", "b", "c", "d"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    summary = pretrain(
        model,
        load_tokenizer(str(tiny_mlm_dir)),
        [t for t, _ in make_rows(300, seed=5)],
        cfg,
        make_runtime("no"),
    )
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)  # LoRA's B starts at zero: it learned
    assert summary["steps"] == 40 and summary["last_loss"] < summary["first_loss"]
    assert not any("lm_head" in name for name, _ in model.named_parameters())


def test_a_run_with_tapt_records_it_within_the_same_budget(
    tiny_mlm_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    done = run_cli(*_tiny_train_args(tiny_mlm_dir, tiny_data_csv, out), "--tapt-steps", "10")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tapt"]["steps"] == 10 and np.isfinite(metrics["tapt"]["last_loss"])
    assert metrics["budget"]["trainable"] == json.loads((out / "budget.json").read_text())["trainable"]
    assert "tapt: 10 masked-LM steps" in done.stdout
    assert (
        "## Task-adaptive pretraining\n\n10 masked-LM steps through the adapter"
        in (out / "report.md").read_text()
    )


def test_tapt_refuses_a_checkpoint_without_an_mlm_head(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    code, err = main_exit(
        *_tiny_train_args(tiny_model_dir, tiny_data_csv, tmp_path / "run"), "--tapt-steps", "5"
    )
    assert code == 2 and "ships no pretrained masked-LM head" in err and "lm_head" in err
