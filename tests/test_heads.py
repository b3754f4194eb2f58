"""The heads on the three head layouts: BERT's pretrained pooler + classifier, RoBERTa's dense +
out_proj, DeBERTa's untrained pooler + classifier. The mean head reads the mean of the real
tokens, so padding changes nothing; every head trains exactly what the budget counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
)

from budgetlora.budget import count_trainable, measure
from budgetlora.config import ModelConfig
from budgetlora.modeling import build_model

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
PAD = 1  # the tiny RoBERTa's <pad>; the tiny BERT and DeBERTa are given the same pad id
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
    torch.manual_seed(0)
    if arch == "bert":
        BertForSequenceClassification(BertConfig(**_SMALL, pad_token_id=PAD)).save_pretrained(tmp_path)
    else:
        DebertaV2ForSequenceClassification(DebertaV2Config(**_SMALL, pad_token_id=PAD)).save_pretrained(
            tmp_path
        )
    return tmp_path


@pytest.mark.parametrize("arch", ["roberta", "bert", "deberta"])
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
        expected = classifier(means.unsqueeze(1)) if arch == "roberta" else classifier(means)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(alone, logits[1:])  # the padding is not averaged in


@pytest.mark.parametrize(
    ("arch", "default_head"),
    [
        ("roberta", 32 * 32 + 32 + 32 * 4 + 4),  # classifier.dense + classifier.out_proj
        ("bert", 32 * 4 + 4),  # the pretrained pooler stays frozen
        ("deberta", 32 * 32 + 32 + 32 * 4 + 4),  # pooler.dense (not in the checkpoints) + classifier
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
