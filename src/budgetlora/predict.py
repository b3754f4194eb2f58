"""Inference: load a run folder, score a labelled split, write a submission, classify text.

The fast path: LoRA merged into the weights, batches sorted by length (large batches,
almost no padding), bf16 on GPUs, ``inference_mode``; results come back in input order.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from budgetlora.batching import encode, pad_id
from budgetlora.config import RunConfig, load_config
from budgetlora.errors import BudgetloraError
from budgetlora.inference import inference_model, predict_logits
from budgetlora.metrics import score, softmax
from budgetlora.modeling import check_max_length, load_base_model, load_tokenizer
from budgetlora.rundir import atomic_path, check_output_path, write_json_atomic
from budgetlora.runtime import Runtime, make_runtime

__all__ = ["LoadedRun", "load_run", "evaluate", "predict", "classify"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class LoadedRun:
    """A trained run ready for inference: LoRA merged, eval mode, on its device, in the
    inference dtype of its device plan (bf16 where training autocast to bf16)."""

    cfg: RunConfig
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    label_names: tuple[str, ...]
    runtime: Runtime

    def logits(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        progress: bool = False,
        use_cache: bool = True,
    ) -> np.ndarray:
        """(n, num_labels) logits for ``texts``, in their order, on the fast path."""
        encoded = encode(list(texts), None, self.tokenizer, self.cfg.data.max_length, use_cache=use_cache)
        return predict_logits(
            self.model,
            encoded,
            self.runtime,
            batch_size=batch_size,
            pad_token_id=pad_id(self.tokenizer),
            progress=progress,
        )


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise BudgetloraError(f"run folder not found: {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise BudgetloraError(f"{run_dir} is not a budgetlora run folder: config.yaml is missing")
    missing = [f for f in ADAPTER_FILES if not (run_dir / f).is_file()]
    if missing:
        raise BudgetloraError(
            f"run folder {run_dir} has no trained adapter ({', '.join(missing)} missing): "
            "did its training finish? Re-run it with `budgetlora train --config "
            f"{run_dir / 'config.yaml'}`"
        )


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise BudgetloraError(f"invalid value for --batch-size: {batch_size!r} (a positive integer)")


def _run_config(run_dir: Path, model: str | None) -> RunConfig:
    """A run folder's config (base model replaced by ``model``), checked before any weights load."""
    _check_run_dir(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if model is not None:
        cfg = replace(cfg, model=replace(cfg.model, name_or_path=model))
    if not cfg.data.label_names:
        raise BudgetloraError(f"{run_dir / 'config.yaml'} records no data.label_names")
    check_max_length(cfg.model, cfg.data.max_length)
    return cfg


def load_run(
    run_dir: str | Path,
    *,
    model: str | None = None,
    mixed_precision: str | None = None,
    cfg: RunConfig | None = None,
) -> LoadedRun:
    """Rebuild the base model, load the adapter and head, and merge them for inference.

    ``model`` replaces the base model path recorded in the run (e.g. a local copy);
    ``mixed_precision`` defaults to the run's own training setting. ``cfg``: the run's
    config as :func:`_run_config` already read and checked it (not read twice).
    """
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else _run_config(run_dir, model)
    label_names = cfg.data.label_names
    assert label_names is not None
    runtime = make_runtime(mixed_precision or cfg.train.mixed_precision)
    base = load_base_model(cfg.model, label_names, weights=True)
    try:
        peft_model = PeftModel.from_pretrained(base, str(run_dir))
    except (ValueError, RuntimeError, KeyError) as err:
        raise BudgetloraError(
            f"the adapter in {run_dir} does not fit the model {cfg.model.name_or_path!r} "
            f"({type(base).__name__}): {str(err).splitlines()[0][:300]}. Pass the base model the run "
            "was trained on with --model"
        ) from err
    merged = inference_model(peft_model, runtime)
    tokenizer = load_tokenizer(
        str(run_dir) if (run_dir / "tokenizer_config.json").is_file() else cfg.model.name_or_path
    )
    return LoadedRun(cfg, merged, tokenizer, tuple(label_names), runtime)


def evaluate(
    run_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    output: str | Path | None = None,
    model: str | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Score a labelled split and write ``metrics.json`` + a report into ``output``
    (default ``RUN_DIR/eval-SPLIT``). Returns the metrics.

    A ``data`` file (rather than a folder or Hub dataset with splits) is scored whole,
    whatever ``split`` says, into ``RUN_DIR/eval-FILESTEM`` by default."""
    from budgetlora.data import load_rows, load_splits
    from budgetlora.report import write_report

    if split not in ("train", "validation", "test"):
        raise BudgetloraError(f"--split {split!r}: allowed: train, validation, test")
    _check_batch_size(batch_size)
    cfg = _run_config(Path(run_dir), model)
    data_cfg = cfg.data if data is None else replace(cfg.data, source=data)
    # The run's label names: rows of classes the run does not know are refused, naming them.
    if data is not None and Path(data).expanduser().is_file():
        table, split, scored = load_rows(data_cfg), Path(data).stem, f"all rows of {Path(data).name}"
    else:
        splits = load_splits(data_cfg, training=False)
        found = {"train": splits.train, "validation": splits.validation, "test": splits.test}.get(split)
        if found is None:
            raise BudgetloraError(
                f"{data_cfg.source} has no test split; use --split validation, or pass --data with a labelled test file"
            )
        table, scored = found, split
    out_dir = Path(output) if output is not None else Path(run_dir) / f"eval-{split}"
    check_output_path(out_dir, "--output", folder=True)
    run = load_run(run_dir, cfg=cfg)
    logits = run.logits(table.texts, batch_size=batch_size, progress=True)
    assert table.labels is not None
    metrics = score(logits, table.labels, run.label_names)
    if run.runtime.is_main_process:
        write_json_atomic(out_dir / "metrics.json", {"source": data_cfg.source, "split": split, **metrics})
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
) -> Path:
    """Write ``ID,Label`` for every row of ``input_path`` (in input order) and, beside it,
    ``<name>.probs.csv`` with label names and class probabilities. Returns the submission path.

    ``run_dir`` may also be an export folder with ``model.onnx`` (``budgetlora export``): it
    is scored on onnxruntime."""
    from budgetlora.data import read_table

    _check_batch_size(batch_size)
    output = Path(output)
    for path in (output, output.with_suffix(".probs.csv")):
        check_output_path(path, "--output", folder=False)
    onnx = _check_export(Path(run_dir), model)
    cfg = (
        None if onnx else _run_config(Path(run_dir), model)
    )  # before reading the input: the cheaper mistake first
    table = read_table(
        input_path, text_column=text_column, require_labels=False, allow_pickle=allow_pickle, unique_ids=True
    )
    if onnx:
        from budgetlora.backends import OnnxClassifier

        classifier = OnnxClassifier(run_dir, batch_size=batch_size)
        logits, label_names, is_main = classifier.logits(table.texts), classifier.label_names, True
    else:
        run = load_run(run_dir, cfg=cfg)
        logits = run.logits(table.texts, batch_size=batch_size, progress=True)
        label_names, is_main = run.label_names, run.runtime.is_main_process
    if is_main:
        ids = table.ids if table.ids is not None else [str(i) for i in range(len(table))]
        preds = logits.argmax(axis=1)
        probs = softmax(logits)
        _write_csv(output, ["ID", "Label"], ([i, int(p)] for i, p in zip(ids, preds, strict=True)))
        header = ["ID", "Label", "label_name", *[f"p_{name}" for name in label_names]]
        rows = (
            [i, int(p), label_names[p], *[f"{x:.6f}" for x in prob]]
            for i, p, prob in zip(ids, preds, probs, strict=True)
        )
        _write_csv(output.with_suffix(".probs.csv"), header, rows)
    return output


def _check_export(folder: Path, model: str | None) -> bool:
    """True for an export folder (scored on onnxruntime), checked; False for anything else."""
    if not (folder / "export.json").is_file():
        return False
    from budgetlora.export import check_export_dir

    if model is not None:
        raise BudgetloraError(
            f"--model applies to a run folder; {folder} is an export, its model is inside it"
        )
    check_export_dir(folder, "RUN_DIR")
    return True


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
    """Label and class probabilities for each text (of a run folder, or of an export folder
    with ``model.onnx`` on onnxruntime)."""
    if not texts:
        raise BudgetloraError("classify needs at least one text")
    empty = [i + 1 for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise BudgetloraError(
            f"TEXT {', '.join(map(str, empty))} of {len(texts)} is empty or whitespace only: nothing to classify"
        )
    _check_batch_size(batch_size)
    if _check_export(Path(run_dir), model):
        from budgetlora.backends import OnnxClassifier

        classifier = OnnxClassifier(run_dir, batch_size=batch_size)
        label_names, logits = classifier.label_names, classifier.logits(texts)
    else:
        run = load_run(run_dir, model=model)
        label_names, logits = run.label_names, run.logits(texts, batch_size=batch_size, use_cache=False)
    probs = softmax(logits)
    return [
        {
            "text": text,
            "label": label_names[int(p.argmax())],
            "label_id": int(p.argmax()),
            "probabilities": {name: float(x) for name, x in zip(label_names, p, strict=True)},
        }
        for text, p in zip(texts, probs, strict=True)
    ]
