"""Inference: load a run folder, score a labelled split, write a submission, classify text.

The fast path: LoRA merged into the weights, batches sorted by length (large batches,
almost no padding), bf16 on GPUs, ``inference_mode``; results come back in input order.
"""

from __future__ import annotations

import csv
import io
import typing
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from budgetlora.errors import BudgetloraError, option, setting
from budgetlora.inference.backends import OnnxClassifier, backend_of, load_classifier
from budgetlora.inference.merged import LoadedRun, check_batch_size, load_run, read_run_config
from budgetlora.reporting.metrics import score, softmax
from budgetlora.rundir import (
    ReportFolder,
    RunFolder,
    Submission,
    atomic_path,
    check_output_path,
    write_json_atomic,
)
from budgetlora.runtime import writer_lock

PriorCorrection = Literal["none", "em"]
PRIOR_CORRECTIONS: tuple[str, ...] = typing.get_args(PriorCorrection)

__all__ = [
    "PRIOR_CORRECTIONS",
    "LoadedRun",
    "load_run",
    "evaluate",
    "predict",
    "classify",
]


def evaluate(
    run_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    output: str | Path | None = None,
    model: str | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Score a labelled split and write ``metrics.json`` + a report into ``output``. Returns the metrics.

    A ``data`` file (rather than a folder or Hub dataset with splits) is scored whole,
    whatever ``split`` says, into ``RUN_DIR/eval-FILESTEM`` by default.

    Args:
        run_dir: a finished run folder (from budgetlora train)
        data: data source (default: the run's own)
        split: train, validation or test; a data file is scored whole
        output: output folder (default RUN_DIR/eval-SPLIT, or RUN_DIR/eval-FILESTEM)
        model: base model folder or Hub id, if not the one recorded in the run
        batch_size: samples per inference batch (default 256 on a GPU, 16 on a CPU)
    """
    from budgetlora.data.tables import load_rows, load_splits
    from budgetlora.reporting.report import write_report

    if split not in ("train", "validation", "test"):
        raise BudgetloraError(f"{option('split')} {split!r}: allowed: train, validation, test")
    check_batch_size(batch_size)
    cfg = read_run_config(Path(run_dir), model)
    data_cfg = cfg.data if data is None else replace(cfg.data, source=data)
    # The run's label names: rows of classes the run does not know are refused, naming them.
    if data is not None and Path(data).expanduser().is_file():
        table, split, scored = load_rows(data_cfg), Path(data).stem, f"all rows of {Path(data).name}"
    else:
        splits = load_splits(data_cfg, training=False)
        found = {"train": splits.train, "validation": splits.validation, "test": splits.test}.get(split)
        if found is None:
            raise BudgetloraError(
                f"{data_cfg.source} has no test split; use {setting('split', 'validation')}, or pass {option('data')} with a labelled test file"
            )
        table, scored = found, split
    out_dir = Path(output) if output is not None else RunFolder(Path(run_dir)).evaluation(split)
    check_output_path(out_dir, option("output"), folder=True)
    with writer_lock(out_dir):
        run = load_run(run_dir, cfg=cfg)
        logits = run.logits(table.texts, batch_size=batch_size, progress=True)
        assert table.labels is not None
        metrics = score(logits, table.labels, run.label_names)
        if run.runtime.is_main_process:
            ReportFolder(out_dir).write_metrics({"source": data_cfg.source, "split": split, **metrics})
            write_report(
                out_dir,
                title=f"Evaluation of {Path(run_dir).name} on {scored}",
                split=split,
                metrics=metrics,
                label_names=run.label_names,
            )
    return metrics


def predict(
    run_dir: str | Path,
    input_path: str | Path,
    *,
    output: str | Path = "submission.csv",
    text_column: str = "text",
    allow_pickle: bool = False,
    model: str | None = None,
    batch_size: int | None = None,
    shift: bool = True,
    prior_correction: PriorCorrection = "none",
) -> Path:
    """Write ``ID,Label`` for every row of ``input_path`` (in input order) and, beside it,
    ``<name>.probs.csv`` with label names and class probabilities. Returns the submission path.

    An export folder is scored on onnxruntime, with no shift report (see
    :mod:`budgetlora.inference.shift`).

    Args:
        run_dir: a finished run folder (from budgetlora train), or an export folder with
            model.onnx (budgetlora export --format onnx): onnxruntime
        input_path: file of texts to label
        output: submission path
        text_column: text column name
        allow_pickle: allow a pickled input (unpickling runs code: trusted files only)
        model: base model folder or Hub id, if not the one recorded in the run
        batch_size: samples per inference batch (default 256 on a GPU, 16 on a CPU)
        shift: also print the shift report's summary and write it whole to <output>.shift.json
            (a run folder only)
        prior_correction: em: label the rows under the class shares that EM re-estimates on them
            (calibrated on the run's validation rows; for a test set whose classes are not balanced as
            the training rows are; a run folder only)
    """
    from budgetlora.data.tables import read_table

    check_batch_size(batch_size)
    output = Path(output)
    for path in Submission(output).files:
        check_output_path(path, option("output"), folder=False)
    if prior_correction not in PRIOR_CORRECTIONS:
        raise BudgetloraError(
            f"invalid value for {option('prior_correction')}: {prior_correction!r} (allowed: {', '.join(PRIOR_CORRECTIONS)})"
        )
    onnx = backend_of(run_dir, "RUN_DIR", model=model) == "onnx"
    if onnx and prior_correction != "none":
        raise BudgetloraError(
            f"{setting('prior_correction', prior_correction)} needs the run folder (its validation rows calibrate the "
            f"model); {run_dir} is an export"
        )
    cfg = (
        None if onnx else read_run_config(Path(run_dir), model)
    )  # before reading the input: the cheaper mistake first
    table = read_table(
        input_path, text_column=text_column, require_labels=False, allow_pickle=allow_pickle, unique_ids=True
    )
    with writer_lock(output):
        return _predict(run_dir, cfg, table, str(input_path), output, batch_size, shift, prior_correction)


def _predict(
    run_dir: str | Path,
    cfg: Any,
    table: Any,
    source: str,
    output: Path,
    batch_size: int | None,
    shift: bool,
    prior_correction: str,
) -> Path:
    """:func:`predict` once its input is read and its output locked (``cfg`` None: an export)."""
    onnx = cfg is None
    if onnx:
        classifier = OnnxClassifier(run_dir, batch_size=batch_size)
        logits, label_names, is_main = classifier.logits(table.texts), classifier.label_names, True
    else:
        run = load_run(run_dir, cfg=cfg)
        logits = run.logits(table.texts, batch_size=batch_size, progress=True)
        label_names, is_main = run.label_names, run.runtime.is_main_process
    probs = softmax(logits)
    if prior_correction == "em":
        from budgetlora.inference.shift import prior_corrected

        probs, prior = prior_corrected(run, logits, batch_size=batch_size)
        if is_main:
            shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in prior.items())
            print(f"class priors re-estimated by EM on these rows: {shares}", flush=True)
    if is_main:
        ids = table.ids if table.ids is not None else [str(i) for i in range(len(table))]
        preds = probs.argmax(axis=1)
        _write_csv(output, ["ID", "Label"], ([i, int(p)] for i, p in zip(ids, preds, strict=True)))
        header = ["ID", "Label", "label_name", *[f"p_{name}" for name in label_names]]
        rows = (
            [i, int(p), label_names[p], *[f"{x:.6f}" for x in prob]]
            for i, p, prob in zip(ids, preds, probs, strict=True)
        )
        _write_csv(Submission(output).probs, header, rows)
    if is_main:  # a report of an earlier submission under this name no longer describes this one
        Submission(output).shift.unlink(missing_ok=True)
    if shift and not onnx:
        _shift_summary(run, table, source, logits, Submission(output).shift)
    return output


def _shift_summary(run: LoadedRun, table: Any, source: str, logits: Any, path: Path) -> None:
    """The shift report's summary, printed and written to ``path``; a note instead where it
    cannot be made (the run's training rows unreadable, too few texts), never an error:
    the submission is written already."""
    from budgetlora.inference.shift import analyse

    if len(table) < 10:
        print(f"no shift report: {len(table)} rows (it needs at least 10)", flush=True)
        return
    try:
        report = analyse(run, table.texts, source=source, ids=table.ids, logits=logits)
    except (BudgetloraError, OSError) as err:
        print(f"no shift report: the run's training rows could not be read ({err})", flush=True)
        return
    if run.runtime.is_main_process:
        write_json_atomic(path, report.summary)
        print("\n".join(report.lines()), flush=True)


def _write_csv(path: Path, header: list[str], rows: Any) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def classify(
    run_dir: str | Path, texts: Sequence[str], *, model: str | None = None, batch_size: int | None = None
) -> list[dict[str, Any]]:
    """Label and class probabilities for each text.

    Args:
        run_dir: a finished run folder (from budgetlora train), or an export folder with
            model.onnx (budgetlora export --format onnx): onnxruntime
        texts: texts to classify
        model: base model folder or Hub id, if not the one recorded in the run
        batch_size: samples per inference batch (default 256 on a GPU, 16 on a CPU)
    """
    if not texts:
        raise BudgetloraError("classify needs at least one text")
    empty = [i + 1 for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise BudgetloraError(
            f"TEXT {', '.join(map(str, empty))} of {len(texts)} is empty or whitespace only: nothing to classify"
        )
    check_batch_size(batch_size)
    classifier = load_classifier(run_dir, option="RUN_DIR", model=model, batch_size=batch_size)
    label_names, probs = classifier.label_names, softmax(classifier.logits(texts))
    return [
        {
            "text": text,
            "label": label_names[int(p.argmax())],
            "label_id": int(p.argmax()),
            "probabilities": {name: float(x) for name, x in zip(label_names, p, strict=True)},
        }
        for text, p in zip(texts, probs, strict=True)
    ]
