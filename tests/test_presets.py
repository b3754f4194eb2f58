"""The published course recipes in configs/presets/: the exact trainable count of each on
roberta-base (or its refusal), and a short CPU run of each on the tiny model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from budgetlora.config import RunConfig, load_config
from budgetlora.errors import OverBudgetError
from budgetlora.model.budget import check_budget, measure
from budgetlora.training.train import train
from commands import cli

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "presets"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
HEAD = 768 * 768 + 768 + 768 * 4 + 4  # roberta-base's own head, 4 labels: 593,668
QV = 768 + 768  # LoRA on a 768x768 projection costs r * (768 + 768)

# Exact trainable parameters on roberta-base with 4 labels; LoRA costs r * (in + out) per
# adapted Linear, bias lora_only adds the biases of the adapted modules.
COUNTS = {
    "filtered-qv-r6": 814_852,  # 12 layers * 2 (q, v) * 6 * 1536 = 221,184 + head
    "targeted-layers-r12": 777_988,  # 5 layers * 2 (q, k) * 12 * 1536 = 184,320 + head
    "targeted-layers-r12-teacher": 716_548,  # 5 * 2 * 8 * 1536 = 122,880 + head
    "targeted-layers-r12-distill-student": 839_428,  # 5 * 2 * 16 * 1536 = 245,760 + head
    "adam-r4-lora-only": 759_556,  # 12 * 2 * 4 * 1536 = 147,456 + biases 12 * 2 * 768 = 18,432 + head
    "qv-r4-cosine": 741_124,  # 12 * 2 * 4 * 1536 = 147,456 + head
    "starter": 630_532,  # 12 * 1 (q) * 2 * 1536 = 36,864 + head
}
# wide-r16, per layer: q, k, v, attention.output.dense 4 * 16 * 1536 = 98,304; intermediate.dense
# and the FFN's output.dense 2 * 16 * (768 + 3072) = 122,880; 12 layers = 2,654,208; biases of the
# adapted modules 12 * (5 * 768 + 3072) = 82,944; + head = 3,330,820 ("about 3.3M").
WIDE = 12 * (4 * 16 * QV + 2 * 16 * (768 + 3072)) + 12 * (5 * 768 + 3072) + HEAD


def _preset(name: str, model_dir: Path) -> RunConfig:
    cfg = load_config(PRESETS / f"{name}.yaml")
    return replace(cfg, model=replace(cfg.model, name_or_path=str(model_dir)))


def test_every_preset_file_is_tested() -> None:
    assert {p.stem for p in PRESETS.glob("*.yaml")} == {*COUNTS, "wide-r16"}


def test_hand_counts() -> None:
    assert HEAD == 593_668 and WIDE == 3_330_820
    assert COUNTS["starter"] == 12 * 2 * QV + HEAD
    assert COUNTS["adam-r4-lora-only"] == 12 * 2 * 4 * QV + 12 * 2 * 768 + HEAD


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_roberta_base_count(name: str, roberta_base_dir: Path) -> None:
    cfg = _preset(name, roberta_base_dir)
    budget = measure(cfg.model, LABELS, cfg.budget)
    assert budget.trainable == COUNTS[name]
    assert budget.groups["head"] == HEAD
    check_budget(budget, cfg.model, LABELS)  # fits: no error
    header = (PRESETS / f"{name}.yaml").read_text().split("\nmodel:")[0]
    assert f"{COUNTS[name]:,} trainable" in header
    assert f"--config configs/presets/{name}.yaml" in header


def test_wide_r16_is_refused_with_its_breakdown(roberta_base_dir: Path) -> None:
    cfg = _preset("wide-r16", roberta_base_dir)
    budget = measure(cfg.model, LABELS, cfg.budget)
    assert budget.trainable == WIDE
    assert budget.groups["lora.ffn_in"] == budget.groups["lora.ffn_out"] == 12 * 16 * (768 + 3072)
    assert budget.groups["lora.attn_out"] == 12 * 16 * QV  # output.dense matched both, as in peft
    with pytest.raises(OverBudgetError) as info:
        check_budget(budget, cfg.model, LABELS)
    message = str(info.value)
    assert "3,330,820 trainable parameters > budget 1,000,000" in message
    assert "lora.ffn_out" in message and "OVER by 2,330,820" in message
    assert "`model.lora.r`=1" in message  # (10**6 - 82,944 - HEAD) // 165,888 per rank = 1
    assert "3,330,820 trainable" in (PRESETS / "wide-r16.yaml").read_text()


def test_wide_r16_run_is_refused_before_any_file(
    roberta_base_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    # At roberta-base's shapes: on the 2-layer tiny model the same recipe is far under 1M.
    # The folder holds no weights, so the refusal also shows that none were read.
    cfg = _preset("wide-r16", roberta_base_dir)
    cfg = replace(cfg, data=replace(cfg.data, source=str(tiny_data_csv)), output=str(tmp_path / "run"))
    with pytest.raises(OverBudgetError, match="OVER by 2,330,820"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []


def _short(name: str, model_dir: Path, data: Path, output: Path) -> RunConfig:
    """The preset on the tiny model and data: 6 steps, layers that exist in 2 layers."""
    cfg = _preset(name, model_dir)
    lora = cfg.model.lora
    layers = None if lora.layers is None else (0, 1)
    # filtered-qv-r6 keeps rows of 25..90 words; tiny rows have 5..20, so min_words is relaxed
    # to 8 (max_words 90 and the 0.70 unique-word ratio stay as they are).
    min_words = None if cfg.data.min_words is None else 8
    return replace(
        cfg,
        model=replace(cfg.model, lora=replace(lora, layers=layers)),
        data=replace(cfg.data, source=str(data), max_length=32, validation_size=64, min_words=min_words),
        # accelerate keeps one AcceleratorState per process and refuses a second precision in
        # it, so in-process runs use "no"; qv-r4-cosine's fp16 runs in its own process below.
        train=replace(cfg.train, max_steps=6, progress=False, mixed_precision="no"),
        output=str(output),
    )


@pytest.mark.parametrize("name", [*sorted(COUNTS), "wide-r16"])
def test_short_cpu_run(name: str, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path) -> None:
    # wide-r16 fits on the tiny model: its settings run; its refusal is tested above.
    cfg = _short(name, tiny_model_dir, tiny_data_csv, tmp_path / name)
    result = train(cfg)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    measured = measure(cfg.model, result.cfg.data.label_names or (), cfg.budget)
    assert metrics["budget"] == measured.to_dict() == result.budget.to_dict()
    assert json.loads((result.run_dir / "budget.json").read_text()) == measured.to_dict()
    assert metrics["steps"] == 6 and metrics["validation"]["n"] == 64
    assert load_config(result.run_dir / "config.yaml").model == cfg.model  # the preset's model, as run
    if name == "filtered-qv-r6":
        # 480 rows - 64 validation: every training row is kept or dropped by one filter.
        assert set(metrics["data"]["dropped"]) == {"min_words", "min_unique_ratio"}
        assert metrics["data"]["train"] + sum(metrics["data"]["dropped"].values()) == 480 - 64


def test_qv_r4_cosine_runs_as_it_is_from_the_command_line(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    # The preset's own fp16 on a CPU-only machine: accelerate takes it without error and trains
    # in fp32 (no autocast, no gradient scaler); only --model/--data and the caps are given.
    output = tmp_path / "run"
    done = cli(
        "train", "--config", str(PRESETS / "qv-r4-cosine.yaml"), "--model", str(tiny_model_dir),
        "--data", str(tiny_data_csv), "--output", str(output), "--max-steps", "6", "--max-length", "32",
        "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((output / "metrics.json").read_text())
    cfg = load_config(output / "config.yaml")
    assert cfg.train.mixed_precision == "fp16" and metrics["steps"] == 6
    assert metrics["budget"] == measure(cfg.model, cfg.data.label_names or (), cfg.budget).to_dict()
