"""Training paths that GPUs and real checkpoints take, run on the CPU: DataLoader workers,
a checkpoint stored in half precision, torch.compile."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from budgetlora.cli import main
from budgetlora.data.batching import encode
from budgetlora.inference.merged import predict_logits
from budgetlora.inference.predict import load_run
from budgetlora.model.budget import measure
from budgetlora.model.modeling import build_model
from budgetlora.reporting.metrics import softmax
from budgetlora.training.checkpoint import load_trainable_state
from budgetlora.training.train import _make_optimizer, train


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


def test_the_head_learning_rate_applies_to_the_head_alone(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """train.head_lr: the head's optimizer groups take it, LoRA keeps train.lr; a head at a
    vanishing rate ends where it started while LoRA moves."""
    cfg = tiny_config(tmp_path / "run", epochs=1, head_lr=1e-12, lr=1e-2)
    model = build_model(cfg.model, ("a", "b", "c", "d"))
    optimizer = _make_optimizer(model, cfg.train, fused=False)
    lrs: dict[str, float] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            lrs[names[id(param)]] = group["lr"]
    assert {lr for n, lr in lrs.items() if "modules_to_save" in n} == {1e-12}
    assert {lr for n, lr in lrs.items() if "lora_" in n} == {1e-2}
    assert len(lrs) == sum(p.requires_grad for p in model.parameters())  # every trainable parameter once

    result = train(cfg)
    trained = dict(result.model.named_parameters())
    heads = [n for n in trained if "modules_to_save.default" in n]
    assert heads
    for name in heads:
        original = trained[name.replace("modules_to_save.default", "original_module")]
        assert torch.allclose(trained[name], original, atol=1e-8), name
    assert any(trained[n].abs().max() > 1e-4 for n in trained if "lora_B" in n)


@pytest.fixture(scope="module")
def mpnet_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MPNet (random weights) with the tiny tokenizer: an architecture without SDPA attention."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-mpnet")
    for item in tiny_model_dir.iterdir():
        if item.name.startswith("tokenizer") or item.name.startswith("special_tokens"):
            shutil.copy(item, folder / item.name)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    config = MPNetConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=131,
        pad_token_id=1,
        num_labels=4,
    )
    torch.manual_seed(0)
    MPNetForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_a_model_without_sdpa_attention_trains_and_reloads(
    tiny_config, mpnet_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """MPNet (all-mpnet-base-v2's architecture) refuses a request for SDPA: budgetlora leaves the
    attention to transformers, trains it with LoRA on the role names and reloads it exactly."""
    cfg = tiny_config(tmp_path / "run", epochs=1)
    cfg = replace(cfg, model=replace(cfg.model, name_or_path=str(mpnet_dir)))
    result = train(cfg)
    assert result.model.config._attn_implementation == "eager"
    assert set(result.budget.groups) == {"lora.query", "lora.value", "head"}
    run = load_run(result.run_dir, mixed_precision="no")
    encoded = encode(
        ["stocks fell sharply today", "the team won the final match", "a new chip"], None, run.tokenizer, 32
    )
    reloaded = predict_logits(run.model, encoded, run.runtime)
    in_memory = predict_logits(result.model, encoded, run.runtime)
    np.testing.assert_allclose(softmax(reloaded), softmax(in_memory), atol=1e-5)


def test_without_eval_every_a_run_evaluates_four_times_an_epoch(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = train(tiny_config(tmp_path / "run", epochs=1, eval_every=None))
    # 288 training rows / batch 16 = 18 steps: every ceil(18 / 4) = 5 steps, and at the epoch's end.
    assert [h["step"] for h in result.history if h["type"] == "eval"] == [5, 10, 15, 18]
