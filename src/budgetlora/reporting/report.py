"""The run report: ``report.md`` plus the PNG plots it links, written into the run folder.

Plots are drawn on ``matplotlib.figure.Figure`` objects rather than through pyplot: no GUI
backend is ever selected (safe on headless machines), nothing is registered in pyplot's
global figure list (so nothing leaks), and importing this module does not switch the
backend of a notebook that imports it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter
from PIL import Image

from budgetlora.rundir import ReportFolder, atomic_path, write_text_atomic

__all__ = [
    "write_report",
    "plot_confusion_matrix",
    "plot_learning_curves",
    "truncation_stats",
    "figure",
    "save_png",
    "md_table",
    "pct",
]

_DPI = 110
_MAX_PNG_BYTES = 150_000
_TRUE_COLOR, _PRED_COLOR, _EVAL_COLOR = "#4c72b0", "#dd8452", "#c44e52"


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> str:
    """``align`` holds one of ``l``/``r`` per column; ``|`` in cells is escaped."""
    lines = [header, ["---:" if a == "r" else ":---" for a in align], *rows]
    cells = ([str(c).replace("|", "\\|").replace("\n", " ") for c in line] for line in lines)
    return "\n".join("| " + " | ".join(line) + " |" for line in cells)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {secs:02d} s"


def _timing_row(key: str, value: Any) -> list[str]:
    words = key.replace("_", " ")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [words.capitalize(), str(value)]
    if key.endswith("samples_per_second"):
        label = words.removesuffix("samples per second") + "throughput"
        return [label.strip().capitalize(), f"{value:,.1f} samples/s"]
    if key.endswith("seconds"):
        return [(words.removesuffix("seconds") + "time").strip().capitalize(), _duration(value)]
    if isinstance(value, int):
        return [words.capitalize(), f"{value:,}"]
    return [words.capitalize(), f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4g}"]


def truncation_stats(token_lengths: np.ndarray, max_length: int) -> dict[str, float]:
    """Share of samples longer than ``max_length`` and share of all tokens cut off.

    token_lengths: (n,) untruncated token counts per sample.
    """
    lengths = np.asarray(token_lengths, dtype=np.int64)
    total = int(lengths.sum())
    cut = int(np.clip(lengths - max_length, 0, None).sum())
    return {
        "samples_truncated": float((lengths > max_length).mean()) if lengths.size else 0.0,
        "tokens_cut": cut / total if total else 0.0,
    }


def _records(history: Sequence[dict], kind: str, key: str) -> dict[str, tuple[list[float], list[float]]]:
    """(steps, values) of finite ``key`` values in records of ``type == kind``, per eval split."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for record in history:
        value, step = record.get(key), record.get("step")
        if record.get("type") != kind or value is None or step is None or not np.isfinite(value):
            continue
        steps, values = series.setdefault(
            str(record.get("split", "validation")) if kind == "eval" else "train", ([], [])
        )
        steps.append(float(step))
        values.append(float(value))
    return series


def figure(width: float, height: float = 4.2) -> Figure:
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _thousands(axis: Any) -> None:
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def save_png(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    if buffer.tell() > _MAX_PNG_BYTES:
        # Dense plots (a 20-class confusion matrix with 4-digit counts) get too heavy for a
        # report on GitHub; a 256-colour palette makes them ~3x smaller, with slight banding
        # in the colour bar as the only visible change.
        image = Image.open(buffer).convert("RGB")
        buffer = io.BytesIO()
        image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
            buffer, format="png", optimize=True
        )
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def _class_ticks(ax: Any, names: Sequence[str], *, y: bool = False) -> None:
    k = len(names)
    labels = [n if len(n) <= 18 else n[:17] + "…" for n in names]
    # Smaller type and vertical labels as k grows, so names never overlap (banking77: k = 77).
    size = 10 if k <= 15 else 8 if k <= 30 else 6 if k <= 60 else 4.5
    rotation = 0 if k <= 4 and max(len(n) for n in names) <= 10 else 30 if k <= 12 else 90
    ax.set_xticks(
        range(k), labels, rotation=rotation, ha="right" if rotation == 30 else "center", fontsize=size
    )
    if y:
        ax.set_yticks(range(k), labels, fontsize=size)


def plot_confusion_matrix(
    path: Path, matrix: Sequence[Sequence[int]], names: Sequence[str], split: str
) -> Path:
    """Heatmap of counts (rows = true class, columns = predicted class), counts in cells."""
    counts = np.asarray(matrix, dtype=np.int64)  # (k, k)
    k = len(names)
    side = min(3.5 + 0.45 * k, 10.0)
    fig = figure(side + 1.2, side)
    ax = fig.add_subplot()
    fig.colorbar(ax.imshow(counts, cmap="Blues", vmin=0), ax=ax, shrink=0.8)
    _class_ticks(ax, names, y=True)
    ax.set(
        xlabel="Predicted class",
        ylabel="True class",
        title=f"Confusion matrix ({split}, n = {int(counts.sum()):,})",
    )
    if k <= 25:  # beyond that the numbers no longer fit in the cells
        for (i, j), c in np.ndenumerate(counts):
            color = "white" if c > counts.max() / 2 else "black"
            ax.text(j, i, f"{c:,}", ha="center", va="center", color=color, fontsize=9 if k <= 10 else 7)
    return save_png(fig, path)


def _plot_class_counts(
    path: Path, series: dict[str, Sequence[int]], names: Sequence[str], title: str
) -> Path:
    """Bars per class; several series side by side with a legend, a single one with counts on top."""
    fig = figure(min(4.0 + 0.6 * len(names), 16.0))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, ((label, counts), color) in enumerate(
        zip(series.items(), (_TRUE_COLOR, _PRED_COLOR), strict=False)
    ):
        offset = (i - (len(series) - 1) / 2) * width
        bars = ax.bar(np.arange(len(names)) + offset, counts, width, label=label, color=color)
        if len(series) == 1:
            ax.bar_label(bars, labels=[f"{c:,}" for c in counts], fontsize=8)
    ax.margins(y=0.15)  # headroom for the legend or the counts
    if len(series) > 1:
        ax.legend(ncol=len(series), loc="upper right")
    _class_ticks(ax, names)
    _thousands(ax.yaxis)
    ax.set(ylabel="Samples", title=title)
    return save_png(fig, path)


def plot_learning_curves(path: Path, history: Sequence[dict]) -> Path | None:
    """Train and eval loss vs. step; eval accuracy (and macro F1) vs. step beside it.

    Returns None (and writes nothing) when ``history`` holds no loss or accuracy at all.
    """
    fig = learning_curves_figure(history)
    return None if fig is None else save_png(fig, path)


def learning_curves_figure(history: Sequence[dict]) -> Figure | None:
    """The figure of :func:`plot_learning_curves` (None without anything to plot)."""
    train_loss, eval_loss = _records(history, "train", "loss"), _records(history, "eval", "loss")
    eval_acc, eval_f1 = _records(history, "eval", "accuracy"), _records(history, "eval", "macro_f1")
    if not (train_loss or eval_loss or eval_acc or eval_f1):
        return None
    panels = 2 if eval_acc or eval_f1 else 1
    fig = figure(11.0 if panels == 2 else 6.5)
    ax = fig.add_subplot(1, panels, 1)
    for steps, values in train_loss.values():
        ax.plot(steps, values, color=_TRUE_COLOR, alpha=0.85, label="train loss")
    for split, (steps, values) in eval_loss.items():
        ax.plot(steps, values, "o-", color=_EVAL_COLOR, label=f"{split} loss")
    ax.set(xlabel="Step", ylabel="Cross-entropy loss", title="Loss")
    if panels == 2:
        ax = fig.add_subplot(1, 2, 2)
        for split, (steps, values) in eval_acc.items():
            ax.plot(steps, values, "o-", color=_EVAL_COLOR, label=f"{split} accuracy")
        for split, (steps, values) in eval_f1.items():
            ax.plot(steps, values, "s--", color=_PRED_COLOR, label=f"{split} macro F1")
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.set(xlabel="Step", title="Evaluation")
        _at_least_a_span(
            ax, [v for _, values in (*eval_acc.values(), *eval_f1.values()) for v in values], 0.02
        )
    for axes in fig.axes:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        axes.set_xlim(left=0)
        axes.grid(alpha=0.3)
        axes.legend()
    return fig


def _at_least_a_span(ax: Any, values: Sequence[float], span: float) -> None:
    """Widen the y axis to at least ``span`` around ``values`` (within 0..1): a lone point or a flat
    line would otherwise get an axis of a few hundredths of a percent."""
    low, high = min(values), max(values)
    if high - low < span:
        middle = min(max((low + high) / 2, span / 2), 1 - span / 2)
        ax.set_ylim(middle - span / 2, middle + span / 2)


def _plot_token_lengths(path: Path, lengths: np.ndarray, max_length: int | None) -> Path:
    """Histogram of untruncated token counts with the truncation point marked."""
    fig = figure(7.0)
    ax = fig.add_subplot()
    # Bins of whole tokens (fractional widths alias integer lengths into a comb), with an
    # edge at max_length + 0.5 so the bars right of the line are exactly the truncated samples.
    low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 1)
    anchor = max_length if max_length is not None else high
    width = max(1, int(np.ceil((max(high, anchor) - low + 1) / 50)))
    first = anchor - width * ((anchor - low) // width + 1)
    edges = np.arange(first, max(high, anchor) + width + 1, width) + 0.5
    ax.hist(lengths, bins=edges.tolist(), color=_TRUE_COLOR)
    if max_length is not None:
        share = truncation_stats(lengths, max_length)["samples_truncated"]
        ax.axvline(max_length + 0.5, color=_EVAL_COLOR, linestyle="--", label=f"max_length = {max_length}")
        ax.legend(title=f"{pct(share)} truncated")
    _thousands(ax.yaxis)
    ax.set(
        xlabel="Tokens per sample (before truncation)",
        ylabel="Samples",
        title=f"Token lengths of the training samples (n = {lengths.size:,})",
    )
    return save_png(fig, path)


def _plot_budget(path: Path, groups: dict[str, int], trainable: int, limit: int | None) -> Path:
    """Horizontal bars: trainable parameters per group, in the dict's order top-down."""
    fig = figure(7.5, 1.6 + 0.45 * max(1, len(groups)))
    ax = fig.add_subplot()
    names = list(groups)[::-1]  # barh draws bottom-up
    bars = ax.barh(names, [groups[n] for n in names], color=_TRUE_COLOR)
    ax.bar_label(bars, labels=[f"{groups[n]:,}" for n in names], padding=3, fontsize=8)
    ax.margins(x=0.18)
    _thousands(ax.xaxis)
    budget = f" of a {limit:,} budget" if limit else ""
    ax.set(xlabel="Trainable parameters", title=f"Trainable parameters: {trainable:,}{budget}")
    return save_png(fig, path)


def _section(heading: str, *blocks: str) -> str:
    return "\n\n".join([f"## {heading}", *blocks])


def _summary_section(title: str, split: str, m: dict) -> str:
    averages = [
        [f"**{avg.capitalize()} avg.**", *(pct(m[f"{avg}_{s}"]) for s in ("precision", "recall", "f1"))]
        for avg in ("macro", "weighted")
    ]
    return "\n\n".join(
        [
            f"# {title}",
            f"Evaluated on the **{split}** split ({m['n']:,} samples).",
            f"**Accuracy: {pct(m['accuracy'])}**",
            md_table(["", "Precision", "Recall", "F1"], averages, "lrrr"),
        ]
    )


def _class_sections(m: dict, names: Sequence[str], split: str, pred_counts: Sequence[int]) -> list[str]:
    per_class = [
        [
            n,
            *(pct(m["per_class"][n][s]) for s in ("precision", "recall", "f1")),
            f"{m['per_class'][n]['support']:,}",
        ]
        for n in names
    ]
    matrix = [
        [f"**{n}**", *(f"{v:,}" for v in row)] for n, row in zip(names, m["confusion_matrix"], strict=True)
    ]
    counts = [
        [n, f"{m['per_class'][n]['support']:,}", f"{p:,}"] for n, p in zip(names, pred_counts, strict=True)
    ]
    return [
        _section(
            "Per-class results",
            md_table(["Class", "Precision", "Recall", "F1", "Support"], per_class, "lrrrr"),
        ),
        _section(
            "Confusion matrix",
            f"![Confusion matrix on the {split} split](confusion_matrix.png)",
            "Rows are the true class, columns the predicted class.",
            md_table(["true \\ predicted", *names], matrix, "l" + "r" * len(names)),
        ),
        _section(
            "Predicted vs. true class counts",
            "![Predicted vs. true class counts](predicted_distribution.png)",
            md_table(["Class", "True", "Predicted"], counts, "lrr"),
        ),
    ]


def _learning_section(history: Sequence[dict], plotted: bool) -> str:
    lines = []
    train_loss = _records(history, "train", "loss").get("train")
    if train_loss:
        lines.append(f"- Final train loss: {train_loss[1][-1]:.4f} (step {train_loss[0][-1]:,.0f})")
    for split, (steps, values) in _records(history, "eval", "accuracy").items():
        best = int(np.argmax(values))
        lines.append(f"- Best {split} accuracy: {pct(values[best])} at step {steps[best]:,.0f}")
    image = ["![Learning curves](learning_curves.png)"] if plotted else []
    return _section("Learning curves", *image, "\n".join(lines) or "No loss or accuracy was recorded.")


def _training_data_section(counts: Sequence[int], names: Sequence[str]) -> str:
    total = sum(counts)
    rows = [[n, f"{c:,}", pct(c / max(1, total))] for n, c in zip(names, counts, strict=True)]
    rows.append(["**Total**", f"**{total:,}**", "**100.00%**"])
    table = md_table(["Class", "Samples", "Share"], rows, "lrr")
    return _section("Training data", "![Training samples per class](class_distribution.png)", table)


def _token_length_section(lengths: np.ndarray, max_length: int | None) -> str:
    p50, p95 = np.percentile(lengths, [50, 95]) if lengths.size else (0.0, 0.0)
    blocks = [
        "![Token lengths of the training samples](token_lengths.png)",
        f"{lengths.size:,} training samples; tokens per sample before truncation: "
        f"median {p50:,.0f}, 95th percentile {p95:,.0f}, max {int(lengths.max(initial=0)):,}.",
    ]
    if max_length is not None:
        t = truncation_stats(lengths, max_length)
        blocks.append(
            f"With `max_length = {max_length}`, **{pct(t['samples_truncated'])}** of the training samples "
            f"({int((lengths > max_length).sum()):,}) are truncated and **{pct(t['tokens_cut'])}** of all "
            "tokens are cut off."
        )
    return _section("Token lengths", *blocks)


def _budget_section(budget: dict) -> str:
    groups, trainable, limit = _budget_numbers(budget)
    denominator, share_of = (limit, "budget") if limit else (max(1, trainable), "trainable")
    rows = [[f"`{name}`", f"{count:,}", pct(count / denominator)] for name, count in groups.items()]
    rows.append(["**Total trainable**", f"**{trainable:,}**", f"**{pct(trainable / denominator)}**"])
    blocks = ["![Trainable parameters per group](budget.png)"]
    if limit:
        fits = budget.get("fits")
        verdict = "fit within" if (trainable <= limit if fits is None else fits) else "**exceed**"
        blocks.append(f"{trainable:,} trainable parameters {verdict} the budget of {limit:,}.")
    blocks.append(md_table(["Group", "Parameters", f"Share of {share_of}"], rows, "lrr"))
    if groups and sum(groups.values()) != trainable:
        blocks.append(f"Note: the groups add up to {sum(groups.values()):,}, not {trainable:,}.")
    frozen = budget.get("frozen_not_counted") or {}
    if frozen:  # VeRA's shared random matrices: buffers, never trained
        listed = ", ".join(f"`{name}` {int(n):,}" for name, n in frozen.items())
        blocks.append(
            f"Frozen, not trainable and not counted: {listed} (the method's fixed random matrices).\n"
        )
    return _section("Parameter budget", *blocks)


def _evaluation_part(
    folder: ReportFolder, title: str, split: str, metrics: dict, names: list[str]
) -> tuple[list[Path], list[str]]:
    """The plots and sections every report has: the scores, per class, the confusion matrix and
    the predicted class counts."""
    k = len(names)
    if len(metrics["confusion_matrix"]) != k:
        raise ValueError(
            f"metrics cover {len(metrics['confusion_matrix'])} classes but {k} label names given"
        )
    pred_counts = [int(metrics["predicted_distribution"][n]) for n in names]
    true_counts = [int(metrics["per_class"][n]["support"]) for n in names]

    written = [
        plot_confusion_matrix(folder.confusion_matrix_plot, metrics["confusion_matrix"], names, split),
        _plot_class_counts(
            folder.predicted_distribution_plot,
            {"true": true_counts, "predicted": pred_counts},
            names,
            f"True vs. predicted class counts ({split})",
        ),
    ]
    sections = [_summary_section(title, split, metrics), *_class_sections(metrics, names, split, pred_counts)]
    return written, sections


def _budget_numbers(budget: dict) -> tuple[dict[str, int], int, int | None]:
    """Trainable parameters per group, in all, and the budget (None without one) of ``budget.json``."""
    groups = {str(name): int(count) for name, count in budget.get("groups", {}).items()}
    trainable = int(budget.get("trainable", sum(groups.values())))
    limit = int(budget["budget"]) if budget.get("budget") else None
    return groups, trainable, limit


def _class_counts(train_labels: np.ndarray, k: int) -> tuple[list[int], str]:
    """Training samples per class, and the title of their plot."""
    train = np.asarray(train_labels, dtype=np.int64)  # (n,)
    if train.size and (train.min() < 0 or train.max() >= k):
        raise ValueError(f"train_labels must be class indices 0..{k - 1}, got {train.min()}..{train.max()}")
    counts = np.bincount(train, minlength=k).tolist()
    return counts, f"Training data: samples per class (n = {train.size:,})"


def _timing_section(timing: dict) -> str:
    rows = []
    for key, value in timing.items():
        if isinstance(value, dict):  # seconds of each phase of the run
            rows += [[f"Time: {phase}", _duration(seconds)] for phase, seconds in value.items()]
        else:
            rows.append(_timing_row(key, value))
    return _section("Timing", md_table(["", "Value"], rows, "lr"))


def write_report(
    out_dir: Path,
    *,
    title: str,
    split: str,
    metrics: dict,
    label_names: Sequence[str],
    history: list[dict] | None = None,
    budget: dict | None = None,
    train_labels: np.ndarray | None = None,
    token_lengths: np.ndarray | None = None,
    max_length: int | None = None,
    timing: dict | None = None,
    extra: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``report.md`` and its plots into ``out_dir``; return the paths written.

    ``metrics`` is the dict of :func:`budgetlora.reporting.metrics.classification_metrics`. Always
    written: ``confusion_matrix.png``, ``predicted_distribution.png``, ``report.md``.
    Each optional input adds its section and plot: ``history`` -> ``learning_curves.png``
    (skipped if it holds no loss/accuracy), ``budget`` -> ``budget.png``, ``train_labels``
    (n,) -> ``class_distribution.png``, ``token_lengths`` (n,) untruncated counts (with
    ``max_length`` for the truncation line and shares) -> ``token_lengths.png``; ``timing``
    adds a table and ``extra`` (title -> markdown) adds sections at the end. Files from an
    earlier call that this call does not write are left alone.
    """
    folder = ReportFolder(Path(out_dir))
    names = [str(n) for n in label_names]
    written, sections = _evaluation_part(folder, title, split, metrics, names)
    if history is not None:
        curves = plot_learning_curves(folder.learning_curves_plot, history)
        written += [curves] if curves else []
        sections.append(_learning_section(history, curves is not None))
    if budget is not None:
        groups, trainable, limit = _budget_numbers(budget)
        written.append(_plot_budget(folder.budget_plot, groups, trainable, limit))
        sections.append(_budget_section(budget))
    if train_labels is not None:
        counts, title_counts = _class_counts(train_labels, len(names))
        written.append(
            _plot_class_counts(folder.class_distribution_plot, {"train": counts}, names, title_counts)
        )
        sections.append(_training_data_section(counts, names))
    if token_lengths is not None:
        lengths = np.asarray(token_lengths, dtype=np.int64)  # (n,)
        written.append(_plot_token_lengths(folder.token_lengths_plot, lengths, max_length))
        sections.append(_token_length_section(lengths, max_length))
    if timing:
        sections.append(_timing_section(timing))
    sections += [_section(heading, body.strip()) for heading, body in (extra or {}).items()]

    report = folder.report
    write_text_atomic(report, "\n\n".join(sections) + "\n")
    return [*written, report]
