"""Knowledge distillation: a stronger teacher's soft labels train the budgeted student.

The teacher is a budgetlora run folder, a LoRA adapter folder (``adapter_config.json``
naming its base model) or a sequence-classification checkpoint (local folder or Hub id).
Its logits over the student's rows are computed once with the fast inference path,
cached on disk (``<cache>/teacher/<key>.npy``, key = teacher files + tokenizer + max
length + texts) and reused by every student run and sweep trial; the teacher is freed
before the student trains. The student trains with :func:`budgetlora.training.train.train` and a
:func:`budgetlora.training.losses.distillation_loss`. With ``distill.transfer`` the texts of
``data.unlabelled`` join its training rows, labelled by the teacher (transfer data).
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from budgetlora.config import DistillSettings, ModelConfig, RunConfig, load_config
from budgetlora.data.batching import cache_dir, cache_key, encode, pad_id
from budgetlora.data.tables import Splits, TextTable, read_unlabelled
from budgetlora.errors import BudgetloraError, option
from budgetlora.inference.merged import inference_model, load_run, predict_logits
from budgetlora.model.modeling import (
    check_max_length,
    is_hub_id,
    load_base_model,
    load_model_config,
    load_tokenizer,
)
from budgetlora.model.roles import is_head_output
from budgetlora.reporting.metrics import score
from budgetlora.rundir import (
    RunFolder,
    atomic_path,
    check_output,
    read_budget,
    tokenizer_source,
    write_json_atomic,
    write_text_atomic,
)
from budgetlora.runtime import Runtime, is_main_process, make_runtime, writer_lock
from budgetlora.training.losses import distillation_loss_fn
from budgetlora.training.train import EvalCallback, PreparedRun, TrainResult, prepare_run, train

__all__ = [
    "Teacher",
    "TeacherLogits",
    "DistillResult",
    "resolve_teacher",
    "teacher_logits",
    "transfer_rows",
    "distill",
]

_GENERIC_LABEL = re.compile(r"(?i)label_?\d+")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".yaml", ".txt", ".model")


@dataclass(frozen=True)
class Teacher:
    """A teacher found on disk or on the Hub, described without loading its weights."""

    source: str
    kind: Literal["run", "adapter", "checkpoint"]
    num_labels: int
    label_names: tuple[str, ...] | None
    """None when the teacher records no real class names (LABEL_0, ...): matched by count."""
    tokenizer_source: str
    base: str | None
    """An adapter's base model."""
    max_length: int | None
    """A run folder's own max length; None: the student's."""
    precision: str
    """Inference precision: a run folder's own train.mixed_precision, else auto."""
    identity: str
    """What the cache key holds for the teacher: its files' names, sizes and times, or the Hub id."""


def _files_identity(folder: Path) -> str:
    parts = [str(folder.resolve())]
    for item in sorted(folder.iterdir()):
        if item.is_file() and item.suffix in _WEIGHT_SUFFIXES:
            stat = item.stat()
            parts.append(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def _model_identity(name_or_path: str) -> str:
    path = Path(name_or_path)
    return _files_identity(path) if path.is_dir() else f"hub:{name_or_path}"


def _head_rows(folder: Path) -> int | None:
    """Output size of the classification head stored in a folder's safetensors files."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118  (a safetensors handle is not a dict)
                if is_head_output(key):
                    return int(fh.get_slice(key).get_shape()[0])
    return None


def _real_names(names: tuple[str, ...]) -> tuple[str, ...] | None:
    return None if all(_GENERIC_LABEL.fullmatch(n) for n in names) else names


def resolve_teacher(source: str) -> Teacher:
    """Find out what kind of teacher ``source`` is and how many labels it has (no weights read)."""
    path = Path(source).expanduser()
    is_dir, run = path.is_dir(), RunFolder(path)
    if is_dir and run.config.is_file() and run.adapter_config.is_file():
        cfg = load_config(run.config)
        names = tuple(cfg.data.label_names or ())
        if not names:
            raise BudgetloraError(f"teacher run {path}: its config.yaml records no data.label_names")
        tokenizer = tokenizer_source(path, cfg.model.name_or_path)
        identity = _files_identity(path) + "|" + _model_identity(cfg.model.name_or_path)
        precision = cfg.train.mixed_precision
        return Teacher(
            source, "run", len(names), names, tokenizer, None, cfg.data.max_length, precision, identity
        )
    if is_dir and run.adapter_config.is_file():
        base = json.loads(run.adapter_config.read_text()).get("base_model_name_or_path")
        rows = _head_rows(path)
        if not base or rows is None:
            raise BudgetloraError(
                f"teacher adapter {path}: adapter_config.json must name base_model_name_or_path and the "
                "adapter must hold a trained classification head (modules_to_save)"
            )
        tokenizer = tokenizer_source(path, base)
        identity = _files_identity(path) + "|" + _model_identity(base)
        return Teacher(source, "adapter", rows, None, tokenizer, base, None, "auto", identity)
    if is_dir and not (path / "config.json").is_file():
        raise BudgetloraError(
            f"teacher {path} is neither a budgetlora run folder (config.yaml + adapter), a LoRA adapter "
            "folder (adapter_config.json) nor a model folder (config.json)"
        )
    if not is_dir and not is_hub_id(source):
        raise BudgetloraError(f"teacher not found: {source}")
    id2label: dict[Any, Any] = dict(load_model_config(source).id2label or {})
    rows = _head_rows(path) if is_dir else None
    if rows is None and is_dir and any(path.glob("*.safetensors")):
        raise BudgetloraError(
            f"teacher {source} has no trained classification head (a plain encoder): train a teacher "
            "first (budgetlora train) and pass its run folder"
        )
    num = rows or len(id2label)
    names = tuple(str(id2label[i]) for i in range(num)) if len(id2label) == num else ()
    real = _real_names(names) if names else None
    return Teacher(source, "checkpoint", num, real, source, None, None, "auto", _model_identity(source))


def _check_labels(teacher: Teacher, student: tuple[str, ...]) -> str:
    """'name' or 'count': how the label sets were matched; raises when they differ."""
    shown = ", ".join(teacher.label_names) if teacher.label_names else "names not recorded"
    if teacher.num_labels != len(student):
        raise BudgetloraError(
            f"teacher {teacher.source} has {teacher.num_labels} labels ({shown}) but the student's data has "
            f"{len(student)} ({', '.join(student)}): teacher and student must share the label set"
        )
    if teacher.label_names is None or _real_names(student) is None:
        return "count"
    if teacher.label_names != student:
        order = " (the same classes in another order)" if set(teacher.label_names) == set(student) else ""
        raise BudgetloraError(
            f"teacher {teacher.source} labels ({shown}) differ from the student's ({', '.join(student)}){order}: "
            "teacher and student must share the label set, in the same order"
        )
    return "name"


def _load_teacher_model(
    teacher: Teacher, label_names: tuple[str, ...], runtime: Runtime
) -> tuple[torch.nn.Module, Runtime]:
    if teacher.kind == "run":
        run = load_run(teacher.source, mixed_precision=runtime.mixed_precision)
        return run.model, run.runtime
    model: torch.nn.Module
    if teacher.kind == "adapter":
        from peft import PeftModel

        assert teacher.base is not None
        base = load_base_model(ModelConfig(name_or_path=teacher.base), label_names)
        try:
            model = PeftModel.from_pretrained(base, teacher.source)
        except (ValueError, RuntimeError, KeyError) as err:
            raise BudgetloraError(
                f"teacher adapter {teacher.source} does not fit its base model {teacher.base!r}: "
                f"{str(err).splitlines()[0][:300]}"
            ) from err
    else:
        model = load_base_model(ModelConfig(name_or_path=teacher.source), label_names)
    return inference_model(model, runtime), runtime


@dataclass
class TeacherLogits:
    """The teacher's logits over the student's splits, each (n, labels) float32 in split order."""

    teacher: Teacher
    logits: dict[str, np.ndarray]
    """Split name (train, validation, test, transfer) -> (n, labels)."""
    metrics: dict[str, dict[str, float]]
    """Split name -> the teacher's accuracy and macro-F1 on the student's labelled rows."""
    labels_matched_by: str
    cache_files: dict[str, str]
    computed: list[str]
    """Splits computed now (the others came from the cache)."""
    precision: str
    """The teacher's inference precision (no, bf16, fp16)."""


def teacher_logits(
    teacher: str | Teacher, splits: Splits, max_length: int, transfer: TextTable | None = None
) -> TeacherLogits:
    """The teacher's logits over ``splits`` (train, validation, and test if any) and over the
    unlabelled ``transfer`` texts if given (as split "transfer"), from the cache when there;
    only missing splits load the teacher, which is freed on return."""
    teacher = resolve_teacher(teacher) if isinstance(teacher, str) else teacher
    matched = _check_labels(teacher, tuple(splits.label_names))
    length = teacher.max_length or max_length
    if teacher.max_length is None:  # the student's length: it must fit the teacher's model too
        check_max_length(ModelConfig(name_or_path=teacher.base or teacher.source), length)
    tokenizer = load_tokenizer(teacher.tokenizer_source)
    tables: dict[str, TextTable] = {"train": splits.train, "validation": splits.validation}
    if splits.test is not None:
        tables["test"] = splits.test
    if transfer is not None:
        tables["transfer"] = transfer
    runtime = make_runtime(teacher.precision)  # its resolved precision and device key the cache
    precision = f"{runtime.device.type}:{runtime.mixed_precision}"
    folder = cache_dir() / "teacher"
    paths = {
        s: folder / f"{cache_key(t.texts, tokenizer, length, teacher.identity, precision)}.npy"
        for s, t in tables.items()
    }
    logits: dict[str, np.ndarray] = {}
    for split, path in paths.items():
        try:
            cached = np.load(path) if path.is_file() else None
        except (OSError, ValueError):
            cached = None  # a damaged entry is computed again
        if cached is not None and cached.shape == (len(tables[split]), teacher.num_labels):
            logits[split] = cached
    computed = [s for s in tables if s not in logits]
    if computed:
        model, runtime = _load_teacher_model(teacher, tuple(splits.label_names), runtime)
        for split in computed:
            encoded = encode(tables[split].texts, None, tokenizer, length)
            logits[split] = predict_logits(
                model, encoded, runtime, pad_token_id=pad_id(tokenizer), progress=True
            )
            if runtime.is_main_process:
                with atomic_path(paths[split]) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, logits[split])
        del model  # free the teacher before the student is built
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    metrics = {}
    for split, table in tables.items():
        if table.labels is None:  # the transfer texts
            continue
        result = score(logits[split], table.labels, splits.label_names)
        metrics[split] = {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"], "n": len(table)}
    files = {s: str(p) for s, p in paths.items()}
    return TeacherLogits(teacher, logits, metrics, matched, files, computed, runtime.mixed_precision)


@dataclass
class DistillResult:
    run_dir: Path
    student: TrainResult
    baseline: TrainResult | None
    teacher: TeacherLogits
    summary: dict[str, Any]
    """What ``distill.json`` holds."""


def _teacher_summary(soft: TeacherLogits, max_length: int) -> dict[str, Any]:
    path = Path(soft.teacher.source)
    budget = read_budget(path) if path.is_dir() else None
    return {
        "source": soft.teacher.source,
        "path": str(path.resolve()) if path.exists() else soft.teacher.source,
        "kind": soft.teacher.kind,
        "labels_matched_by": soft.labels_matched_by,
        "max_length": soft.teacher.max_length or max_length,
        "precision": soft.precision,
        "trainable": budget["trainable"] if budget else None,
        **soft.metrics,
        "logits_cache": soft.cache_files,
    }


def _scores(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        s: {"accuracy": metrics[s]["accuracy"], "macro_f1": metrics[s]["macro_f1"]}
        for s in ("validation", "test")
        if s in metrics
    }


def distill(
    student_cfg: RunConfig | PreparedRun,
    teacher: str | None = None,
    *,
    alpha: float | None = None,
    temperature: float | None = None,
    compare_baseline: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    on_eval: EvalCallback | None = None,
) -> DistillResult:
    """Train ``student_cfg`` on ``(1 - alpha) * CE + alpha * T^2 * KL(teacher || student)``.

    The teacher, alpha and T are ``student_cfg.distill``'s; ``teacher``, ``alpha`` and
    ``temperature``, when given, replace them. The run folder's ``config.yaml`` records them
    (``budgetlora distill --config`` on it re-runs the distillation); it also gets
    ``distill.json`` (teacher, student and baseline scores) and a Distillation section in
    ``report.md``. ``compare_baseline`` also trains the same student without distillation into
    ``<output>-baseline``. ``resume`` continues an interrupted student from its last
    checkpoint, as ``train`` does (the teacher's logits come from the cache).
    ``student_cfg`` may be a run :func:`prepare_run` made already (a sweep's trial).
    """
    cfg = student_cfg.cfg if isinstance(student_cfg, PreparedRun) else student_cfg
    given: dict[str, Any] = {"teacher": teacher, "alpha": alpha, "temperature": temperature}
    settings = replace(cfg.distill, **{k: v for k, v in given.items() if v is not None})
    if settings.teacher is None:
        raise BudgetloraError(
            f"no teacher: give {option('distill.teacher')} (a run folder, model folder or Hub id)"
        )
    if resume and compare_baseline:
        raise BudgetloraError(
            f"{option('resume')} continues the student only: leave out {option('compare_baseline')}"
        )
    # prepare_run checks the budget: an over-budget student fails before the teacher runs.
    if isinstance(student_cfg, PreparedRun):
        student = replace(student_cfg, cfg=replace(cfg, distill=settings))
    else:
        student = prepare_run(replace(cfg, distill=settings))
    run_dir = Path(student.cfg.output)
    check_output(run_dir, overwrite, resume)  # before the teacher runs: train() would refuse only after it
    if compare_baseline:
        check_output(RunFolder(run_dir).baseline, overwrite)
    with writer_lock(run_dir):  # the teacher's logits, the student and the summary: one writer throughout
        return _distill(student, overwrite, resume, compare_baseline, on_eval)


def _distill(
    student: PreparedRun, overwrite: bool, resume: bool, compare_baseline: bool, on_eval: EvalCallback | None
) -> DistillResult:
    """:func:`distill` once the student's folder is checked and locked."""
    cfg, settings = student.cfg, student.cfg.distill
    assert settings.teacher is not None
    folder = RunFolder(Path(cfg.output))
    transfer = read_unlabelled(cfg.data) if settings.transfer else None
    soft = teacher_logits(settings.teacher, student.splits, cfg.data.max_length, transfer)
    rows, notes, train_logits = None, {}, soft.logits["train"]
    if transfer is not None:
        rows = transfer_rows(transfer, soft.logits["transfer"], student.splits.label_names)
        notes = {"Transfer data": _transfer_note(rows, cfg.data.unlabelled)}
        train_logits = np.concatenate([train_logits, soft.logits["transfer"]])  # the rows' order in train()
    loss_fn = distillation_loss_fn(
        train_logits, settings.alpha, settings.temperature, cfg.train.label_smoothing
    )
    trained = train(
        student,
        overwrite=overwrite,
        resume=resume,
        loss_fn=loss_fn,
        on_eval=on_eval,
        extra_rows=rows,
        notes=notes,
    )
    main = is_main_process()
    report = folder.report.read_text(encoding="utf-8") if main else ""
    summary: dict[str, Any] = {
        "teacher": _teacher_summary(soft, cfg.data.max_length),
        "alpha": settings.alpha,
        "temperature": settings.temperature,
        "student": {
            "run_dir": str(folder.path),
            "trainable": student.budget.trainable,
            **_scores(trained.metrics),
        },
        "baseline": None,
        "transfer": None if rows is None else _transfer_summary(rows, cfg.data.unlabelled),
    }
    if main:
        _write_summary(folder, summary, report)
    baseline = None
    if compare_baseline:
        baseline = _train_baseline(student, overwrite, summary)
        if main:
            _write_summary(folder, summary, report)
    return DistillResult(folder.path, trained, baseline, soft, summary)


def _train_baseline(student: PreparedRun, overwrite: bool, summary: dict[str, Any]) -> TrainResult:
    """The same student trained without distillation, beside it; its scores into ``summary``."""
    baseline_dir = RunFolder(Path(student.cfg.output)).baseline
    plain = replace(student.cfg, output=str(baseline_dir), distill=DistillSettings())
    baseline = train(replace(student, cfg=plain), overwrite=overwrite)
    summary["baseline"] = {"run_dir": str(baseline_dir), "trainable": student.budget.trainable}
    summary["baseline"].update(_scores(baseline.metrics))
    return baseline


def transfer_rows(texts: TextTable, logits: np.ndarray, label_names: Sequence[str]) -> TextTable:
    """The unlabelled ``texts`` as training rows: each labelled by the teacher's top class."""
    return replace(texts, labels=logits.argmax(axis=1).astype(np.int64), label_names=tuple(label_names))


def _transfer_summary(rows: TextTable, source: str | None) -> dict[str, Any]:
    assert rows.labels is not None and rows.label_names is not None
    counts = np.bincount(rows.labels, minlength=len(rows.label_names))
    shares = {name: float(c / len(rows)) for name, c in zip(rows.label_names, counts, strict=True)}
    return {"source": source, "rows": len(rows), "teacher_class_shares": shares}


def _transfer_note(rows: TextTable, source: str | None) -> str:
    shares = _transfer_summary(rows, source)["teacher_class_shares"]
    shown = ", ".join(f"{name} {share:.0%}" for name, share in shares.items())
    return (
        f"The student also trained on the {len(rows):,} texts of `{source}` (data.unlabelled), labelled by the "
        f"teacher: its soft labels in the distillation term, its top class in the cross-entropy "
        f"(distill.transfer). The teacher's classes there: {shown}."
    )


def _pct(scores: dict[str, Any], split: str) -> str:
    return f"{scores[split]['accuracy']:.2%}" if split in scores else "—"


def _write_summary(folder: RunFolder, summary: dict[str, Any], report: str) -> None:
    """distill.json, and report.md as train() wrote it plus a Distillation section."""
    write_json_atomic(folder.distill, summary)
    teacher, student, baseline = summary["teacher"], summary["student"], summary["baseline"]
    rows = [("teacher", teacher), ("student (distilled)", student)]
    if baseline is not None:
        rows.append((f"student without distillation (`{baseline['run_dir']}`)", baseline))
    table = [
        "| model | trainable parameters | validation accuracy | test accuracy |",
        "| :--- | ---: | ---: | ---: |",
    ]
    for name, scores in rows:
        trainable = f"{scores['trainable']:,}" if scores.get("trainable") is not None else "—"
        table.append(f"| {name} | {trainable} | {_pct(scores, 'validation')} | {_pct(scores, 'test')} |")
    section = (
        "## Distillation\n\n"
        f"Teacher: `{teacher['path']}` ({teacher['kind']}; labels matched by {teacher['labels_matched_by']}). "
        f"Loss: (1 − α)·CE + α·T²·KL(teacher ‖ student) with α = {summary['alpha']}, T = {summary['temperature']}. "
        "All rows are the student's own validation and test rows.\n\n"
        + "\n".join(table)
        + f"\n\nRe-run: `budgetlora distill --config {folder.config} --output NEW_FOLDER`\n"
    )
    write_text_atomic(folder.report, report.rstrip("\n") + "\n\n" + section)
