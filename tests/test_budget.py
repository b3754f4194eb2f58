"""Exact trainable-parameter counts, the over-budget refusal, and role-name targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    FunnelConfig,
    MPNetConfig,
    RobertaConfig,
)

from budgetlora.config import LoraSettings, ModelConfig
from budgetlora.errors import BudgetloraError, OverBudgetError
from budgetlora.model.budget import check_budget, count_trainable, measure, resolve_rank
from budgetlora.model.modeling import build_model, resolve_targets

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def _cfg(path: Path, **lora: object) -> ModelConfig:
    return ModelConfig(str(path), lora=LoraSettings(**lora))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rank", "targets", "expected"),
    [
        (8, ("query", "value"), 888_580),  # 12 layers * 2 * 8 * (768 + 768) + head 593,668
        (6, ("query", "value"), 814_852),
        (2, ("query",), 630_532),
        (4, ("query", "value"), 741_124),
    ],
)
def test_roberta_base_counts(
    roberta_base_dir: Path, rank: int, targets: tuple[str, ...], expected: int
) -> None:
    budget = measure(_cfg(roberta_base_dir, r=rank, target_modules=targets), LABELS, 1_000_000)
    assert budget.trainable == expected
    assert budget.groups["head"] == 768 * 768 + 768 + 768 * 4 + 4 == 593_668
    assert budget.groups["lora.query"] == 12 * rank * (768 + 768)


def test_breakdown_groups_biases_and_dora(roberta_base_dir: Path) -> None:
    budget = measure(
        _cfg(roberta_base_dir, r=4, target_modules=("query", "value"), bias="lora_only"), LABELS, 10**6
    )
    assert budget.groups["bias"] == 12 * 2 * 768
    dora = measure(
        _cfg(roberta_base_dir, r=4, target_modules=("query", "value"), use_dora=True), LABELS, 10**6
    )
    assert dora.trainable == 741_124 + 12 * 2 * 768  # one magnitude per output feature


def test_skeleton_count_equals_built_model(tiny_model_dir: Path) -> None:
    for head in ("default", "linear"):
        for targets in (("query", "value"), ("all",), ("attention.output.dense",)):
            cfg = ModelConfig(str(tiny_model_dir), head=head, lora=LoraSettings(r=3, target_modules=targets))  # type: ignore[arg-type]
            skeleton = measure(cfg, LABELS, 10**6)
            model = build_model(cfg, LABELS)
            assert skeleton.groups == count_trainable(model, 10**6).groups
            assert skeleton.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_over_budget_refusal_names_what_fits(roberta_base_dir: Path) -> None:
    cfg = _cfg(roberta_base_dir, r=16, target_modules=("query", "key", "value"))
    budget = measure(cfg, LABELS, 1_000_000)
    assert budget.trainable == 593_668 + 12 * 3 * 16 * 1536
    with pytest.raises(OverBudgetError) as info:
        check_budget(budget, cfg, LABELS)
    message = str(info.value)
    assert "1,478,404" in message and "lora.key" in message and "`model.lora.r`=7" in message
    assert OverBudgetError.exit_code == 2


def test_auto_rank_is_the_largest_that_fits(roberta_base_dir: Path) -> None:
    cfg = _cfg(roberta_base_dir, r=8, target_modules=("query", "value"))
    rank = resolve_rank(cfg, LABELS, 1_000_000)
    assert rank == (1_000_000 - 593_668) // (12 * 2 * 1536) == 11
    assert measure(cfg, LABELS, 10**6, rank=rank).fits
    assert not measure(cfg, LABELS, 10**6, rank=rank + 1).fits


def test_linear_head_count(roberta_base_dir: Path) -> None:
    cfg = ModelConfig(
        str(roberta_base_dir), head="linear", lora=LoraSettings(r=8, target_modules=("query", "value"))
    )
    assert measure(cfg, LABELS, 10**6).groups["head"] == 768 * 4 + 4


_SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
}
_ARCHES = {
    "roberta": (
        RobertaConfig(**_SMALL),
        "attention.self.query",
        "attention.output.dense",
        "intermediate.dense",
    ),
    "bert": (BertConfig(**_SMALL), "attention.self.query", "attention.output.dense", "intermediate.dense"),
    "mpnet": (MPNetConfig(**_SMALL), "attention.attn.q", "attention.attn.o", "intermediate.dense"),
    "distilbert": (
        DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        "attention.q_lin",
        "attention.out_lin",
        "ffn.lin1",
    ),
}


@pytest.mark.parametrize("arch", sorted(_ARCHES))
def test_role_names_map_to_each_architecture(arch: str, tmp_path: Path) -> None:
    config, query, attn_out, ffn_in = _ARCHES[arch]
    config.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    found = resolve_targets(model, ["query"])
    assert len(found) == 2 and all(n.endswith(query) for n in found)
    assert all(n.endswith(attn_out) for n in resolve_targets(model, ["attn_out"]))
    assert all(n.endswith(ffn_in) for n in resolve_targets(model, ["ffn_in"]))
    assert len(resolve_targets(model, ["attention"])) == 2 * 4
    assert len(resolve_targets(model, ["all"])) == 2 * 6
    assert len(resolve_targets(model, ["query"], layers=[1])) == 1
    # A raw module name keeps working, as in peft.
    assert resolve_targets(model, [query.rsplit(".", 1)[-1]]) == found
    # And the built adapter has exactly those modules.
    budget = measure(
        ModelConfig(str(tmp_path), lora=LoraSettings(r=2, target_modules=("all",))), LABELS, 10**6
    )
    assert set(budget.groups) >= {
        "lora.query",
        "lora.key",
        "lora.value",
        "lora.attn_out",
        "lora.ffn_in",
        "lora.ffn_out",
    }


def test_unknown_target_lists_the_model_names(tiny_model_dir: Path) -> None:
    with pytest.raises(
        BudgetloraError, match="role names it has: .*query.*module names: .*attention.self.query"
    ):
        measure(ModelConfig(str(tiny_model_dir), lora=LoraSettings(target_modules=("qkv",))), LABELS, 10**6)


def test_albert_roles_adapt_the_one_layer_its_layers_share(tmp_path: Path) -> None:
    # ALBERT runs the same layer (one layer group) num_hidden_layers times: one adapter per role
    AlbertConfig(**_SMALL, embedding_size=16).save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(AlbertConfig(**_SMALL, embedding_size=16))
    shared = "albert.encoder.albert_layer_groups.0.albert_layers.0."
    leaves = ["attention.query", "attention.key", "attention.value", "attention.dense", "ffn", "ffn_output"]
    assert resolve_targets(model, ["all"]) == [shared + leaf for leaf in leaves]
    assert resolve_targets(model, ["query", "value"], layers=[0]) == [
        shared + "attention.query",
        shared + "attention.value",
    ]
    budget = measure(_cfg(tmp_path, r=2, target_modules=("all",)), LABELS, 10**6)
    # 2 * (32 + 32) for each attention matrix, 2 * (32 + 64) for each feed-forward one; the head: classifier only
    assert budget.trainable == 4 * 2 * 64 + 2 * 2 * 96 + 32 * 4 + 4


def test_a_model_without_known_roles_lists_its_module_names(tmp_path: Path) -> None:
    FunnelConfig(
        vocab_size=100, d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1]
    ).save_pretrained(tmp_path)
    with pytest.raises(
        BudgetloraError,
        match="no role names are known for its modules: name them; module names: .*attention.q_head",
    ):
        measure(_cfg(tmp_path), LABELS, 10**6)
    # a raw module name, as in peft, works there
    assert (
        measure(_cfg(tmp_path, r=2, target_modules=("q_head",)), LABELS, 10**6).groups["lora.q_head"]
        == 2 * 2 * 64
    )


def test_layer_out_of_range(tiny_model_dir: Path) -> None:
    with pytest.raises(BudgetloraError, match=r"lora.layers: \[5\] out of range; this model has layers 0..1"):
        measure(ModelConfig(str(tiny_model_dir), lora=LoraSettings(layers=(0, 5))), LABELS, 10**6)


def test_rank_pattern_gives_upper_layers_more_rank(roberta_base_dir: Path) -> None:
    # peft's rank_pattern: keys are regexes over module names. Rank 16 in layers 10-11, 4 elsewhere.
    cfg = _cfg(
        roberta_base_dir, r=4, target_modules=("query", "value"), rank_pattern={r"layer\.(10|11)\..*": 16}
    )
    budget = measure(cfg, LABELS, 1_000_000)
    assert budget.groups["lora.query"] == 10 * 4 * 1536 + 2 * 16 * 1536
    assert budget.trainable == 593_668 + 2 * (10 * 4 + 2 * 16) * 1536


@pytest.mark.parametrize(
    ("config", "limit"),
    [
        (RobertaConfig(max_position_embeddings=514), 512),  # roberta-base: pad_token_id + 1 = 2 reserved
        (MPNetConfig(max_position_embeddings=514), 512),
        (BertConfig(max_position_embeddings=64), 64),
        (DistilBertConfig(), 512),
    ],
)
def test_max_sequence_length_from_the_config(config: object, limit: int) -> None:
    from transformers import DebertaV2Config

    from budgetlora.model.modeling import max_sequence_length

    assert max_sequence_length(config) == limit  # type: ignore[arg-type]
    assert max_sequence_length(DebertaV2Config(position_biased_input=False)) is None  # relative positions


def test_max_length_beyond_the_position_embeddings_is_refused(tmp_path: Path) -> None:
    from budgetlora.model.modeling import check_max_length

    roberta = tmp_path / "roberta-base"
    RobertaConfig(max_position_embeddings=514).save_pretrained(roberta)  # as roberta-base's config.json
    check_max_length(_cfg(roberta), 512)
    with pytest.raises(BudgetloraError) as excinfo:
        check_max_length(_cfg(roberta), 2048)
    assert str(excinfo.value) == (
        f"data.max_length=2048 is more than {str(roberta)!r} can read: at most 512 tokens"
        " (max_position_embeddings 514 less pad_token_id + 1 = 2, the positions roberta reserves for"
        " padding); use `data.max_length`=512 or less"
    )
    bert = tmp_path / "bert"
    BertConfig(max_position_embeddings=64).save_pretrained(bert)
    with pytest.raises(BudgetloraError, match=r"at most 64 tokens \(max_position_embeddings 64\)"):
        check_max_length(_cfg(bert), 65)
    check_max_length(_cfg(tmp_path / "missing"), 10**6)  # no config to read: loading it fails later
