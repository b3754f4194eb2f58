"""The command line, run as users run it: real subprocesses, real files, exit codes."""

from __future__ import annotations

import csv
import importlib
import json
import os
import pickle
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import budgetlora

COMMANDS = ["train", "evaluate", "predict", "classify", "plan", "distill", "sweep"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "budgetlora", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def test_every_module_imports() -> None:
    names = [m.name for m in pkgutil.iter_modules(budgetlora.__path__) if m.name != "__main__"]
    assert {"cli", "config", "data", "train", "predict", "budget", "modeling", "report"} <= set(names)
    for name in names:
        module = importlib.import_module(f"budgetlora.{name}")
        assert hasattr(module, "__all__"), name


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    result = run_cli(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: budgetlora" in result.stdout
    if command == "train":
        assert "--lora-r" in result.stdout and "[model.lora.r]" in result.stdout and "99.3%" in result.stdout


def test_console_script_is_installed() -> None:
    result = subprocess.run(["budgetlora", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir: Path, tiny_data_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tiny_data_csv),
        "--output",
        str(out),
        "--epochs",
        "4",
        "--lr",
        "1e-2",
        "--batch-size",
        "16",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--target-modules",
        "query,value",
        "--seed",
        "42",
        "--set",
        "data.validation_size=0.2",
        "--set",
        "data.test_size=0.2",
        "--max-length",
        "32",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "lora.query" in result.stdout and "test accuracy" in result.stdout
    return out


def test_train_then_predict_classify_evaluate(cli_run: Path, tmp_path: Path) -> None:
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9
    data = tmp_path / "new.jsonl"
    data.write_text(
        '{"id": "a7", "text": "market shares profit bank"}\n{"id": "b2", "text": "team coach goal match"}\n'
    )
    result = run_cli("predict", str(cli_run), str(data), "--output", str(tmp_path / "sub.csv"))
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader((tmp_path / "sub.csv").open()))
    assert rows[0] == ["ID", "Label"] and [r[0] for r in rows[1:]] == ["a7", "b2"]
    result = run_cli("classify", str(cli_run), "market shares profit bank", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["label_id"] == int(rows[1][1]) and abs(sum(row["probabilities"].values()) - 1) < 1e-5
    result = run_cli("evaluate", str(cli_run), "--split", "validation")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((cli_run / "eval-validation" / "metrics.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(metrics["validation"]["accuracy"])


def test_predict_a_pickled_dataset_only_with_allow_pickle(cli_run: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    path = tmp_path / "test_unlabelled.pkl"
    with path.open("wb") as fh:
        pickle.dump(
            Dataset.from_dict({"text": ["market shares profit", "team coach goal", "chip data phone"]}), fh
        )
    refused = run_cli("predict", str(cli_run), str(path), "--output", str(tmp_path / "s.csv"))
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr
    assert not (tmp_path / "s.csv").exists()
    result = run_cli(
        "predict", str(cli_run), str(path), "--output", str(tmp_path / "s.csv"), "--allow-pickle"
    )
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in csv.reader((tmp_path / "s.csv").open())] == ["ID", "0", "1", "2"]


def _assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


def test_errors_are_one_clear_message_and_exit_2(
    cli_run: Path, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    model, data = str(tiny_model_dir), str(tiny_data_csv)
    out = str(tmp_path / "out")
    _assert_user_error(
        run_cli("train", "--model", model, "--data", str(tmp_path / "nope.csv"), "--output", out), "nope.csv"
    )
    _assert_user_error(
        run_cli("train", "--model", str(tmp_path / "no-model"), "--data", data, "--output", out), "no-model"
    )
    _assert_user_error(
        run_cli("train", "--model", "no-such-org/no-such-model", "--data", data, "--output", out),
        "Hub",
        "--model",
    )
    _assert_user_error(
        run_cli("train", "--model", model, "--data", data, "--output", out, "--text-column", "body"),
        "body",
        "data.text_column",
    )
    over = run_cli("train", "--model", model, "--data", data, "--output", out, "--budget", "1000")
    _assert_user_error(over, "over budget", "lora.query", "head", "would fit")
    _assert_user_error(run_cli("train", "--budget", "0", "--output", out), "budget")
    _assert_user_error(run_cli("train", "--lora-dropout", "-0.1", "--output", out), "lora.dropout")
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("train:\n  lr: -3\n")
    _assert_user_error(run_cli("train", "--config", str(bad_config)), "bad.yaml", "train.lr")
    unknown_key = tmp_path / "typo.yaml"
    unknown_key.write_text("train:\n  learning_rate: 0.1\n")
    _assert_user_error(run_cli("train", "--config", str(unknown_key)), "train.learning_rate")
    assert not Path(out).exists()  # nothing was started, nothing written

    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    _assert_user_error(
        run_cli("predict", str(cli_run), str(empty), "--output", str(tmp_path / "s.csv")), "empty.csv"
    )
    _assert_user_error(run_cli("predict", str(tmp_path / "no-run"), str(empty)), "no-run")
    assert not (tmp_path / "s.csv").exists()


def test_adapter_on_another_architecture_is_refused(cli_run: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    bert = tmp_path / "tiny-bert"
    config = BertConfig(
        vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertForSequenceClassification(config).save_pretrained(bert)
    result = run_cli("classify", str(cli_run), "some text", "--model", str(bert))
    _assert_user_error(result, "does not fit the model", "--model")


def test_a_finished_run_is_kept(cli_run: Path, tiny_model_dir: Path, tiny_data_csv: Path) -> None:
    before = (cli_run / "adapter_model.safetensors").read_bytes()
    result = run_cli(
        "train", "--model", str(tiny_model_dir), "--data", str(tiny_data_csv), "--output", str(cli_run)
    )
    _assert_user_error(result, "already holds a finished run", "--overwrite")
    assert (cli_run / "adapter_model.safetensors").read_bytes() == before
