"""Inference backends behind one interface: a run folder on torch, or its ONNX export on
onnxruntime. Both tokenize and batch the same way (budgetlora's truncation, batches sorted
by length, padded per batch), so they score the same rows with the same inputs."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from budgetlora.data.batching import Collator, encode, pad_id, sorted_batches
from budgetlora.errors import BudgetloraError
from budgetlora.errors import option as named
from budgetlora.inference.merged import load_run
from budgetlora.model.modeling import load_tokenizer
from budgetlora.rundir import ExportFolder, RunFolder, check_export_dir, headline_metrics, read_budget

__all__ = ["Backend", "Classifier", "OnnxClassifier", "TorchClassifier", "load_classifier", "backend_of"]

Backend = Literal["torch", "onnx"]


class Classifier(Protocol):
    """Logits for texts, with the label names and the truncation length they were trained at."""

    backend: Backend
    label_names: tuple[str, ...]
    max_length: int
    details: dict[str, Any]  # the base model, the budget and the run's validation/test metrics

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """(n, num_labels) float32 logits, in the order of ``texts``."""
        ...


class TorchClassifier:
    """A run folder, reloaded with its LoRA merged (budgetlora's own inference path)."""

    backend: Backend = "torch"

    def __init__(
        self,
        run_dir: str | Path,
        *,
        model: str | None = None,
        batch_size: int | None = None,
        mixed_precision: str | None = None,
    ) -> None:
        folder = Path(run_dir)
        self.run = load_run(folder, model=model, mixed_precision=mixed_precision)
        self.label_names = self.run.label_names
        self.max_length = self.run.cfg.data.max_length
        self.batch_size = batch_size
        self.details = {
            "model": self.run.cfg.model.name_or_path,
            "budget": read_budget(folder),
            "metrics": headline_metrics(folder),
        }

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return self.run.logits(texts, batch_size=self.batch_size, use_cache=False)


class OnnxClassifier:
    """An export folder's ``model.onnx`` on onnxruntime's CPU provider, with its tokenizer."""

    backend: Backend = "onnx"

    def __init__(
        self, export_dir: str | Path, *, batch_size: int | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        folder = Path(export_dir)
        info = check_export_dir(folder)
        self.label_names = tuple(info["label_names"])
        self.max_length = int(info["max_length"])
        self.details = {k: info.get(k) for k in ("budget", "metrics")} | {"model": info.get("base_model")}
        self.batch_size = batch_size or 16  # the CPU default of budgetlora's own inference
        self.tokenizer = load_tokenizer(str(folder))
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(ExportFolder(folder).onnx), options, providers=["CPUExecutionProvider"]
        )

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        encoded = encode(list(texts), None, self.tokenizer, self.max_length, use_cache=False)
        collate = Collator(encoded, pad_id(self.tokenizer))
        out = np.zeros((len(encoded), len(self.label_names)), dtype=np.float32)
        for rows in sorted_batches(encoded.lengths, self.batch_size):
            batch = collate(rows)
            (logits,) = self.session.run(
                ["logits"],
                {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()},
            )  # (batch, labels)
            out[rows] = logits
        return out


def load_classifier(
    path: str | Path, *, option: str = "PATH", model: str | None = None, batch_size: int | None = None
) -> Classifier:
    """An export folder (``export.json``: onnxruntime) or a run folder (``config.yaml``: torch),
    told apart and checked by :func:`backend_of` before anything loads. ``model`` replaces a
    run's base model path (refused for an export: its model is inside it)."""
    if backend_of(path, option, model=model) == "onnx":
        return OnnxClassifier(path, batch_size=batch_size)
    return TorchClassifier(path, model=model, batch_size=batch_size)


def backend_of(path: str | Path, option: str = "PATH", *, model: str | None = None) -> Backend:
    """The backend that scores the folder ``path``: "onnx" for an export folder (``export.json``),
    "torch" for a run folder (``config.yaml``); the one place that tells the two apart.

    An export is checked here whole (its ``model.onnx``, onnxruntime installed, no ``model``
    to replace); a run folder's config is checked as it loads
    (:func:`budgetlora.inference.merged.read_run_config`, before any weights).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise BudgetloraError(f"{option} {folder}: no such folder (a run folder or an export folder)")
    if ExportFolder(folder).is_export():
        _check_export(folder, option, model)
        return "onnx"
    if RunFolder(folder).config.is_file():
        return "torch"
    raise BudgetloraError(
        f"{option} {folder} is neither a run folder (config.yaml) nor an export folder (export.json)"
    )


def _check_export(folder: Path, option: str, model: str | None) -> None:
    """Refuse an export that cannot be scored here, or a base model to replace in it."""
    if model is not None:
        raise BudgetloraError(
            f"{named('model')} applies to a run folder; {folder} is an export, its model is inside it"
        )
    check_export_dir(folder, option)
    if importlib.util.find_spec("onnxruntime") is None:
        raise BudgetloraError(
            f"{option} {folder} is an ONNX export: onnxruntime is not installed "
            "(pip install 'budgetlora[serve]')"
        )
