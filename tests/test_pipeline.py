"""The whole pipeline on the tiny model: train → run folder → reload → evaluate → predict."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from budgetlora.config import load_config
from budgetlora.data.batching import encode
from budgetlora.errors import BudgetloraError, OverBudgetError
from budgetlora.inference.merged import predict_logits
from budgetlora.inference.predict import classify, evaluate, load_run, predict
from budgetlora.reporting.metrics import softmax
from budgetlora.rundir import RunFolder
from budgetlora.training.train import prepare_run, train

RUN_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",  # peft's model card
    "tokenizer.json",
    "tokenizer_config.json",
    "config.yaml",
    "budget.json",
    "history.jsonl",
    "metrics.json",
    "report.md",
    "confusion_matrix.png",
    "predicted_distribution.png",
    "learning_curves.png",
    "class_distribution.png",
    "token_lengths.png",
    "budget.png",
}


@pytest.fixture
def trained(tiny_run):  # type: ignore[no-untyped-def]
    """The session's tiny run (conftest): these tests read it, and add only eval-* folders."""
    return tiny_run


def test_run_folder_holds_exactly_the_documented_files(trained) -> None:  # type: ignore[no-untyped-def]
    written = {p.name for p in trained.run_dir.iterdir() if not p.name.startswith("eval-")}  # evaluate's
    assert written == RUN_FILES
    # The layout object names the same files (the tokenizer and peft's card are save_pretrained's).
    folder = RunFolder(trained.run_dir)
    named = [
        folder.config, folder.budget, folder.history, folder.metrics, folder.report, *folder.adapter_files,
        folder.confusion_matrix_plot, folder.predicted_distribution_plot, folder.learning_curves_plot,
        folder.class_distribution_plot, folder.token_lengths_plot, folder.budget_plot,
    ]  # fmt: skip
    assert all(path.is_file() for path in named)
    assert RUN_FILES - {p.name for p in named} == {"README.md", "tokenizer.json", "tokenizer_config.json"}


def test_the_tiny_task_is_learned_and_recorded(trained) -> None:  # type: ignore[no-untyped-def]
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())
    assert metrics["test"]["n"] == 96 and metrics["validation"]["n"] == 96
    assert metrics["test"]["accuracy"] > 0.9  # chance is 0.25
    assert metrics["budget"]["trainable"] == trained.budget.trainable
    assert json.loads((trained.run_dir / "budget.json").read_text())["groups"] == trained.budget.groups
    history = [json.loads(line) for line in (trained.run_dir / "history.jsonl").read_text().splitlines()]
    train_steps = [h["step"] for h in history if h["type"] == "train"]
    assert train_steps == [*range(5, metrics["steps"], 5), metrics["steps"]]  # every 5th and the last
    evals = [h for h in history if h["type"] == "eval"]
    # 288 training rows / batch 16 = 18 steps an epoch: evaluated each epoch and every 20 steps.
    assert [e["step"] for e in evals] == [18, 20, 36, 40, 54, 60, 72]
    best = min(evals, key=lambda e: e["loss"])  # kept by default: the lowest validation loss
    assert metrics["best_step"] == best["step"]
    # Where the run's time went, phase by phase, in the order they ran.
    phases = metrics["timing"]["phases"]
    assert list(phases) == [
        "read data and check the budget", "load weights, tokenize, set up", "train (with evaluations)",
        "final evaluation", "write the adapter, report and plots",
    ]  # fmt: skip
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["train (with evaluations)"] >= metrics["timing"]["train_seconds"] > 0
    assert "| Time: train (with evaluations) |" in (trained.run_dir / "report.md").read_text()
    assert metrics["validation"]["accuracy"] == pytest.approx(best["accuracy"])
    assert metrics["validation"]["loss"] == pytest.approx(best["loss"], rel=1e-4)
    report = (trained.run_dir / "report.md").read_text()
    assert (
        f"{metrics['test']['accuracy']:.2%}" in report and "Sci/Tech" not in report
    )  # labels come from the data


def _evaluations(run_dir: Path) -> list[dict]:
    history = (json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines())
    return [h for h in history if h["type"] == "eval"]


def test_best_metric_accuracy_keeps_the_most_accurate_step(trained, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = train(tiny_config(tmp_path / "by-accuracy", best_metric="accuracy"))
    evals = _evaluations(result.run_dir)
    first_best = max(evals, key=lambda e: e["accuracy"])  # max() keeps the first of equals, as training does
    assert result.metrics["best_step"] == first_best["step"]
    assert result.metrics["validation"]["accuracy"] == pytest.approx(first_best["accuracy"])
    # The shared run trained the same way (the same losses at each evaluation) and kept the lowest loss:
    # accuracy saturates before the loss stops falling, so accuracy kept an earlier step.
    by_loss = _evaluations(trained.run_dir)
    assert [e["loss"] for e in by_loss] == pytest.approx([e["loss"] for e in evals], rel=1e-5)
    assert first_best["step"] < json.loads((trained.run_dir / "metrics.json").read_text())["best_step"]


def test_reloaded_run_predicts_exactly_as_the_trained_model(trained, tiny_data_csv: Path) -> None:  # type: ignore[no-untyped-def]
    run = load_run(trained.run_dir, mixed_precision="no")
    texts = [row["text"] for row in csv.DictReader(tiny_data_csv.open())][:64]
    encoded = encode(texts, None, run.tokenizer, 32)
    reloaded = predict_logits(run.model, encoded, run.runtime)
    in_memory = predict_logits(trained.model, encoded, run.runtime)
    assert np.array_equal(reloaded.argmax(1), in_memory.argmax(1))
    np.testing.assert_allclose(softmax(reloaded), softmax(in_memory), atol=1e-5)


def test_plain_peft_loading_works_too(trained, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4)
    model = PeftModel.from_pretrained(base, str(trained.run_dir)).eval()
    run = load_run(trained.run_dir, mixed_precision="no")
    encoded = encode(["market shares profit bank", "team coach goal"], None, run.tokenizer, 32)
    np.testing.assert_allclose(
        predict_logits(model, encoded, run.runtime),
        predict_logits(run.model, encoded, run.runtime),
        atol=1e-4,
    )


def test_config_yaml_reruns_the_run(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config(trained.run_dir / "config.yaml")
    assert cfg == trained.cfg
    assert cfg.data.label_names == ("label_0", "label_1", "label_2", "label_3")
    again = train(replace(cfg, output=str(tmp_path / "again")))
    assert again.metrics["test"]["accuracy"] == trained.metrics["test"]["accuracy"]
    assert _without_timing(again.history) == _without_timing(
        trained.history
    )  # same seed on CPU: the same run


def test_a_prepared_run_is_not_read_again(tiny_config, tiny_data_csv: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "rows.csv"
    data.write_bytes(tiny_data_csv.read_bytes())
    cfg = tiny_config(tmp_path / "run", max_steps=4)
    prepared = prepare_run(replace(cfg, data=replace(cfg.data, source=str(data))))
    data.unlink()  # train() works from what prepare_run read: the file is not opened again
    result = train(prepared)
    assert result.budget == prepared.budget and result.metrics["data"]["train"] == 288
    assert result.metrics["steps"] == 4
    # Preparing counts in its phase, though it ran before train() was called.
    assert result.metrics["timing"]["phases"]["read data and check the budget"] >= round(prepared.seconds, 3)
    with pytest.raises(BudgetloraError, match="file not found"):
        train(replace(prepared.cfg, output=str(tmp_path / "again")))  # a config is read afresh


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "samples_per_second"} for h in history]


def test_evaluate_and_predict_and_classify(trained, tiny_data_csv: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    metrics = evaluate(trained.run_dir, split="test")
    assert metrics["accuracy"] == pytest.approx(trained.metrics["test"]["accuracy"])
    assert {p.name for p in (trained.run_dir / "eval-test").iterdir()} == {
        "metrics.json",
        "report.md",
        "confusion_matrix.png",
        "predicted_distribution.png",
    }
    # A file given with --data is scored whole (the tiny CSV: 480 rows), not split again.
    whole = evaluate(trained.run_dir, data=str(tiny_data_csv))
    assert whole["n"] == 480
    recorded = json.loads((trained.run_dir / f"eval-{tiny_data_csv.stem}" / "metrics.json").read_text())
    assert recorded["n"] == 480 and recorded["source"] == str(tiny_data_csv)
    report = (trained.run_dir / f"eval-{tiny_data_csv.stem}" / "report.md").read_text()
    assert f"all rows of {tiny_data_csv.name}" in report.splitlines()[0]
    unlabelled = tmp_path / "new.csv"
    unlabelled.write_text("text\nmarket shares profit bank quarter\nteam wins the league match\n")
    out = predict(trained.run_dir, unlabelled, output=tmp_path / "submission.csv")
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["ID", "Label"] and [r[0] for r in rows[1:]] == ["0", "1"]
    probs = list(csv.DictReader(out.with_suffix(".probs.csv").open()))
    assert [int(r["Label"]) for r in probs] == [int(r[1]) for r in rows[1:]]
    assert all(abs(sum(float(v) for k, v in r.items() if k.startswith("p_")) - 1) < 1e-4 for r in probs)
    labelled = classify(trained.run_dir, ["market shares profit bank quarter", "team wins the league match"])
    assert [r["label_id"] for r in labelled] == [int(r[1]) for r in rows[1:]]


def test_over_budget_config_is_refused_before_any_work(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(tiny_config(tmp_path / "run"), budget=1000)
    with pytest.raises(OverBudgetError, match="over budget"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_not_overwritten(trained) -> None:  # type: ignore[no-untyped-def]
    before = (trained.run_dir / "metrics.json").read_bytes()
    with pytest.raises(BudgetloraError, match="already holds a finished run"):
        train(trained.cfg)
    assert (trained.run_dir / "metrics.json").read_bytes() == before


def test_run_folder_missing_its_adapter(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text(
        yaml.safe_dump(yaml.safe_load((trained.run_dir / "config.yaml").read_text()))
    )
    with pytest.raises(BudgetloraError, match="has no trained adapter"):
        load_run(broken)


def test_bf16_autocast_training(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """bf16 autocast (what 'auto' picks on GPUs and on CPUs with AMX) trains the task too."""
    result = train(tiny_config(tmp_path / "bf16", mixed_precision="bf16"))
    assert result.metrics["timing"]["mixed_precision"] == "bf16"
    assert result.metrics["test"]["accuracy"] > 0.9
