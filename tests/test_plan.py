"""The budget planner: every row's count is the count of the model that training builds."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from transformers import BertConfig, RobertaConfig

from budgetlora.cli import main
from budgetlora.config import LoraSettings, ModelConfig
from budgetlora.errors import BudgetloraError, OverBudgetError
from budgetlora.model.budget import count_trainable, measure
from budgetlora.model.modeling import build_model
from budgetlora.model.plan import PlanRow, format_plan, plan
from commands import cli

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
BUDGET = 1_000_000
# roberta-base, default head + LoRA on query,value at the largest rank that fits 1,000,000.
ROBERTA_QV_ROW = ["default", "query,value", "all", "24", "11", "405,504", "593,668", "999,172", "99.9%"]
# roberta-base: in + out features of each adapted Linear, by role (LoRA costs r * (in + out)).
ROBERTA_IN_OUT = {
    "query": 768 + 768,
    "key": 768 + 768,
    "value": 768 + 768,
    "attn_out": 768 + 768,
    "ffn_in": 768 + 3072,
    "ffn_out": 3072 + 768,
}
ROLES_OF = {
    ("query", "value"): ("query", "value"),
    ("query", "key", "value"): ("query", "key", "value"),
    ("attention",): ("query", "key", "value", "attn_out"),
    ("all",): tuple(ROBERTA_IN_OUT),
}
ROBERTA_HEADS = {"default": 768 * 768 + 768 + 768 * 4 + 4, "linear": 768 * 4 + 4}


@pytest.fixture(scope="module")
def roberta_plan(roberta_base_dir: Path) -> list[PlanRow]:
    return plan(str(roberta_base_dir), BUDGET)


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-roberta-config")
    RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(folder)
    return folder


def _row_cfg(path: Path, row: PlanRow) -> ModelConfig:
    lora = LoraSettings(target_modules=row.targets, layers=row.layers)
    return ModelConfig(str(path), head=row.head, lora=lora)  # type: ignore[arg-type]


def test_roberta_base_rows_match_the_arithmetic(roberta_plan: list[PlanRow]) -> None:
    assert [(r.head, r.targets, r.layers) for r in roberta_plan] == [
        (head, targets, layers)
        for head in ("default", "linear")  # no pretrained pooler on RoBERTa: no pooler rows
        for targets in ROLES_OF
        for layers in (None, (6, 7, 8, 9, 10, 11))
    ]
    for row in roberta_plan:
        n_layers = 12 if row.layers is None else 6
        per_rank = n_layers * sum(ROBERTA_IN_OUT[role] for role in ROLES_OF[row.targets])
        head = ROBERTA_HEADS[row.head]
        assert row.rank == (BUDGET - head) // per_rank
        assert row.head_params == head
        assert row.lora_params == row.rank * per_rank
        assert row.trainable == head + row.rank * per_rank <= BUDGET < head + (row.rank + 1) * per_rank
        assert row.modules == n_layers * len(ROLES_OF[row.targets])
        assert row.fits and not row.capped and row.share == row.trainable / BUDGET
    by_key = {(r.head, r.targets, r.layers): r for r in roberta_plan}
    assert by_key[("default", ("query", "value"), None)].trainable == 999_172  # r=11
    assert by_key[("linear", ("attention",), None)].rank == 13
    assert by_key[("linear", ("attention",), None)].trainable == 961_540
    assert by_key[("linear", ("all",), None)].rank == 6
    assert by_key[("linear", ("all",), None)].trainable == 998_404


def test_roberta_base_rows_equal_the_model_built_for_training(
    roberta_base_dir: Path, roberta_plan: list[PlanRow]
) -> None:
    for row in roberta_plan[::3]:  # six rows across both heads, all target sets, both layer choices
        assert row.rank is not None
        model = build_model(_row_cfg(roberta_base_dir, row), LABELS, weights=False, rank=row.rank)
        assert count_trainable(model, BUDGET).groups == row.groups
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == row.trainable


def test_tiny_model_rows_equal_the_model_built_for_training(tiny_model_dir: Path) -> None:
    rows = plan(str(tiny_model_dir), 3_000)
    assert {r.head for r in rows} == {"default", "linear"} and len(rows) == 16
    for row in rows:
        assert row.rank is not None and row.fits and not row.capped
        cfg = _row_cfg(tiny_model_dir, row)
        built = count_trainable(build_model(cfg, LABELS, rank=row.rank), 3_000)  # real weights
        assert built.groups == row.groups and built.trainable == row.trainable <= 3_000
        assert not measure(cfg, LABELS, 3_000, rank=row.rank + 1).fits


def test_rank_stops_at_full_rank(tiny_model_dir: Path) -> None:
    """Hidden size 32: a rank above 32 would fit a 1M budget but cannot add rank to the update."""
    rows = plan(str(tiny_model_dir), BUDGET, target_sets=[("query", "value")])
    assert [(r.head, r.layers, r.rank, r.capped) for r in rows] == [
        ("default", None, 32, True),
        ("default", (1,), 32, True),
        ("linear", None, 32, True),
        ("linear", (1,), 32, True),
    ]
    model = build_model(_row_cfg(tiny_model_dir, rows[0]), LABELS, rank=32)
    assert count_trainable(model, BUDGET).trainable == rows[0].trainable == 32 * 4 * 64 + 32 * 32 + 32 + 132
    assert "32*" in format_plan(rows) and "full rank" in format_plan(rows)


def test_bert_pooler_head_is_folded_into_default(tmp_path: Path) -> None:
    BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    rows = plan(str(tmp_path), 5_000, target_sets=[("query", "value")])
    assert [(r.head, r.same_heads) for r in rows] == [
        ("default", ("pooler",)),
        ("default", ("pooler",)),
        ("linear", ("mean",)),
        ("linear", ("mean",)),
    ]
    pooler = measure(
        ModelConfig(str(tmp_path), head="pooler", lora=LoraSettings(target_modules=("query", "value"))),
        LABELS,
        5_000,
        rank=rows[0].rank,
    )
    assert pooler.groups == rows[0].groups and rows[0].head_params == 32 * 4 + 4
    mean = measure(
        ModelConfig(str(tmp_path), head="mean", lora=LoraSettings(target_modules=("query", "value"))),
        LABELS,
        5_000,
        rank=rows[2].rank,
    )
    assert mean.groups == rows[2].groups and rows[2].head_params == 32 * 4 + 4
    table = format_plan(rows).splitlines()
    assert table[1].startswith("default = pooler  query,value") and table[3].startswith("linear = mean")
    assert table[-2] == (
        "a = b: these `model.head` values train the same parameters (linear reads the first token, mean the mean "
        "of the tokens; the model's own head is its frozen pretrained pooler + one linear layer)"
    )


def test_rows_that_do_not_fit_are_marked(roberta_base_dir: Path) -> None:
    rows = plan(str(roberta_base_dir), 600_000, target_sets=[("query", "value")])
    default_all, _, linear_all, _ = rows
    assert default_all.rank is None and not default_all.fits and default_all.options == ""
    assert default_all.trainable == 593_668 + 24 * 1536  # its count at rank 1
    assert linear_all.rank == (600_000 - 3_076) // (24 * 1536) == 16 and linear_all.fits
    table = format_plan(rows)
    assert table.splitlines()[1].endswith("630,532  does not fit")
    assert "not even at rank 1" in table


def test_nothing_fits_is_a_clear_error(tiny_config_dir: Path) -> None:
    # smallest: linear head (32*4 + 4) + query,value on layer 1 at rank 1 (2 * 64)
    with pytest.raises(OverBudgetError, match=r"nothing fits a budget of 100 trainable .* takes 260"):
        plan(str(tiny_config_dir), 100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "`budget`: 0"),
        ({"budget": 10**6, "labels": 1}, "`labels`: 1"),
        ({"budget": 10**6, "heads": ("mlp",)}, "unknown head 'mlp'"),
    ],
)
def test_bad_arguments(tiny_config_dir: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BudgetloraError, match=message):
        plan(str(tiny_config_dir), **kwargs)  # type: ignore[arg-type]


def test_format_plan_styles(roberta_plan: list[PlanRow]) -> None:
    rows = roberta_plan[:3]
    records = json.loads(format_plan(rows, "json"))
    assert records == [row.to_dict() for row in rows]
    assert (
        records[0]["options"]
        == "`model.head`=default `model.lora.target_modules`=query,value `model.lora.r`=11"
    )
    assert rows[0].settings == {
        "model.head": "default",
        "model.lora.target_modules": ("query", "value"),
        "model.lora.r": 11,
    }
    assert records[1]["layers"] == [6, 7, 8, 9, 10, 11]
    parsed = list(csv.DictReader(io.StringIO(format_plan(rows, "csv"))))
    assert [(r["targets"], r["layers"], r["rank"], r["trainable"]) for r in parsed] == [
        ("query,value", "all", "11", "999172"),
        ("query,value", "6-11", "22", "999172"),
        ("query,key,value", "all", "7", "980740"),
    ]
    markdown = format_plan(rows, "markdown").splitlines()
    assert (
        markdown[0].startswith("| head | targets | layers |") and len(markdown) == 2 + 3 + 2
    )  # + a blank line, the note
    assert markdown[2] == (
        "| **default** (recommended) | query,value | all | 24 | 11 | 405,504 | 593,668 | 999,172 | 99.9% |"
    )
    assert markdown[-1].startswith("<- recommended: the model's own head + LoRA on query,value")
    table = format_plan(rows).splitlines()
    assert table[0].split() == [
        "head", "targets", "layers", "modules", "rank", "LoRA", "head", "params", "trainable", "of", "budget"
    ]  # fmt: skip
    assert table[1].split() == [*ROBERTA_QV_ROW, "<-", "recommended"]
    assert [r["recommended"] for r in records] == [True, False, False]
    with pytest.raises(BudgetloraError, match="`format`"):
        format_plan(rows, "html")  # type: ignore[arg-type]


def test_the_measured_recipe_is_the_one_recommended_row(
    roberta_base_dir: Path, roberta_plan: list[PlanRow]
) -> None:
    """The row of RECOMMENDED (the model's head, LoRA on query,value, every layer) is marked, and
    only where it fits the budget."""
    from budgetlora.model.plan import RECOMMENDED

    marked = [r for r in roberta_plan if r.recommended]
    assert [(r.head, r.targets, r.layers) for r in marked] == [(RECOMMENDED.head, RECOMMENDED.targets, None)]
    assert "benchmarks/results/quality_" in RECOMMENDED.why
    # The smaller budgets plan the recommended targets (and the attention set) only: the rows that change.
    targets = [RECOMMENDED.targets, ("attention",)]
    # 750,000 leaves the model's own head (593,668) room for LoRA on query,value at rank 4 only.
    middle = plan(str(roberta_base_dir), 750_000, target_sets=targets)
    assert [r.rank for r in middle if r.recommended] == [4]
    # Under the head's own size nothing with it fits: no row is recommended, the linear head's rows remain.
    small = plan(str(roberta_base_dir), 500_000, target_sets=targets)
    assert small and not any(r.recommended for r in small) and "<- recommended" not in format_plan(small)


def test_cli_plan_from_a_config_only_folder(roberta_base_dir: Path) -> None:
    result = cli("plan", "--model", str(roberta_base_dir), "--budget", "1000000")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "a budget of 1,000,000 trainable parameters" in lines[0]
    assert lines[2].split()[:2] == ["head", "targets"]
    assert lines[3].split() == [*ROBERTA_QV_ROW, "<-", "recommended"]
    assert any(
        "<- recommended: the model's own head" in line and "quality_all-mpnet-base-v2" in line
        for line in lines
    )
    assert len([line for line in lines if line.startswith(("default ", "linear "))]) == 16


def test_cli_plan_too_small_a_budget(tiny_config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (the subprocess path is covered above): the CLI's error handling, exit code 2.
    assert main(["plan", "--model", str(tiny_config_dir), "--budget", "100", "--format", "json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert "budgetlora plan: error: nothing fits a budget of 100" in err
    assert "Raise --budget to at least 260" in err
