"""Export a run for use elsewhere: a plain transformers model and an ONNX graph in one folder.

The LoRA adapter is merged into the encoder's weights (float32), so neither form needs peft
or budgetlora: ``transformers.pipeline("text-classification", model=OUT)`` loads the folder,
and ``onnxruntime.InferenceSession(OUT / "model.onnx")`` runs the graph (inputs ``input_ids``
and ``attention_mask``, int64 (batch, sequence); output ``logits``, float32 (batch, labels)).
Each form is checked against the merged model on a padded batch before the folder is
renamed into place, and the differences are recorded in ``export.json``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from budgetlora.config import RunConfig
from budgetlora.errors import BudgetloraError, ExportCheckError, option, setting
from budgetlora.model.modeling import is_hub_id
from budgetlora.rundir import (
    METRICS,
    ONNX_FILE,
    ExportFolder,
    check_output_path,
    headline_metrics,
    is_finished,
    output_lock,
    read_budget,
    replace_dir_atomic,
    write_json_atomic,
    write_text_atomic,
)

__all__ = ["FORMATS", "ExportResult", "export", "model_card"]

FORMATS = ("merged", "onnx")
# Heads that a stock transformers class reproduces exactly (needed by the merged form); budgetlora's own heads
# (one linear layer on the first token or on the mean of the tokens, no dense + tanh) have no transformers class.
_TRANSFORMERS_HEADS = ("default", "pooler")
# Texts of different lengths: the check batch is padded, so the mask is exercised too.
_CHECK_TEXTS = (
    "Stocks rally as oil prices fall for a third day.",
    "Federer wins again.",
    "Scientists find water ice on a distant moon, raising hopes for future missions and "
    "a new round of research into how such bodies form.",
    "Talks between the two governments resume on Monday.",
)
# float32 on both sides: anything above this is a wrong export, not rounding.
_MAX_LOGIT_DIFF = 1e-3


@dataclass
class ExportResult:
    """Where the export went and what ``export.json`` records."""

    output: Path
    info: dict[str, Any]


class _LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits: the graph's whole interface, positional."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # type: ignore[no-any-return]


def _check_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """The forms asked for, each once; text is ``all`` or names joined by commas."""
    if isinstance(formats, str):
        names = [f.strip() for f in formats.split(",") if f.strip()]
        formats = FORMATS if names == ["all"] else names
    chosen = tuple(dict.fromkeys(formats))
    bad = [f for f in chosen if f not in FORMATS]
    if not chosen or bad:
        raise BudgetloraError(
            f"{option('format')} {','.join(bad) or '(none)'}: allowed: {', '.join(FORMATS)} (or all)"
        )
    return chosen


def _check_output(output: Path, overwrite: bool) -> None:
    check_output_path(output, "OUT", folder=True)
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise BudgetloraError(
            f"OUT {output} exists and is not empty; pass {option('overwrite')} to replace it "
            "(the old folder stays until the new export is complete)"
        )


def export(
    run_dir: str | Path,
    output: str | Path,
    *,
    formats: str | Sequence[str] = "merged",
    model: str | None = None,
    opset: int = 18,
    overwrite: bool = False,
) -> ExportResult:
    """Merge the run's adapter and write ``formats`` into ``output`` with the tokenizer, a
    model card (``README.md``) and ``export.json``, checked, in one rename.

    Every input is checked before any weights load; a failure leaves ``output`` as it was
    (absent or the old export).

    Args:
        run_dir: a finished run folder (from budgetlora train)
        output: export folder to write
        formats: merged (a transformers save_pretrained folder), onnx (model.onnx), or all (both;
            also merged,onnx)
        model: base model folder or Hub id, if not the one recorded in the run
        opset: ONNX opset of the graph, 18 to 23
        overwrite: replace an existing export (once the new one is complete)
    """
    from budgetlora.inference.merged import read_run_config
    from budgetlora.model.modeling import load_model_config

    run_dir, output = Path(run_dir), Path(output)
    chosen = _check_formats(formats)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= 23:
        raise BudgetloraError(f"{option('opset')} {opset!r}: allowed: 18..23")
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if "onnx" in chosen and missing:
        raise BudgetloraError(
            f"{setting('format', 'onnx')} needs {', '.join(missing)}: pip install 'budgetlora[onnx]' (or pass {setting('format', 'merged')})"
        )
    cfg = read_run_config(run_dir, model)
    if not is_finished(run_dir):
        raise BudgetloraError(
            f"the run {run_dir} is not finished ({METRICS} is missing): finish it with "
            f"`budgetlora train --resume --output {run_dir}` before exporting it"
        )
    try:
        load_model_config(cfg.model.name_or_path)
    except BudgetloraError as err:
        raise BudgetloraError(f"the base model of {run_dir} cannot be read: {err}") from err
    if "merged" in chosen and cfg.model.head not in _TRANSFORMERS_HEADS:
        raise BudgetloraError(
            f"{setting('format', 'merged')}: the run {run_dir} uses model.head={cfg.model.head!r}, which no "
            "transformers class reproduces (budgetlora's own linear layer); export it with "
            f"{setting('format', 'onnx')}, or train with {setting('model.head', 'default')}"
        )
    _check_output(output, overwrite)
    with output_lock(output):
        return _export(run_dir, cfg, output, chosen, opset)


def _export(run_dir: Path, cfg: Any, output: Path, chosen: tuple[str, ...], opset: int) -> ExportResult:
    """:func:`export` once every input is checked and the output locked."""
    from budgetlora.inference.merged import load_run

    # float32 on the CPU whatever the run trained in: both forms are meant for any machine.
    run = load_run(run_dir, cfg=cfg, mixed_precision="no")
    merged: Any = run.model.to("cpu", torch.float32).eval()
    tokenizer = run.tokenizer
    # pipeline(..., truncation=True) cuts at model_max_length: the length the run trained at.
    tokenizer.model_max_length = cfg.data.max_length
    batch = tokenizer(list(_CHECK_TEXTS), padding=True, truncation=True, return_tensors="pt")
    inputs = (batch["input_ids"].long(), batch["attention_mask"].long())
    with torch.inference_mode():
        reference = merged(input_ids=inputs[0], attention_mask=inputs[1]).logits.numpy()  # (4, labels)

    info: dict[str, Any] = {
        "budgetlora_version": version("budgetlora"),
        "run": str(run_dir.resolve()),
        "base_model": cfg.model.name_or_path,
        "head": cfg.model.head,
        "label_names": list(run.label_names),
        "max_length": cfg.data.max_length,
        "formats": list(chosen),
        "budget": read_budget(run_dir),
        "metrics": headline_metrics(run_dir),
        "checks": {},
    }

    def fill(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        if "merged" in chosen:
            merged.save_pretrained(tmp)
            info["checks"]["merged_max_logit_diff"] = _check_transformers(tmp, inputs, reference)
        if "onnx" in chosen:
            _export_onnx(merged, inputs, ExportFolder(tmp).onnx, opset, cfg.data.max_length)
            info["onnx"] = {
                "file": ONNX_FILE,
                "opset": opset,
                "inputs": {
                    "input_ids": "int64 (batch, sequence)",
                    "attention_mask": "int64 (batch, sequence)",
                },
                "outputs": {"logits": f"float32 (batch, {len(run.label_names)})"},
            }
            info["checks"]["onnx_max_logit_diff"] = _check_onnx(ExportFolder(tmp).onnx, inputs, reference)
        write_text_atomic(ExportFolder(tmp).card, model_card(cfg, info))
        write_json_atomic(ExportFolder(tmp).info, info)

    replace_dir_atomic(output, fill)
    return ExportResult(output, info)


def _export_onnx(
    model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], path: Path, opset: int, max_length: int
) -> None:
    # The dynamo exporter (torch.export + onnxscript): the legacy TorchScript tracer bakes
    # parts of transformers' attention-mask construction in as constants and its graph then
    # scores padded batches wrongly (logits off by 1e-2 on a tiny RoBERTa).
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=max_length)
    axes = {0: batch, 1: sequence}
    try:
        torch.onnx.export(
            _LogitsOnly(model).eval(),
            inputs,
            str(path),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            opset_version=opset,
            dynamic_shapes={"input_ids": axes, "attention_mask": axes},
            # One file: the encoders this tool trains are far below protobuf's 2 GB limit.
            external_data=False,
        )
    except Exception as err:  # the exporter raises many types; the user needs the first line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise BudgetloraError(f"the ONNX export of {type(model).__name__} failed: {first}") from err


def _check_transformers(
    folder: Path, inputs: tuple[torch.Tensor, torch.Tensor], reference: np.ndarray
) -> float:
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = reloaded(input_ids=inputs[0], attention_mask=inputs[1]).logits.numpy()
    return _compare(logits, reference, "the transformers model")


def _check_onnx(path: Path, inputs: tuple[torch.Tensor, torch.Tensor], reference: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()})
    return _compare(np.asarray(logits), reference, "the ONNX graph")


def _compare(logits: np.ndarray, reference: np.ndarray, what: str) -> float:
    diff = float(np.abs(logits - reference).max()) if logits.shape == reference.shape else float("inf")
    if not diff <= _MAX_LOGIT_DIFF:
        raise ExportCheckError(
            f"{what} does not reproduce the merged model: logits differ by {diff:.3g} "
            f"(allowed {_MAX_LOGIT_DIFF:g}); nothing was written"
        )
    return diff


def model_card(cfg: RunConfig, info: dict[str, Any]) -> str:
    """The export's README.md in the Hub's model-card format (YAML metadata + markdown)."""
    budget = info.get("budget") or {}
    sections = (
        _card_metadata(cfg),
        _card_summary(cfg, info, budget),
        _card_results(cfg, info, budget),
        _card_training(cfg),
        _card_loading(info["formats"]),
    )
    return "\n".join(line for section in sections for line in section)


def _card_metadata(cfg: RunConfig) -> list[str]:
    base, data = cfg.model.name_or_path, cfg.data.source
    meta = ["library_name: transformers", "pipeline_tag: text-classification"]
    meta += [f"base_model: {base}"] if is_hub_id(base) else []
    meta += [f"datasets:\n- {data}"] if is_hub_id(data) else []
    meta += ["tags:\n- budgetlora\n- lora\n- text-classification", "metrics:\n- accuracy\n- f1"]
    return ["---", *meta, "---", ""]


def _card_summary(cfg: RunConfig, info: dict[str, Any], budget: dict[str, Any]) -> list[str]:
    """The title, what the model is, its labels and the data it learnt from."""
    return [
        f"# {Path(info['run']).name}",
        "",
        f"A {len(info['label_names'])}-class text classifier: `{cfg.model.name_or_path}` fine-tuned with LoRA by "
        f"budgetlora under a budget of {budget.get('budget', cfg.budget):,} trainable "
        f"parameters ({budget.get('trainable', 0):,} trained), the adapter merged into the weights: "
        "no peft or budgetlora is needed to use it.",
        "",
        "## Labels",
        "",
        "| id | label |",
        "| ---: | --- |",
        *[f"| {i} | {name} |" for i, name in enumerate(info["label_names"])],
        "",
        "## Data",
        "",
        f"Trained on `{cfg.data.source}` (text column `{cfg.data.text_column}`, label column "
        f"`{cfg.data.label_column}`), texts truncated at {cfg.data.max_length} tokens; validation and test "
        f"rows held out with split seed {cfg.data.split_seed}.",
        "",
    ]


def _card_results(cfg: RunConfig, info: dict[str, Any], budget: dict[str, Any]) -> list[str]:
    """The trainable parameters by group and the run's scores."""
    return [
        "## Trainable parameters",
        "",
        "| group | parameters |",
        "| --- | ---: |",
        *[f"| {group} | {count:,} |" for group, count in budget.get("groups", {}).items()],
        f"| trainable | {budget.get('trainable', 0):,} |",
        f"| budget | {budget.get('budget', cfg.budget):,} |",
        "",
        "## Results",
        "",
        "| split | rows | accuracy | macro-F1 |",
        "| --- | ---: | ---: | ---: |",
        *[
            f"| {split} | {m['n']:,} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |"
            for split, m in info["metrics"].items()
        ],
        "",
    ]


def _card_training(cfg: RunConfig) -> list[str]:
    lora, train = cfg.model.lora, cfg.train
    return [
        "## Training",
        "",
        f"- LoRA r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g} on {', '.join(lora.target_modules)}"
        + (f" of layers {', '.join(map(str, lora.layers))}" if lora.layers else "")
        + f"; bias {lora.bias}; head `{cfg.model.head}`",
        f"- optimizer {train.optimizer}, lr {train.lr:g}, batch size {train.batch_size}, "
        + (f"{train.max_steps} steps" if train.max_steps else f"{train.epochs:g} epochs")
        + f", scheduler {train.scheduler}, seed {train.seed}, mixed precision {train.mixed_precision}",
        "- the kept checkpoint: the best validation " + train.best_metric,
        "",
    ]


def _card_loading(formats: Sequence[str]) -> list[str]:
    """How to load each form the export holds."""
    lines = ["## How to load", ""]
    if "merged" in formats:
        lines += [
            "```python",
            "from transformers import pipeline",
            "",
            'classifier = pipeline("text-classification", model="PATH_OR_HUB_ID", top_k=None)',
            'classifier(["Stocks rally as oil falls"], truncation=True)',
            "```",
            "",
        ]
    if "onnx" in formats:
        lines += [
            "```python",
            "import numpy as np, onnxruntime as ort",
            "from transformers import AutoTokenizer",
            "",
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
            'session = ort.InferenceSession("PATH/model.onnx", providers=["CPUExecutionProvider"])',
            'batch = tokenizer(["Stocks rally as oil falls"], padding=True, truncation=True, return_tensors="np")',
            'inputs = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}',
            '(logits,) = session.run(["logits"], inputs)  # (batch, labels)',
            "```",
            "",
        ]
    lines += ["Or serve it over HTTP: `budgetlora serve PATH` (`pip install 'budgetlora[serve]'`).", ""]
    return lines
