"""Resume after a kill, determinism, atomic writes, and multi-process training (2 CPU processes)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from budgetlora.errors import BudgetloraError
from budgetlora.inference.predict import evaluate
from budgetlora.rundir import atomic_path, write_json_atomic
from budgetlora.training.checkpoint import latest_checkpoint
from budgetlora.training.train import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _train_args(model: Path, data: Path, out: Path, epochs: int) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(data), "--output", str(out),
        "--epochs", str(epochs), "--lr", "1e-2", "--batch-size", "16", "--lora-r", "4", "--lora-alpha", "8",
        "--set", "data.validation_size=0.2", "--set", "data.test_size=0.2", "--max-length", "32",
        "--log-every", "3", "--eval-every", "25", "--checkpoint-every", "10", "--no-progress",
    ]  # fmt: skip


def _comparable_history(run: Path) -> list[dict]:
    lines = (run / "history.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_second"} for line in lines]


def test_a_killed_run_resumes_to_the_same_result(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    epochs = 25  # 450 steps: long enough to be killed in the middle
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    process = subprocess.Popen(
        [sys.executable, "-m", "budgetlora", *_train_args(tiny_model_dir, tiny_data_csv, killed, epochs)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while latest_checkpoint(killed) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted by SIGTERM" in stderr and f"--resume --output {killed}" in stderr
    assert not (killed / "metrics.json").exists() and (killed / "config.yaml").is_file()
    stopped_at = int(latest_checkpoint(killed).name.split("-")[1])  # type: ignore[union-attr]
    assert 0 < stopped_at < epochs * 18

    resumed = subprocess.run(
        [sys.executable, "-m", "budgetlora", "train", "--resume", "--output", str(killed), "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoints'}" in resumed.stdout

    reference = subprocess.run(
        [sys.executable, "-m", "budgetlora", *_train_args(tiny_model_dir, tiny_data_csv, straight, epochs)],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (killed, straight))
    for split in ("validation", "test"):
        assert a[split] == b[split]  # identical metrics, loss included, bit for bit
    assert a["steps"] == b["steps"] == epochs * 18 and a["best_step"] == b["best_step"]
    assert _comparable_history(killed) == _comparable_history(straight)
    assert (killed / "adapter_model.safetensors").read_bytes() == (
        straight / "adapter_model.safetensors"
    ).read_bytes()


def test_resume_refuses_a_finished_or_missing_run(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from budgetlora.errors import BudgetloraError

    cfg = tiny_config(tmp_path / "missing", epochs=1)
    with pytest.raises(BudgetloraError, match="does not exist"):
        train(cfg, resume=True)


def test_checkpoints_rotate_and_same_seed_gives_the_same_run(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(tmp_path / "a", epochs=2, eval_every=None)
    cfg = replace(cfg, train=replace(cfg.train, checkpoint_every=5, keep_checkpoints=2))
    first = train(cfg)
    names = sorted(p.name for p in (first.run_dir / "checkpoints").iterdir())
    assert names == ["step-00000030", "step-00000035"]  # 36 steps; the last step needs none
    second = train(replace(cfg, output=str(tmp_path / "b")))
    assert first.metrics["validation"] == second.metrics["validation"]
    assert first.metrics["test"] == second.metrics["test"]
    assert _comparable_history(first.run_dir) == _comparable_history(second.run_dir)


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"accuracy": 0.9})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"accura')  # a crash mid-write
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.slow
def test_two_processes_train_evaluate_and_predict(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    args = _train_args(tiny_model_dir, tiny_data_csv, out, epochs=3)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "budgetlora"]
    result = subprocess.run([*torchrun, *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("test accuracy") == 1  # one process reports and writes
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["timing"]["processes"] == 2
    # 288 training rows, 2 processes x 16 per step: 9 steps an epoch.
    assert metrics["steps"] == 27
    for split in ("validation", "test"):  # every held-out row counted exactly once
        assert metrics[split]["n"] == 96
        assert sum(map(sum, metrics[split]["confusion_matrix"])) == 96
    assert metrics["test"]["accuracy"] > 0.9
    # The adapter written by the 2-process run loads and scores as the run said.
    assert evaluate(out, split="test")["accuracy"] == pytest.approx(metrics["test"]["accuracy"])

    texts = tmp_path / "texts.csv"
    with texts.open("w", newline="") as fh:
        csv.writer(fh).writerows([["text"], *[[f"market shares profit bank {i}"] for i in range(37)]])
    predicted = subprocess.run(
        [*torchrun, "predict", str(out), str(texts), "--output", str(tmp_path / "sub.csv")],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    rows = list(csv.reader((tmp_path / "sub.csv").open()))
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(37)]  # all rows, once, in input order


class _Stopped(Exception):
    """Raised by an evaluation callback: a run that ends after its checkpoints, unfinished."""


def test_resume_without_a_checkpoint_starts_afresh_and_a_changed_config_is_refused(  # type: ignore[no-untyped-def]
    tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = train(tiny_config(fresh, epochs=1, eval_every=None), resume=True)
    assert f"no checkpoint in {fresh}: starting from the beginning" in capsys.readouterr().out
    assert result.metrics["steps"] == 18 and (fresh / "metrics.json").is_file()

    out = tmp_path / "stopped"
    cfg = tiny_config(out, epochs=1, checkpoint_every=5, eval_every=12)

    def stop(step: int, metrics: dict) -> bool:
        raise _Stopped

    with pytest.raises(_Stopped):
        train(cfg, on_eval=stop)
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "step-00000010"
    saved = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    with pytest.raises(BudgetloraError, match="the config differs from the interrupted run's"):
        train(replace(cfg, train=replace(cfg.train, lr=5e-3)), resume=True)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == saved
    assert not (out / "metrics.json").exists()
