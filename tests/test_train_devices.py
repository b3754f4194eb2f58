"""Training paths that GPUs and real checkpoints take, run on the CPU: DataLoader workers,
a checkpoint stored in half precision, torch.compile."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from budgetlora.budget import measure
from budgetlora.checkpoint import load_trainable_state
from budgetlora.cli import main
from budgetlora.modeling import build_model
from budgetlora.predict import load_run
from budgetlora.train import train


def test_two_dataloader_workers_train_exactly_as_the_plain_loop(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plain = train(tiny_config(tmp_path / "plain", epochs=2))
    cfg = tiny_config(tmp_path / "workers", epochs=2)
    args = [
        "train", "--model", cfg.model.name_or_path, "--data", cfg.data.source, "--output", cfg.output,
        "--epochs", "2", "--lr", "1e-2", "--batch-size", "16", "--lora-r", "4", "--lora-alpha", "8",
        "--validation-size", "0.2", "--test-size", "0.2", "--max-length", "32", "--log-every", "5",
        "--eval-every", "20", "--mixed-precision", "no", "--no-progress", "--num-workers", "2",
    ]  # fmt: skip
    assert main(args) == 0
    workers = json.loads((tmp_path / "workers" / "metrics.json").read_text())
    assert workers["steps"] == plain.metrics["steps"] == 36
    assert workers["test"] == plain.metrics["test"] and workers["validation"] == plain.metrics["validation"]
    assert (tmp_path / "workers" / "adapter_model.safetensors").read_bytes() == (
        plain.run_dir / "adapter_model.safetensors"
    ).read_bytes()


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a checkpoint stored in bf16 (as many Hub checkpoints are)."""
    folder = tmp_path_factory.mktemp("bf16-model")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    model.to(torch.bfloat16).save_pretrained(folder)
    for item in tiny_model_dir.iterdir():
        if "token" in item.name or item.name in ("vocab.json", "merges.txt"):
            shutil.copy(item, folder / item.name)
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        names = stored.keys()  # a safetensors file handle: no iteration, only keys()
        assert {stored.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    return folder


def test_a_bf16_checkpoint_trains_with_float32_weights(
    tiny_config, bf16_model_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(tmp_path / "run", epochs=2)
    cfg = replace(cfg, model=replace(cfg.model, name_or_path=str(bf16_model_dir)))
    model = build_model(cfg.model, ("World", "Sports", "Business", "Sci/Tech"))
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}  # frozen encoder, adapter and head alike
    result = train(cfg)
    assert result.metrics["test"]["accuracy"] > 0.9
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}
    # The merged inference model is float32 too: the LoRA update is not rounded to bf16.
    assert {p.dtype for p in load_run(result.run_dir, mixed_precision="no").model.parameters()} == {
        torch.float32
    }


@pytest.mark.slow
def test_compiled_training_counts_its_compilations(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = train(tiny_config(tmp_path / "compiled", epochs=1, compile=True, eval_every=None))
    timing = result.metrics["timing"]
    # Length-grouped batches of many widths: dynamic shapes keep it to a few graphs.
    assert 1 <= timing["compilations"] <= 4
    assert result.metrics["test"]["n"] == 96 and result.metrics["test"]["accuracy"] > 0.5
    assert not any(name.startswith("_orig_mod") for name, _ in result.model.named_parameters())


def test_an_auto_rank_fills_the_budget_and_tensorboard_logs_the_run(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path / "run", epochs=1, tensorboard=True)
    labels = ("World", "Sports", "Business", "Sci/Tech")
    at_rank = {
        r: measure(replace(cfg.model, lora=replace(cfg.model.lora, r=r)), labels, 10**9).trainable
        for r in (3, 4)
    }
    cfg = replace(
        cfg, budget=at_rank[4] - 1, model=replace(cfg.model, lora=replace(cfg.model.lora, r="auto"))
    )
    result = train(cfg)
    assert result.cfg.model.lora.r == 3 and result.budget.trainable == at_rank[3]  # the largest that fits
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    logged = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/lr", "validation/accuracy", "validation/macro_f1"} <= set(logged)


def test_a_checkpoint_with_parameters_the_model_lacks_is_refused(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = build_model(tiny_config(tmp_path).model, ("a", "b", "c", "d"))
    with pytest.raises(KeyError, match="not in the model: module.base_model"):
        load_trainable_state(model, {"module.base_model.x": torch.zeros(1)})
