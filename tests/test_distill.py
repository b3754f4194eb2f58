"""Distillation on the tiny model: a trained tiny run teaches a smaller student."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from budgetlora.config import (
    DataConfig,
    DistillSettings,
    LoraSettings,
    ModelConfig,
    RunConfig,
    TrainSettings,
    load_config,
)
from budgetlora.data.tables import load_splits
from budgetlora.errors import BudgetloraError, OverBudgetError
from budgetlora.inference.predict import load_run
from budgetlora.training.distill import distill, teacher_logits
from budgetlora.training.losses import distillation_loss, distillation_loss_fn
from budgetlora.training.train import train
from commands import cli
from conftest import make_rows


def tiny_cfg(model: Path, data: Path, output: Path, *, r: int = 4, epochs: float = 3) -> RunConfig:
    return RunConfig(
        model=ModelConfig(str(model), lora=LoraSettings(r=r, alpha=8, target_modules=("query", "value"))),
        data=DataConfig(source=str(data), validation_size=0.2, test_size=0.2, max_length=32),
        train=TrainSettings(epochs=epochs, lr=1e-2, batch_size=16, progress=False, log_every=5),
        output=str(output),
    )


@pytest.fixture(scope="module")
def teacher_run(tiny_model_dir: Path, tiny_data_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tiny_cfg(tiny_model_dir, tiny_data_csv, tmp_path_factory.mktemp("teacher") / "run")).run_dir


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, so file counts are exact."""
    monkeypatch.setenv("BUDGETLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "teacher"


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}


def test_distill_writes_its_record_and_reuses_the_cached_teacher(
    teacher_run: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, cache: Path
) -> None:
    student_cfg = tiny_cfg(tiny_model_dir, tiny_data_csv, tmp_path / "student", r=1, epochs=1)
    result = distill(student_cfg, str(teacher_run), alpha=0.7, temperature=3.0, compare_baseline=True)

    # Teacher logits: computed once for train, validation and test rows, one .npy each.
    assert result.teacher.computed == ["train", "validation", "test"]
    first = _mtimes(cache)
    assert len(first) == 3 and all(name.endswith(".npy") for name in first)
    assert result.teacher.logits["train"].shape == (288, 4)

    run_dir, baseline_dir = tmp_path / "student", tmp_path / "student-baseline"
    assert {"distill.json", "config.yaml", "metrics.json", "report.md"} <= {p.name for p in run_dir.iterdir()}
    assert (baseline_dir / "metrics.json").is_file() and not (baseline_dir / "distill.json").exists()
    record = json.loads((run_dir / "distill.json").read_text())
    teacher_metrics = json.loads((teacher_run / "metrics.json").read_text())
    student_metrics = json.loads((run_dir / "metrics.json").read_text())
    baseline_metrics = json.loads((baseline_dir / "metrics.json").read_text())
    assert record["teacher"]["path"] == str(teacher_run.resolve()) and record["teacher"]["kind"] == "run"
    # The teacher was trained on the same data and split: the same test rows, the same score.
    assert record["teacher"]["test"]["accuracy"] == pytest.approx(teacher_metrics["test"]["accuracy"])
    assert record["teacher"]["test"]["n"] == 96 and record["teacher"]["train"]["n"] == 288
    assert record["teacher"]["trainable"] == teacher_metrics["budget"]["trainable"] == 2212
    assert (record["alpha"], record["temperature"]) == (0.7, 3.0)
    assert record["student"]["test"]["accuracy"] == student_metrics["test"]["accuracy"]
    assert record["student"]["trainable"] == 1444  # LoRA r=1 on query, value: 256 + head 1,188
    assert record["baseline"]["test"]["accuracy"] == baseline_metrics["test"]["accuracy"]
    assert record["baseline"]["run_dir"] == str(baseline_dir)
    report = (run_dir / "report.md").read_text()
    assert report.count("## Distillation") == 1 and "## Timing" in report  # train's report, extended
    assert (
        f"{record['teacher']['test']['accuracy']:.2%}" in report and "student without distillation" in report
    )

    # The same student, seed and rows: only the loss differs, so the training losses differ.
    def losses(folder: Path) -> list[float]:
        lines = (folder / "history.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]

    assert len(losses(run_dir)) == len(losses(baseline_dir)) and losses(run_dir) != losses(baseline_dir)

    # One config for the run: config.yaml holds the teacher and the loss mix as well.
    recorded = load_config(run_dir / "config.yaml")
    assert recorded == result.student.cfg
    assert recorded.distill == DistillSettings(str(teacher_run), 0.7, 3.0)
    assert load_config(baseline_dir / "config.yaml").distill == DistillSettings()  # trained without one
    with pytest.raises(BudgetloraError, match="budgetlora distill"):
        train(replace(recorded, output=str(tmp_path / "refused")))  # train() alone would ignore the teacher
    assert not (tmp_path / "refused").exists()
    run = load_run(run_dir)
    assert run.label_names == ("label_0", "label_1", "label_2", "label_3")

    # A second student reads the cache: no file is added or rewritten.
    again = distill(replace(student_cfg, output=str(tmp_path / "again")), str(teacher_run), alpha=0.3)
    assert again.teacher.computed == [] and _mtimes(cache) == first
    np.testing.assert_array_equal(again.teacher.logits["train"], result.teacher.logits["train"])


def test_the_loss_looks_up_each_samples_own_teacher_row() -> None:
    table = np.array([[0.0, 0.0], [np.log(3), 0.0], [5.0, -5.0]], dtype=np.float32)  # (3 rows, 2 labels)
    loss_fn = distillation_loss_fn(table, alpha=0.5, temperature=2.0)
    logits = torch.tensor([[0.2, 0.1], [1.0, -1.0]])
    batch = {"index": torch.tensor([2, 1]), "labels": torch.tensor([0, 1])}
    expected = distillation_loss(logits, torch.from_numpy(table[[2, 1]]), batch["labels"], 0.5, 2.0)
    torch.testing.assert_close(loss_fn(logits, batch), expected)


def test_a_lora_adapter_folder_teaches_as_its_run_does(
    teacher_run: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, cache: Path
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(teacher_run / name, adapter / name)
    splits = load_splits(tiny_cfg(tiny_model_dir, tiny_data_csv, tmp_path / "x").data)
    from_adapter = teacher_logits(str(adapter), splits, max_length=32)
    from_run = teacher_logits(str(teacher_run), splits, max_length=32)
    assert from_adapter.teacher.kind == "adapter" and from_adapter.labels_matched_by == "count"
    assert len(_mtimes(cache)) == 6  # two teachers, three splits each
    np.testing.assert_allclose(from_adapter.logits["test"], from_run.logits["test"], atol=1e-4)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_teacher_and_student_must_share_the_label_set(
    teacher_run: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, cache: Path
) -> None:
    texts = [r["text"] for r in csv.DictReader(tiny_data_csv.open())]
    three = _write_csv(tmp_path / "three.csv", [(t, str(i % 3)) for i, t in enumerate(texts[:120])])
    cfg = tiny_cfg(tiny_model_dir, three, tmp_path / "s3")
    with pytest.raises(BudgetloraError, match=r"has 4 labels .* student's data has 3 .*share the label set"):
        distill(cfg, str(teacher_run))

    # A checkpoint whose config names its classes: names must agree, in order.
    named = tmp_path / "named-checkpoint"
    shutil.copytree(tiny_model_dir, named)
    config = json.loads((named / "config.json").read_text())
    config["id2label"] = {"0": "World", "1": "Sports", "2": "Business", "3": "Sci/Tech"}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (named / "config.json").write_text(json.dumps(config))
    names = ["Sports", "World", "Business", "Sci/Tech"]
    swapped = _write_csv(tmp_path / "named.csv", [(t, names[i % 4]) for i, t in enumerate(texts[:120])])
    cfg = tiny_cfg(tiny_model_dir, swapped, tmp_path / "sn")  # label names sorted: Business, Sci/Tech, ...
    with pytest.raises(BudgetloraError, match="the same classes in another order"):
        distill(cfg, str(named))
    assert not cache.exists()  # refused before the teacher ran

    # Generic names (label_0 ...) are matched by count: the checkpoint teaches the tiny data.
    splits = load_splits(tiny_cfg(tiny_model_dir, tiny_data_csv, tmp_path / "x").data)
    soft = teacher_logits(str(named), splits, max_length=32)
    assert soft.teacher.kind == "checkpoint" and soft.labels_matched_by == "count"
    assert soft.teacher.label_names == ("World", "Sports", "Business", "Sci/Tech")


def test_teachers_that_cannot_teach(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, cache: Path
) -> None:
    from transformers import RobertaConfig, RobertaModel

    encoder = tmp_path / "plain-encoder"
    RobertaModel(
        RobertaConfig(
            vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(encoder)
    cfg = tiny_cfg(tiny_model_dir, tiny_data_csv, tmp_path / "s")
    with pytest.raises(BudgetloraError, match="no trained classification head"):
        distill(cfg, str(encoder))
    with pytest.raises(BudgetloraError, match="teacher not found"):
        distill(cfg, str(tmp_path / "missing"))
    with pytest.raises(BudgetloraError, match="distill.alpha"):
        distill(cfg, str(encoder), alpha=1.5)
    with pytest.raises(OverBudgetError, match="over budget"):
        distill(replace(cfg, budget=1000), str(encoder))  # the student's budget is checked first
    assert not cache.exists() and not (tmp_path / "s").exists()


def test_cli_distill_and_its_rerun_from_the_run_folder(
    teacher_run: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, cache: Path
) -> None:
    out = tmp_path / "cli-student"
    result = cli(
        "distill", "--model", str(tiny_model_dir), "--data", str(tiny_data_csv), "--output", str(out),
        "--teacher", str(teacher_run), "--alpha", "0.6", "--temperature", "1.5", "--lora-r", "2",
        "--epochs", "1", "--lr", "1e-2", "--batch-size", "16", "--max-length", "32",
        "--validation-size", "0.2", "--test-size", "0.2", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher  validation accuracy" in result.stdout and "student  validation accuracy" in result.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["distill"] == {
        "teacher": str(teacher_run), "alpha": 0.6, "temperature": 1.5, "transfer": False
    }  # fmt: skip
    again = cli("distill", "--config", str(out / "config.yaml"), "--output", str(tmp_path / "rerun"))
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = (json.loads((d / "distill.json").read_text()) for d in (out, tmp_path / "rerun"))
    assert second["student"]["test"] == first["student"]["test"]  # the same run again (CPU, same seed)
    missing = cli("distill", "--model", str(tiny_model_dir), "--output", str(tmp_path / "no-teacher"))
    assert missing.returncode == 2 and "--teacher" in missing.stderr and "Traceback" not in missing.stderr


def test_the_unlabelled_texts_become_transfer_rows_labelled_by_the_teacher(
    teacher_run: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, cache: Path
) -> None:
    """distill.transfer: the student also trains on data.unlabelled's texts, each with the
    teacher's soft labels and its top class; the run records them and reports their shift."""
    texts = [text for text, _ in make_rows(64, seed=11)]
    unlabelled = tmp_path / "texts.csv"
    with unlabelled.open("w", newline="") as fh:
        csv.writer(fh).writerows([["text"], *([text] for text in texts)])
    cfg = tiny_cfg(tiny_model_dir, tiny_data_csv, tmp_path / "student", r=1, epochs=1)
    with pytest.raises(BudgetloraError, match="set data.unlabelled"):
        replace(cfg, distill=DistillSettings(str(teacher_run), transfer=True))
    cfg = replace(
        cfg,
        data=replace(cfg.data, unlabelled=str(unlabelled)),
        distill=DistillSettings(str(teacher_run), alpha=0.7, transfer=True),
    )
    result = distill(cfg)

    assert result.teacher.computed == ["train", "validation", "test", "transfer"]
    assert len(_mtimes(cache)) == 4  # the transfer texts' logits are cached as the splits' are
    teacher_top = load_run(teacher_run).logits(texts).argmax(axis=1)
    np.testing.assert_array_equal(result.teacher.logits["transfer"].argmax(axis=1), teacher_top)
    run_dir = tmp_path / "student"
    record = json.loads((run_dir / "distill.json").read_text())
    shares = np.bincount(teacher_top, minlength=4) / 64
    assert record["transfer"]["rows"] == 64 and record["transfer"]["source"] == str(unlabelled)
    assert list(record["transfer"]["teacher_class_shares"].values()) == pytest.approx(shares.tolist())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["pseudo_labelled"] == 64 and metrics["data"]["train"] == 288 + 64
    steps = [r["step"] for r in map(json.loads, (run_dir / "history.jsonl").read_text().splitlines())]
    assert max(steps) == -(-(288 + 64) // 16)  # one epoch over the training and the transfer rows
    report = (run_dir / "report.md").read_text()
    assert "Transfer data" in report and "64 texts" in report and "## Distillation" in report
    assert (
        run_dir / "shift" / "shift.md"
    ).is_file()  # the unlabelled texts' shift report, as train writes it


def test_an_interrupted_distillation_resumes_from_its_run_folder(
    teacher_run: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, cache: Path
) -> None:
    """`budgetlora distill --resume --output RUN`: the run folder's config.yaml names the teacher."""

    class Stopped(Exception):
        pass

    def stop(step: int, metrics: dict) -> bool:
        raise Stopped

    cfg = tiny_cfg(tiny_model_dir, tiny_data_csv, tmp_path / "stopped", r=1, epochs=1)
    cfg = replace(cfg, train=replace(cfg.train, checkpoint_every=5, eval_every=12))
    with pytest.raises(Stopped):
        distill(cfg, str(teacher_run), alpha=0.7, on_eval=stop)
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    resumed = cli("distill", "--resume", "--output", str(tmp_path / "stopped"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    straight = distill(replace(cfg, output=str(tmp_path / "straight")), str(teacher_run), alpha=0.7)
    assert (
        json.loads((tmp_path / "stopped" / "metrics.json").read_text())["test"]
        == straight.student.metrics["test"]
    )
    assert (tmp_path / "stopped" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "straight" / "adapter_model.safetensors"
    ).read_bytes()
    refused = cli("train", "--resume", "--output", str(tmp_path / "stopped"))
    assert refused.returncode == 2 and "budgetlora distill" in refused.stderr


def test_a_sweep_with_a_teacher_distils_every_trial(
    teacher_run: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, cache: Path
) -> None:
    from budgetlora.training.sweep import sweep

    student = tiny_cfg(tiny_model_dir, tiny_data_csv, tmp_path / "unused", r=1, epochs=1)
    base = replace(student, distill=DistillSettings(str(teacher_run), temperature=3.0))
    result = sweep(base, {"distill.alpha": [0.2, 0.9]}, n_trials=2, output=tmp_path / "sweep", sampler="grid")
    trials = sorted((tmp_path / "sweep").glob("trial-*"))
    assert len(trials) == 2 and result.best_config is not None
    recorded = sorted(
        ((load_config(t / "config.yaml").distill, json.loads((t / "distill.json").read_text())["alpha"])
         for t in trials),
        key=lambda pair: pair[1],
    )  # fmt: skip  # every trial distilled, with its own alpha and the base config's teacher and T
    assert recorded == [
        (DistillSettings(str(teacher_run), 0.2, 3.0), 0.2),
        (DistillSettings(str(teacher_run), 0.9, 3.0), 0.9),
    ]
    assert result.best_config.distill in {d for d, _ in recorded}
    assert load_config(tmp_path / "sweep" / "best.yaml").distill == result.best_config.distill
    assert f"`budgetlora distill --config {tmp_path / 'sweep' / 'best.yaml'}`" in (
        (tmp_path / "sweep" / "trials.md").read_text()
    )
