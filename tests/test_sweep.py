"""Budget-aware search on the tiny model: over-budget trials pruned untrained, resume, best.yaml."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from budgetlora.config import (
    DataConfig,
    LoraSettings,
    ModelConfig,
    RunConfig,
    TrainSettings,
    load_config,
    save_config,
)
from budgetlora.errors import BudgetloraError
from budgetlora.training.sweep import parse_space, sweep
from budgetlora.training.train import train
from commands import cli

# The tiny RoBERTa (hidden 32, 2 layers, 4 labels): LoRA on query and value costs
# 2 layers * 2 modules * (32 + 32) * r = 256 r; the default head 1,188, the linear head 132.
# Budget 5,000: r = 1 fits (1,444 or 388); r = 64 does not (17,572 or 16,516).
GRID = {"lora.r": [1, 64], "model.head": ["default", "linear"], "train.lr": [1e-2, 3e-3]}


def base_cfg(model: Path, data: Path) -> RunConfig:
    return RunConfig(
        model=ModelConfig(str(model), lora=LoraSettings(r=4, alpha=8, target_modules=("query", "value"))),
        data=DataConfig(source=str(data), validation_size=0.2, test_size=0.2, max_length=32),
        train=TrainSettings(
            epochs=1,
            lr=1e-2,
            batch_size=16,
            progress=False,
            log_every=5,
            eval_every=9,
            best_metric="accuracy",
        ),  # maximised; test_a_sweep_on_the_validation_loss_minimises_it sweeps the default, the loss
        budget=5000,
        output="ignored",
    )


def test_grid_sweep_prunes_over_budget_resumes_and_best_yaml_trains(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    cfg, out = base_cfg(tiny_model_dir, tiny_data_csv), tmp_path / "sweep"
    first = sweep(cfg, GRID, n_trials=4, output=out, sampler="grid")
    assert first.ran == 4 and len(first.study.trials) == 4
    resumed = sweep(cfg, GRID, n_trials=8, output=out, sampler="grid")
    assert resumed.ran == 4  # only the missing ones

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    trials = study.trials
    assert len(trials) == 8
    # The grid is covered exactly once, across the two calls.
    points = {(t.params["model.lora.r"], t.params["model.head"], t.params["train.lr"]) for t in trials}
    assert len(points) == 8
    over = [t for t in trials if t.params["model.lora.r"] == 64]
    fits = [t for t in trials if t.params["model.lora.r"] == 1]
    assert len(over) == 4 and all(t.state == TrialState.PRUNED for t in over)
    for t in over:
        assert t.user_attrs["note"].startswith("over budget:")
        assert not (out / f"trial-{t.number:04d}").exists()  # nothing trained, nothing written
    assert all(t.state == TrialState.COMPLETE for t in fits)  # 4 trials < the median pruner's 5 to start
    for t in fits:
        trial_dir = out / f"trial-{t.number:04d}"
        metrics = json.loads((trial_dir / "metrics.json").read_text())
        assert (
            metrics["validation"]["accuracy"] == t.value and t.intermediate_values
        )  # reported as it trained
        assert (
            metrics["budget"]["trainable"]
            == t.user_attrs["trainable"]
            == (1444 if t.params["model.head"] == "default" else 388)
        )
        assert load_config(trial_dir / "config.yaml").model.lora.r == 1

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete"] * 4 + ["pruned"] * 4
    values = [float(r["value"]) for r in rows[:4]]
    assert values == sorted(values, reverse=True) and values[0] == resumed.best_value
    assert {"trials.md", "optimization_history.png", "best.yaml", "study.db", "space.yaml"} <= {
        p.name for p in out.iterdir()
    }
    table = (out / "trials.md").read_text()
    assert "4 complete, 4 pruned" in table and "over budget: 17,572" in table
    assert (out / "param_importances.png").is_file() or "Parameter importances: not drawn" in table

    # best.yaml is a config train takes as it is; same seed on CPU: the same result.
    best = load_config(out / "best.yaml")
    assert best.output == str(out / "best") and best == resumed.best_config
    again = train(best)
    assert (out / "best" / "metrics.json").is_file()
    assert again.metrics["validation"]["accuracy"] == resumed.best_value

    # The same study with another space is refused rather than mixed.
    with pytest.raises(BudgetloraError, match="started with another search space"):
        sweep(cfg, {**GRID, "train.lr": [1e-3]}, n_trials=9, output=out, sampler="grid")


def test_tpe_sweep_over_ranges_and_module_lists(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    space = yaml.safe_load(
        """
        lora.r: {type: int, low: 1, high: 4}
        lr: {type: float, low: 1e-3, high: 2e-2, log: true}
        lora.target_modules: [[query], [query, value]]
        lora.alpha: 8
        """
    )
    result = sweep(
        base_cfg(tiny_model_dir, tiny_data_csv), space, n_trials=3, output=tmp_path / "tpe", seed=1
    )
    assert result.ran == 3
    for t in result.study.trials:
        assert 1 <= t.params["model.lora.r"] <= 4 and 1e-3 <= t.params["train.lr"] <= 2e-2
        assert t.params["model.lora.target_modules"] in ("[query]", "[query, value]")
        cfg = load_config(tmp_path / "tpe" / f"trial-{t.number:04d}" / "config.yaml")
        assert cfg.model.lora.target_modules == tuple(yaml.safe_load(t.params["model.lora.target_modules"]))
        assert cfg.model.lora.alpha == 8 and cfg.train.lr == pytest.approx(t.params["train.lr"])


def test_search_space_mistakes_are_named() -> None:
    with pytest.raises(BudgetloraError, match="'train.learning_rate' is not a config key"):
        parse_space({"train.learning_rate": [1e-3]})
    with pytest.raises(BudgetloraError, match="distill.alpha needs a teacher"):
        parse_space({"distill.alpha": [0.5]})
    with pytest.raises(BudgetloraError, match="a range is"):
        parse_space({"lr": {"type": "float", "low": 1e-2, "high": 1e-3}})
    with pytest.raises(BudgetloraError, match="type int needs integer"):
        parse_space({"lora.r": {"type": "int", "low": 1.5, "high": 4}})
    aliases = parse_space(
        {"lr": ["1e-4"], "head": ["linear"], "lora.dropout": 0.0, "distill.temperature": [2]}, teacher=True
    )
    assert [p.key for p in aliases] == ["train.lr", "model.head", "model.lora.dropout", "distill.temperature"]


def test_cli_sweep(tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path) -> None:
    base, space, out = tmp_path / "base.yaml", tmp_path / "space.yaml", tmp_path / "cli-sweep"
    save_config(base_cfg(tiny_model_dir, tiny_data_csv), base)
    space.write_text("lora.r: [1, 64]\nmodel.head: [linear]\n")
    result = cli(
        "sweep", "--config", str(base), "--space", str(space), "--trials", "5", "--sampler", "grid",
        "--output", str(out), "--set", "train.eval_every=null",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 trial(s) run now" in result.stdout and "best: trial" in result.stdout  # the grid holds 2
    assert load_config(out / "best.yaml").model.lora.r == 1
    bad = cli("sweep", "--space", str(tmp_path / "nope.yaml"), "--output", str(out))
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr and "Traceback" not in bad.stderr


def test_values_that_contradict_each_other_prune_their_trial(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    """Each value is valid alone; adamw with momentum is not: that trial is pruned with the reason,
    and the sweep goes on (here every other trial is over budget: nothing trains)."""
    space = {"lora.r": [64], "train.optimizer": ["adamw", "sgd"], "train.momentum": [0.0, 0.9]}
    out = tmp_path / "contradicting"
    result = sweep(base_cfg(tiny_model_dir, tiny_data_csv), space, n_trials=4, output=out, sampler="grid")
    notes = {
        (t.params["train.optimizer"], t.params["train.momentum"]): t.user_attrs["note"]
        for t in result.study.trials
    }
    assert len(notes) == 4 and all(t.state == TrialState.PRUNED for t in result.study.trials)
    assert notes.pop(("adamw", 0.9)) == (
        "contradicting options: train.momentum=0.9 applies to train.optimizer=sgd only (it is adamw): "
        "drop it or choose sgd"
    )
    assert all(note.startswith("over budget:") for note in notes.values()), notes
    assert "contradicting options: train.momentum=0.9" in (out / "trials.md").read_text()
    # with no sgd anywhere in the space, the momentum is refused before the sweep folder is made
    lone = tmp_path / "lone"
    with pytest.raises(
        BudgetloraError, match=r"search space train.momentum: the value 0.9: train.momentum=0.9"
    ):
        sweep(base_cfg(tiny_model_dir, tiny_data_csv), {"train.momentum": [0.9]}, n_trials=1, output=lone)
    assert not lone.exists()


def test_a_sweep_on_the_validation_loss_minimises_it(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    base = base_cfg(tiny_model_dir, tiny_data_csv)
    cfg = replace(base, train=replace(base.train, best_metric=TrainSettings().best_metric))
    assert cfg.train.best_metric == "loss"
    out = tmp_path / "by-loss"
    result = sweep(cfg, {"train.lr": [1e-2, 1e-4]}, n_trials=2, output=out, sampler="grid")
    losses = {t.params["train.lr"]: float(t.value or "nan") for t in result.study.trials}
    assert losses[1e-2] < losses[1e-4]  # at 1e-4 nothing is learned in one epoch
    assert result.best_value == losses[1e-2]
    assert result.best_config is not None and result.best_config.train.lr == 1e-2
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [float(r["train.lr"]) for r in rows] == [1e-2, 1e-4]  # the lowest loss first
    for t in result.study.trials:  # the trial's value is its kept run's validation loss
        metrics = json.loads((out / f"trial-{t.number:04d}" / "metrics.json").read_text())
        assert metrics["validation"]["loss"] == t.value
    assert "Objective: validation loss (minimised)." in (out / "trials.md").read_text()
