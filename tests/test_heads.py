"""The heads on the six head layouts: BERT's pretrained pooler + classifier, RoBERTa's dense +
out_proj, DeBERTa's untrained pooler + classifier, DistilBERT's pre_classifier + inline ReLU +
classifier, ModernBERT's pretrained head (dense, norm) + classifier, ALBERT's pooler (handed the
first token) + tanh + classifier. The mean head reads the mean of the real tokens, so padding
changes nothing; every head trains exactly what the budget counts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    FunnelConfig,
    MPNetConfig,
    MPNetForSequenceClassification,
)

from budgetlora.config import ModelConfig
from budgetlora.errors import BudgetloraError
from budgetlora.inference.predict import evaluate
from budgetlora.model.budget import count_trainable, measure
from budgetlora.model.modeling import build_model
from budgetlora.training.train import train
from conftest import tiny_model

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
PAD = 1  # the tiny RoBERTa's <pad>: the other tiny models use its tokenizer, or are given the same id
_SMALL = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def _folder(arch: str, tiny_model_dir: Path, tmp_path: Path) -> Path:
    if arch == "roberta":
        return tiny_model_dir
    return tiny_model(arch, tiny_model_dir, tmp_path, pretrain=False)


@pytest.mark.parametrize("arch", ["roberta", "bert", "deberta", "distilbert", "modernbert", "albert"])
def test_mean_head_classifies_the_mean_of_the_real_tokens(
    arch: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _folder(arch, tiny_model_dir, tmp_path)
    model = build_model(ModelConfig(str(folder), head="mean"), LABELS).eval()
    torch.manual_seed(1)
    ids = torch.randint(5, 90, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = PAD, 0  # the second text has 4 real tokens, then padding
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits
        # LoRA starts as a no-op, so the encoder is the pretrained one
        hidden = (
            AutoModel.from_pretrained(folder).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        )
        means = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
        classifier = model.base_model.model.classifier
        if arch == "roberta":
            expected = classifier(means.unsqueeze(1))
        elif arch == "distilbert":  # through the sign split and the inline ReLU: one linear layer on the mean
            expected = classifier.out_proj(means)
        else:
            expected = classifier(means)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(alone, logits[1:])  # the padding is not averaged in


@pytest.mark.parametrize(
    ("arch", "default_head"),
    [
        ("roberta", 32 * 32 + 32 + 32 * 4 + 4),  # classifier.dense + classifier.out_proj
        ("bert", 32 * 4 + 4),  # the pretrained pooler stays frozen
        ("deberta", 32 * 32 + 32 + 32 * 4 + 4),  # pooler.dense (not in the checkpoints) + classifier
        ("distilbert", 32 * 32 + 32 + 32 * 4 + 4),  # pre_classifier + classifier
        ("modernbert", 32 * 4 + 4),  # the pretrained head (dense, norm) stays frozen
        ("albert", 32 * 4 + 4),  # the pretrained pooler stays frozen
    ],
)
def test_each_head_trains_what_the_budget_counts(
    arch: str, default_head: int, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _folder(arch, tiny_model_dir, tmp_path)
    for head, size in (("default", default_head), ("linear", 32 * 4 + 4), ("mean", 32 * 4 + 4)):
        cfg = ModelConfig(str(folder), head=head)  # type: ignore[arg-type]
        counted = measure(cfg, LABELS, 10**6)
        assert counted.groups["head"] == size, head
        model = build_model(cfg, LABELS)
        assert counted.groups == count_trainable(model, 10**6).groups, head
        trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        assert sum(p.numel() for n, p in model.named_parameters() if n in trained) == size, head


def test_mean_head_without_a_mask_or_a_return_dict(tmp_path: Path) -> None:
    # MPNet's classification model passes return_dict on to its encoder, so the hook sees a tuple
    torch.manual_seed(0)
    MPNetForSequenceClassification(MPNetConfig(**_SMALL, pad_token_id=PAD)).save_pretrained(tmp_path)
    model = build_model(ModelConfig(str(tmp_path), head="mean"), LABELS).eval()
    ids = torch.randint(5, 90, (2, 7))
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
        as_tuple = model(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=False)[0]
        hidden = AutoModel.from_pretrained(tmp_path).eval()(input_ids=ids).last_hidden_state
        expected = model.base_model.model.classifier(hidden.mean(1, keepdim=True))
    torch.testing.assert_close(unmasked, expected)
    torch.testing.assert_close(as_tuple, unmasked)


def test_a_head_the_architecture_cannot_take_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Funnel's head is its own two layers (linear_hidden, linear_out): not one of the six layouts
    funnel = tmp_path / "funnel"
    FunnelConfig(
        vocab_size=100, d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1]
    ).save_pretrained(funnel)
    with pytest.raises(
        BudgetloraError, match="`model.head`=mean is not supported for funnel; use `model.head`=default"
    ):
        build_model(ModelConfig(str(funnel), head="mean"), LABELS, weights=False)
    modernbert = tiny_model("modernbert", tiny_model_dir, tmp_path / "modernbert", pretrain=False)
    with pytest.raises(
        BudgetloraError,
        match="`model.head`=pooler needs a model whose classifier sits on a pretrained pooler",
    ):
        build_model(ModelConfig(str(modernbert), head="pooler"), LABELS, weights=False)


@pytest.mark.parametrize(
    ("arch", "head"), [("distilbert", "linear"), ("modernbert", "mean"), ("albert", "linear")]
)
def test_a_replaced_head_trains_and_reloads(  # type: ignore[no-untyped-def]
    arch: str, head: str, tiny_model_dir: Path, tiny_config, tmp_path: Path
) -> None:
    # A tiny model, "pretrained" as the tiny RoBERTa is, with its tokenizer: DistilBERT's sign split,
    # inline ReLU and split linear layer, ModernBERT's classifier without its head, ALBERT's without
    # its pooler and tanh learn, and the run folder rebuilds that head.
    folder = tiny_model(arch, tiny_model_dir, tmp_path / arch)
    cfg = tiny_config(tmp_path / "run", max_steps=40, eval_every=20)
    cfg = replace(cfg, model=replace(cfg.model, name_or_path=str(folder), head=head))
    result = train(cfg)
    assert result.budget.groups["head"] == 32 * 4 + 4
    assert result.metrics["test"]["accuracy"] > 0.9  # 4 classes: it learned
    again = evaluate(result.run_dir, split="test", output=tmp_path / "eval")
    assert again["accuracy"] == result.metrics["test"]["accuracy"]
    assert again["confusion_matrix"] == result.metrics["test"]["confusion_matrix"]
