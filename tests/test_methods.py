"""Every adapter method (LoRA, VeRA, FourierFT, IA3, LoHa, LoKr) under the same exact budget:
counts on roberta-base shapes worked out by hand, the largest size that fits, a real
train → reload → same predictions round trip on the tiny model, resume, sweep, distill, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from budgetlora.cli import main
from budgetlora.config import (
    FourierFTSettings,
    LohaSettings,
    LokrSettings,
    LoraSettings,
    ModelConfig,
    RunConfig,
    VeraSettings,
    load_config,
)
from budgetlora.data.batching import encode
from budgetlora.errors import BudgetloraError, OverBudgetError
from budgetlora.inference.merged import inference_model, predict_logits
from budgetlora.inference.predict import load_run
from budgetlora.model.budget import count_trainable, measure, resolve_size
from budgetlora.model.methods import METHODS, TITLES, size_cap
from budgetlora.model.modeling import build_model
from budgetlora.model.plan import RECOMMENDED_METHOD, MethodRow, format_method_plan, plan_methods
from budgetlora.reporting.metrics import softmax
from budgetlora.runtime import make_runtime
from budgetlora.training.checkpoint import latest_checkpoint
from budgetlora.training.train import train
from conftest import make_rows

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
HIDDEN, FFN, LAYERS = 768, 3072, 12  # roberta-base
DEFAULT_HEAD = HIDDEN * HIDDEN + HIDDEN + HIDDEN * 4 + 4  # dense + out_proj: 593,668
LINEAR_HEAD = HIDDEN * 4 + 4  # 3,076
# (in, out) of the modules "all" adapts in one layer: query, key, value, attn_out, ffn_in, ffn_out.
ALL_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, FFN), (FFN, HIDDEN)]


def _model(
    path: Path,
    method: str,
    head: str = "default",
    targets: tuple[str, ...] = ("query", "value"),
    **blocks: object,
) -> ModelConfig:
    return ModelConfig(
        str(path),
        head=head,
        method=method,
        lora=LoraSettings(target_modules=targets),
        **blocks,  # type: ignore[arg-type]
    )


def _lokr_params(i: int, o: int, r: int) -> int:
    """LoKr on one (in, out) Linear with decompose_factor -1: W = w1 ⊗ w2, w1 full, w2 low rank
    (out_b x r + r x in_b) until r reaches half of w2's larger side, then full."""

    def split(n: int) -> tuple[int, int]:  # the factor pair nearest the square root, small first
        small = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
        return small, n // small

    (in_a, in_b), (out_a, out_b) = split(i), split(o)
    w2 = out_b * in_b if r >= max(out_b, in_b) / 2 else (out_b + in_b) * r
    return out_a * in_a + w2


# --- exact counts on roberta-base shapes ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "blocks", "adapter", "frozen"),
    [
        # 24 modules (query, value of 12 layers), each 768 x 768.
        ("vera", {"vera": VeraSettings(r=256)}, 24 * (HIDDEN + 256), 256 * HIDDEN + HIDDEN * 256),
        ("fourierft", {"fourierft": FourierFTSettings(n_frequency=1000)}, 24 * 1000, 0),
        ("ia3", {}, 24 * HIDDEN, 0),
        ("loha", {"loha": LohaSettings(r=8)}, 24 * 2 * 8 * (HIDDEN + HIDDEN), 0),
        ("lokr", {"lokr": LokrSettings(r=8)}, 24 * _lokr_params(HIDDEN, HIDDEN, 8), 0),
    ],
)
def test_counts_on_roberta_base_shapes(
    roberta_base_dir: Path, method: str, blocks: dict[str, object], adapter: int, frozen: int
) -> None:
    budget = measure(_model(roberta_base_dir, method, **blocks), LABELS, 1_000_000)
    assert budget.groups == {
        f"{method}.query": adapter // 2,
        f"{method}.value": adapter // 2,
        "head": DEFAULT_HEAD,
    }
    assert budget.trainable == adapter + DEFAULT_HEAD
    assert sum(budget.frozen.values()) == frozen
    if method == "lokr":
        assert adapter == 24 * (24 * 24 + (32 + 32) * 8) == 26_112  # 768 = 24 * 32
    if frozen:  # VeRA's shared random matrices are buffers: listed, never counted
        assert budget.frozen == {"vera.shared_A": 256 * HIDDEN, "vera.shared_B": HIDDEN * 256}
        assert "frozen, not counted" in budget.table()
        assert budget.to_dict()["frozen_not_counted"] == budget.frozen
    else:
        assert "frozen_not_counted" not in budget.to_dict()


@pytest.fixture(scope="module")
def method_rows(roberta_base_dir: Path) -> dict[str, MethodRow]:
    rows = plan_methods(str(roberta_base_dir), 1_000_000, head="linear", targets=("all",))
    return {row.method: row for row in rows}


def test_plan_every_method_on_all_projections_under_one_million(method_rows: dict[str, MethodRow]) -> None:
    """The largest size of each method on all 72 Linear modules with the linear head, by hand."""
    assert list(method_rows) == list(METHODS)
    per_layer_in_out = sum(i + o for i, o in ALL_SHAPES)  # 13,824
    per_layer_out = sum(o for _, o in ALL_SHAPES)  # 6,912
    room = 1_000_000 - LINEAR_HEAD
    expected = {
        # LoRA and LoHa: r * (in + out) per module (LoHa twice over, for its two products).
        "lora": (room // (LAYERS * per_layer_in_out), False),  # 6
        "loha": (room // (LAYERS * 2 * per_layer_in_out), False),  # 3
        # FourierFT: n coefficients per module, 72 modules.
        "fourierft": (room // (LAYERS * 6), False),  # 13,846
        # VeRA: out + r per module; r stops at the smaller side, 768.
        "vera": (HIDDEN, True),
        # IA3: no knob; LoKr: full at r = 32 (ffn's 64 x 32 factor), far below the budget.
        "ia3": (None, False),
        "lokr": (32, True),
    }
    adapter = {
        "lora": LAYERS * 6 * per_layer_in_out,
        "loha": LAYERS * 2 * 3 * per_layer_in_out,
        "fourierft": LAYERS * 6 * 13_846,
        "vera": LAYERS * (per_layer_out + 6 * HIDDEN),
        # output scales, but ffn_out (a feed-forward module) scales its 3,072 inputs
        "ia3": LAYERS * (4 * HIDDEN + FFN + FFN),
        "lokr": LAYERS * sum(_lokr_params(i, o, 32) for i, o in ALL_SHAPES),
    }
    for method, row in method_rows.items():
        assert (row.size, row.capped) == expected[method], method
        assert row.adapter_params == adapter[method], method
        assert row.trainable == adapter[method] + LINEAR_HEAD and row.fits
        assert row.modules == 72
    assert expected["lora"][0] == 6 and expected["loha"][0] == 3 and expected["fourierft"][0] == 13_846
    assert method_rows["fourierft"].trainable == 999_988
    assert method_rows["ia3"].trainable == 113_668 and method_rows["lokr"].trainable == 156_676
    # VeRA at r=768 keeps 2 x 768 x 3,072 frozen (A: r x the widest input; B: the widest output x r).
    assert method_rows["vera"].frozen == {"vera.shared_A": HIDDEN * FFN, "vera.shared_B": FFN * HIDDEN}
    assert method_rows["vera"].options == (
        "`model.method`=vera `model.head`=linear `model.lora.target_modules`=all `model.vera.r`=768"
    )
    assert method_rows["ia3"].settings == {
        "model.method": "ia3",
        "model.head": "linear",
        "model.lora.target_modules": ("all",),
    }


def test_plan_rows_equal_the_models_built_for_training(
    roberta_base_dir: Path, method_rows: dict[str, MethodRow]
) -> None:
    for method, row in method_rows.items():
        cfg = _model(roberta_base_dir, method, head="linear", targets=("all",))
        model = build_model(cfg, LABELS, weights=False, rank=row.size)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == row.trainable, method
        assert count_trainable(model, 1_000_000).groups == row.groups


@pytest.mark.parametrize("method", ["vera", "fourierft", "loha", "lokr"])
def test_auto_size_is_the_largest_that_fits(roberta_base_dir: Path, method: str) -> None:
    """On query, value with the default head (593,668 of 700,000 taken), one size more does not fit."""
    cfg = _model(roberta_base_dir, method)
    size = resolve_size(cfg, LABELS, 700_000)
    assert size is not None and measure(cfg, LABELS, 700_000, rank=size).fits
    cap = size_cap(cfg, [(HIDDEN, HIDDEN)])
    assert size == cap or not measure(cfg, LABELS, 700_000, rank=size + 1).fits
    room = 700_000 - DEFAULT_HEAD  # 106,332
    assert (
        size
        == {
            "vera": HIDDEN,  # 24 * (768 + 768) = 36,864 fits: capped at the smaller side
            "fourierft": room // 24,  # 4,430
            "loha": room // (24 * 2 * 2 * HIDDEN),  # 1
            "lokr": 16,  # 24 * (576 + 1,024) = 38,400: full, capped
        }[method]
    )
    with pytest.raises(OverBudgetError, match="no .* fits the budget of 593,680"):
        resolve_size(cfg, LABELS, 593_680)  # the head alone takes 593,668; size 1 costs 24 or more


def test_skeleton_count_equals_the_real_model(tiny_model_dir: Path) -> None:
    """Real weights on the tiny RoBERTa: requires_grad and buffers equal the weightless count."""
    for method in METHODS:
        for head in ("default", "linear"):
            cfg = _model(tiny_model_dir, method, head=head, targets=("all",), vera=VeraSettings(r=8))
            skeleton = measure(cfg, LABELS, 10**6)
            model = build_model(cfg, LABELS)
            assert skeleton.groups == count_trainable(model, 10**6).groups
            assert skeleton.frozen == count_trainable(model, 10**6).frozen
            assert skeleton.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
            frozen_adapter = sum(b.numel() for n, b in model.named_buffers() if "vera_" in n)
            assert sum(skeleton.frozen.values()) == frozen_adapter  # 2 * 8 * 64 for VeRA, else 0


def test_method_options_are_checked() -> None:
    with pytest.raises(
        BudgetloraError, match="model.method: 'adalora'.*lora, vera, fourierft, ia3, loha, lokr"
    ):
        ModelConfig(method="adalora")  # type: ignore[arg-type]
    with pytest.raises(BudgetloraError, match="lora.use_dora: True .*LoRA only; model.method is vera"):
        ModelConfig(method="vera", lora=LoraSettings(use_dora=True))
    with pytest.raises(BudgetloraError, match="lora.bias: 'all' .*ia3 trains no biases"):
        ModelConfig(method="ia3", lora=LoraSettings(bias="all"))
    with pytest.raises(BudgetloraError, match="vera.r: 0 .*a positive integer or 'auto'"):
        VeraSettings(r=0)
    with pytest.raises(BudgetloraError, match="lokr.decompose_factor"):
        LokrSettings(decompose_factor=0)
    assert ModelConfig(method="vera", lora=LoraSettings(bias="lora_only")).lora.bias == "lora_only"


def test_fourierft_size_beyond_a_matrix_is_a_clear_error(tiny_model_dir: Path) -> None:
    cfg = _model(tiny_model_dir, "fourierft", fourierft=FourierFTSettings(n_frequency=32 * 32 + 1))
    with pytest.raises(BudgetloraError, match="model.method fourierft: .*n_frequency"):
        measure(cfg, LABELS, 10**6)


# --- train -> reload -> the same predictions, on the tiny model ------------------------------

TINY_SIZES: dict[str, dict[str, object]] = {
    "lora": {},
    "vera": {"vera": VeraSettings(r=16)},
    "fourierft": {"fourierft": FourierFTSettings(n_frequency=64)},
    "ia3": {},
    "loha": {"loha": LohaSettings(r=2)},
    "lokr": {"lokr": LokrSettings(r=2)},
}


def _method_cfg(tiny_config, output: Path, method: str, **train: object) -> RunConfig:  # type: ignore[no-untyped-def]
    cfg = tiny_config(output, **{"epochs": 2, "eval_every": None, **train})
    lora = replace(cfg.model.lora, target_modules=("all",))
    return replace(cfg, model=replace(cfg.model, method=method, lora=lora, **TINY_SIZES[method]))


@pytest.fixture(scope="module", params=METHODS)
def trained(request: pytest.FixtureRequest, tiny_config, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return train(_method_cfg(tiny_config, tmp_path_factory.mktemp("runs") / request.param, request.param))


def test_each_method_trains_counts_and_reloads_to_the_same_predictions(trained) -> None:  # type: ignore[no-untyped-def]
    method = trained.cfg.model.method
    assert trained.budget.trainable == sum(p.numel() for p in trained.model.parameters() if p.requires_grad)
    assert all(g.startswith((f"{method}.", "head")) for g in trained.budget.groups)
    recorded = json.loads((trained.run_dir / "budget.json").read_text())
    assert recorded["trainable"] == trained.budget.trainable
    assert ("frozen_not_counted" in recorded) == (method == "vera")
    report = (trained.run_dir / "report.md").read_text()
    assert f" + {TITLES[method]} on " in report.splitlines()[0]  # the title names the method
    assert ("Frozen, not trainable and not counted: `vera.shared_A` 1,024" in report) == (method == "vera")
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.5  # chance is 0.25
    assert load_config(trained.run_dir / "config.yaml").model.method == method

    run = load_run(trained.run_dir, mixed_precision="no")
    assert not any(type(m).__module__.startswith("peft") for m in run.model.modules())  # merged
    texts = [text for text, _ in make_rows(64, seed=11)]
    encoded = encode(texts, None, run.tokenizer, 32)
    reloaded = predict_logits(run.model, encoded, run.runtime)
    in_memory = predict_logits(trained.model, encoded, run.runtime)  # unmerged, as trained
    assert np.array_equal(reloaded.argmax(1), in_memory.argmax(1))
    np.testing.assert_allclose(softmax(reloaded), softmax(in_memory), atol=1e-5)


def test_merging_changes_no_prediction(trained) -> None:  # type: ignore[no-untyped-def]
    runtime = make_runtime("no")
    merged = inference_model(trained.model, runtime, keep=True)
    batch = encode(
        ["market shares profit bank", "team coach goal season"], None, load_run(trained.run_dir).tokenizer, 32
    )
    np.testing.assert_allclose(
        predict_logits(merged, batch, runtime), predict_logits(trained.model, batch, runtime), atol=1e-4
    )
    assert any(p.requires_grad for p in trained.model.parameters())  # keep=True left it trainable


def test_an_interrupted_run_resumes_to_the_same_result(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """VeRA: its frozen shared matrices come back from the checkpoint's run as they were."""

    class Stopped(Exception):
        pass

    def stop(step: int, metrics: dict) -> bool:
        raise Stopped

    cfg = _method_cfg(tiny_config, tmp_path / "stopped", "vera", epochs=1, checkpoint_every=5, eval_every=12)
    with pytest.raises(Stopped):
        train(cfg, on_eval=stop)
    assert latest_checkpoint(tmp_path / "stopped").name == "step-00000010"  # type: ignore[union-attr]
    resumed = train(cfg, resume=True)
    straight = train(replace(cfg, output=str(tmp_path / "straight")))
    assert resumed.metrics["validation"] == straight.metrics["validation"]
    assert resumed.metrics["test"] == straight.metrics["test"]
    assert (tmp_path / "stopped" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "straight" / "adapter_model.safetensors"
    ).read_bytes()


def test_auto_size_trains_the_largest_that_fits(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Tiny RoBERTa (hidden 32, ffn 64, 2 layers), all 12 Linear modules, default head 1,188.
    # FourierFT costs 12 n: under 5,000, n = (5,000 - 1,188) // 12 = 317.
    cfg = _method_cfg(tiny_config, tmp_path / "auto", "fourierft", epochs=1)
    cfg = replace(
        cfg, budget=5_000, model=replace(cfg.model, fourierft=FourierFTSettings(n_frequency="auto"))
    )
    result = train(cfg)
    assert result.cfg.model.fourierft.n_frequency == 317
    assert result.budget.trainable == 12 * 317 + 1_188 == 4_992
    assert load_config(result.run_dir / "config.yaml").model.fourierft.n_frequency == 317


# --- sweep, distillation and the command line -------------------------------------------------


def test_sweep_searches_the_method(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from budgetlora.training.sweep import sweep

    cfg = replace(tiny_config(tmp_path / "ignored", epochs=1, eval_every=9), budget=5_000)
    space = {"model.method": ["vera", "ia3", "loha"], "vera.r": "auto", "loha.r": 64}
    result = sweep(cfg, space, n_trials=3, output=tmp_path / "sweep", sampler="grid")
    by_method = {t.params["model.method"]: t for t in result.study.trials}
    assert set(by_method) == {"vera", "ia3", "loha"}
    # query, value on 2 layers (4 modules of 32 x 32) + the default head 1,188:
    assert by_method["vera"].user_attrs["trainable"] == 4 * (32 + 32) + 1_188  # vera.r auto = 32
    assert by_method["ia3"].user_attrs["trainable"] == 4 * 32 + 1_188
    assert by_method["loha"].state.name == "PRUNED"  # 4 * 2 * 64 * 64 = 32,768: over budget, untrained
    assert by_method["loha"].user_attrs["note"].startswith("over budget:")
    vera_dir = tmp_path / "sweep" / f"trial-{by_method['vera'].number:04d}"
    assert load_config(vera_dir / "config.yaml").model.vera.r == 32


def test_distill_a_vera_student_from_a_loha_teacher(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from budgetlora.training.distill import distill

    teacher = train(_method_cfg(tiny_config, tmp_path / "teacher", "loha", epochs=1))
    student = _method_cfg(tiny_config, tmp_path / "student", "vera", epochs=1)
    result = distill(student, str(teacher.run_dir), alpha=0.5, temperature=2.0)
    record = json.loads((tmp_path / "student" / "distill.json").read_text())
    assert record["teacher"]["trainable"] == teacher.budget.trainable
    assert record["student"]["trainable"] == result.student.budget.trainable
    assert record["teacher"]["test"]["accuracy"] == pytest.approx(teacher.metrics["test"]["accuracy"])
    assert load_run(tmp_path / "student").model is not None


def test_cli_method_flags(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", str(tiny_model_dir), "--data", str(tiny_data_csv), "--set", "data.test_size=0.2",
              "--max-length", "32", "--no-progress", "--mixed-precision", "no"]  # fmt: skip
    out = tmp_path / "cli"
    code = main(["train", *common, "--output", str(out), "--method", "loha", "--loha-r", "auto",
                 "--budget", "3000", "--max-steps", "3", "--target-modules", "query,value"])  # fmt: skip
    assert code == 0
    # LoHa on 4 modules of 32 x 32 costs 4 * 2 * r * (32 + 32) = 512 r: 512 r + 1,188 <= 3,000 at r = 3.
    assert load_config(out / "config.yaml").model.loha.r == (3_000 - 1_188) // (4 * 2 * 64)
    assert "loha.query" in capsys.readouterr().out

    with pytest.raises(SystemExit) as refused:  # argparse's own choice check, from model.method's Literal
        main(["train", *common, "--output", str(tmp_path / "bad"), "--method", "adalora"])
    assert refused.value.code == 2
    assert "--method: invalid choice: 'adalora' (choose from 'lora', 'vera'" in capsys.readouterr().err
    assert main(["train", *common, "--output", str(tmp_path / "bad"), "--method", "vera", "--dora"]) == 2
    assert "LoRA only" in capsys.readouterr().err
    code = main(["train", *common, "--output", str(tmp_path / "bad"), "--method", "vera", "--vera-r", "5000",
                 "--budget", "1400"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    # 4 * (32 + r) + 1,188 <= 1,400 at r = 21; with the linear head (132) r stops at the side, 32.
    assert "over budget" in err and "would fit: --vera-r 21; or --head linear with --vera-r 32" in err

    assert main(["plan", "--model", str(tiny_model_dir), "--budget", "5000", "--methods"]) == 0
    table = capsys.readouterr().out
    for method in METHODS:
        assert f"\n{method} " in table
    assert "budgetlora train --method lora --head linear --target-modules all --lora-r" in table
    assert (
        main(["plan", "--model", str(tiny_model_dir), "--budget", "5000", "--methods", "--format", "json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == list(METHODS) and all(r["fits"] for r in rows)


def test_format_method_plan_styles(method_rows: dict[str, MethodRow]) -> None:
    rows = list(method_rows.values())
    markdown = format_method_plan(rows, "markdown")
    assert markdown.splitlines()[0].startswith("| method | size knob | size |")
    assert "| vera | vera.r | 768* |" in markdown and "4,718,592" in markdown
    csv_text = format_method_plan(rows, "csv").splitlines()
    assert len(csv_text) == 1 + len(METHODS) and csv_text[0].startswith("method,head,targets")
    assert json.loads(format_method_plan(rows, "json"))[0]["options"].startswith("`model.method`=lora")
    with pytest.raises(BudgetloraError, match="`format`"):
        format_method_plan(rows, "html")  # type: ignore[arg-type]

    # The method that measured best (RECOMMENDED_METHOD, from benchmarks/methods.py) is marked once.
    recommended = [r.method for r in rows if r.recommended]
    assert recommended == [RECOMMENDED_METHOD.method]
    table = format_method_plan(rows)
    marked = [line for line in table.splitlines() if line.endswith("<- recommended")]
    assert len(marked) == 1 and marked[0].startswith(RECOMMENDED_METHOD.method + " ")
    assert f"<- recommended: {RECOMMENDED_METHOD.why}" in table
    assert f"| **{RECOMMENDED_METHOD.method}** (recommended) |" in markdown
    assert [r["recommended"] for r in json.loads(format_method_plan(rows, "json"))] == [
        r.method == RECOMMENDED_METHOD.method for r in rows
    ]
    assert "recommended" in csv_text[0].split(",")


def test_plan_methods_refuses_bad_arguments(roberta_base_dir: Path) -> None:
    with pytest.raises(BudgetloraError, match="unknown method 'adalora'"):
        plan_methods(str(roberta_base_dir), 10**6, methods=("adalora",))
    rows = plan_methods(str(roberta_base_dir), 100_000, head="default", methods=("vera", "ia3"))
    assert [r.fits for r in rows] == [False, False] and rows[0].size is None and rows[0].options == ""
