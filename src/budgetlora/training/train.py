"""The training loop: one explicit loop on accelerate, read top to bottom.

:func:`train` is the order of work: check the output folder → read the data and count
the budget on the weightless skeleton (no tokenization, no weights: an over-budget config
fails in seconds) → set up (weights, tokens, optimizer; every device decision comes from
:mod:`budgetlora.runtime`) → restore a checkpoint → :func:`fit` (the loop) → final
metrics → write the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from budgetlora.config import RunConfig, TrainSettings, config_to_dict, save_config
from budgetlora.data.augment import augment_table
from budgetlora.data.batching import Collator, Encoded, encode, iterate, length_grouped_batches, pad_id
from budgetlora.data.tables import Splits, TextTable, concat_tables, load_splits, read_unlabelled
from budgetlora.errors import BudgetloraError, option
from budgetlora.inference.merged import LoadedRun, inference_model, predict_logits
from budgetlora.inference.shift import expectation
from budgetlora.model.budget import Budget, check_budget, count_trainable, measure, resolve_size
from budgetlora.model.methods import TITLES, size_of, with_size
from budgetlora.model.modeling import build_model, check_max_length, display_name, load_tokenizer
from budgetlora.model.roles import is_head_parameter
from budgetlora.reporting.metrics import as_score, score
from budgetlora.reporting.report import write_report
from budgetlora.rundir import RunFolder, check_output
from budgetlora.runtime import (
    Runtime,
    StopAgreement,
    check_shared_folder,
    compilations,
    compile_for_training,
    load_scaler_state,
    make_runtime,
    on_main_process,
    restore_rng,
    scaler_state,
)
from budgetlora.training.checkpoint import (
    load_newest_readable,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from budgetlora.training.losses import LossFn, cross_entropy_loss
from budgetlora.training.selftrain import self_train

__all__ = [
    "TrainResult",
    "TrainingInterrupted",
    "EvalCallback",
    "train",
    "fit",
    "prepare_run",
    "cross_entropy_loss",
]

# (logits (batch, labels), batch dict with "labels" and "index") -> scalar loss.
# "index" holds each sample's row in Splits.train, e.g. to look up cached teacher logits.
EVALS_PER_EPOCH = 4
"""Evaluations an epoch when train.eval_every is not set."""
# (step, validation metrics) -> True to stop training early; may raise (e.g. optuna.TrialPruned).
EvalCallback = Callable[[int, dict[str, Any]], bool]


@dataclass
class TrainResult:
    run_dir: Path
    cfg: RunConfig
    budget: Budget
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model: nn.Module
    """The trained peft model (best checkpoint loaded), unwrapped from accelerate."""


@dataclass(frozen=True)
class PreparedRun:
    """A config with its data read, its label names and ``auto`` size resolved and its budget
    checked: the work before any weights load, done once and handed to :func:`train`."""

    cfg: RunConfig
    splits: Splits
    budget: Budget
    seconds: float = 0.0
    """How long it took: the run's phase "read data and check the budget"."""


def prepare_run(cfg: RunConfig) -> PreparedRun:
    """Read the data, resolve label names and an ``auto`` size (``lora.r``, ``vera.r``, ...), and check the budget.

    Nothing is tokenized and no weights are read: an over-budget config, or a max length
    beyond the model's position embeddings, fails in seconds.
    """
    start = time.perf_counter()
    splits = load_splits(cfg.data)
    labels = tuple(splits.label_names)
    cfg = replace(cfg, data=replace(cfg.data, label_names=labels))
    if size_of(cfg.model) == "auto":
        size = resolve_size(cfg.model, labels, cfg.budget)
        assert size is not None  # only IA3 has no size knob, and no 'auto' either
        cfg = replace(cfg, model=with_size(cfg.model, size))
    budget = measure(cfg.model, labels, cfg.budget)
    check_max_length(cfg.model, cfg.data.max_length)  # the config measure just read
    check_budget(budget, cfg.model, labels)
    return PreparedRun(cfg, splits, budget, time.perf_counter() - start)


def _make_optimizer(model: nn.Module, settings: TrainSettings, fused: bool) -> torch.optim.Optimizer:
    """Built on the parameters after they were placed on their device (fused AdamW needs that).

    Four groups: (LoRA and other, head) x (decayed, not decayed: biases and norms); the head's
    groups take ``head_lr`` when it is set.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_head = is_head_parameter(name)
            decays = not (name.endswith("bias") or "norm" in name.lower())
            groups.setdefault((is_head, decays), []).append(param)
    head_lr = settings.head_lr if settings.head_lr is not None else settings.lr
    param_groups = [
        {
            "params": params,
            "weight_decay": settings.weight_decay if decays else 0.0,
            "lr": head_lr if is_head else settings.lr,
        }
        for (is_head, decays), params in sorted(groups.items())
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=settings.lr, momentum=settings.momentum)
    cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return cls(param_groups, lr=settings.lr, fused=fused)


def _make_scheduler(optimizer: Any, settings: TrainSettings, total_steps: int) -> Any:
    """The learning-rate schedule of ``train.scheduler``, warmed up over ``warmup_steps`` (or ``warmup_ratio``)."""
    warmup = (
        settings.warmup_steps
        if settings.warmup_steps is not None
        else int(settings.warmup_ratio * total_steps)
    )
    scheduler_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    return get_scheduler(
        scheduler_name[settings.scheduler],
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
    )


class _History:
    """history.jsonl, appended line by line as the run goes (main process only)."""

    def __init__(
        self,
        path: Path | None,
        tensorboard_dir: Path | None,
        echo: bool = False,
        records: list[dict[str, Any]] | None = None,
    ) -> None:
        self.records: list[dict[str, Any]] = list(records or [])  # from a checkpoint when resuming
        self.path = path
        self.echo = echo  # print each record (when there is no progress bar to show it)
        self._fh = path.open("w", encoding="utf-8") if path is not None else None
        for record in self.records:
            if self._fh is not None:
                self._fh.write(json.dumps(record) + "\n")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise BudgetloraError(
                    f"{option('train.tensorboard')} needs the tensorboard package: pip install tensorboard"
                ) from err
            self._tb = SummaryWriter(str(tensorboard_dir))

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.echo:
            print(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                flush=True,
            )
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        if self._tb is not None:
            prefix = "train" if record["type"] == "train" else record.get("split", "eval")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


@dataclass
class _Progress:
    """Where the loop is; saved in checkpoints so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # this process's batches of `epoch` already trained on
    samples: int = 0
    train_seconds: float = 0.0
    running_count: int = 0  # micro-batches since the last log step
    best_value: float = -math.inf  # as_score(): the validation loss negated
    best_step: int = 0
    stale: int = 0  # evaluations since the best one

    def advance(self, micro_batches: int, samples: int, seconds: float) -> None:
        """One optimizer step done: ``micro_batches`` of ``samples`` (all processes) in ``seconds``."""
        self.step += 1
        self.batch_in_epoch += micro_batches
        self.running_count += micro_batches
        self.samples += samples
        self.train_seconds += seconds


@dataclass
class _LoopState:
    """What the loop updates as it goes, and a checkpoint saves."""

    progress: _Progress
    best_state: dict[str, torch.Tensor]
    """The trainable weights of the best validation score so far (its value and step are in progress)."""
    history: _History
    running_loss: torch.Tensor | None = None
    """The loss sum at the checkpoint, when resuming."""


@dataclass
class _Session:
    """Everything the loop works with, made by :func:`_set_up`."""

    cfg: RunConfig
    runtime: Runtime
    model: nn.Module
    """As prepared by accelerate (DDP, compiled); train through this one."""
    bare: nn.Module
    """The same peft model unwrapped: its parameter names and eager forward."""
    tokenizer: PreTrainedTokenizerBase
    optimizer: Any
    scheduler: Any
    train_enc: Encoded
    val_enc: Encoded
    test_enc: Encoded | None
    collate: Collator
    total_steps: int
    tapt: dict[str, Any] | None = None
    """The masked-LM steps before training (tapt.*): their losses, for metrics.json."""

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This process's training batches (index arrays) of ``epoch``."""
        settings = self.cfg.train
        return length_grouped_batches(
            self.train_enc.lengths,
            settings.batch_size,
            seed=settings.seed,
            epoch=epoch,
            world_size=self.runtime.num_processes,
            rank=self.runtime.process_index,
            group_by_length=settings.group_by_length,
        )

    def load(self, batches: list[np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
        """The padded CPU batches of ``batches`` (index arrays), in order."""
        return iterate(
            batches,
            self.collate,
            num_workers=self.cfg.train.num_workers,
            pin_memory=self.runtime.plan.pin_memory,
        )

    def logits(self, encoded: Encoded, model: nn.Module | None = None) -> np.ndarray:
        """Logits of ``encoded`` by the training model (or ``model``), in row order."""
        return predict_logits(
            model if model is not None else self.bare,
            encoded,
            self.runtime,
            batch_size=self.cfg.train.eval_batch_size,
            pad_token_id=pad_id(self.tokenizer),
        )


@dataclass(frozen=True)
class _Options:
    """:func:`train`'s keyword arguments."""

    overwrite: bool
    resume: bool
    loss_fn: LossFn | None
    on_eval: EvalCallback | None
    extra_rows: TextTable | None
    notes: dict[str, str]


def train(
    cfg: RunConfig | PreparedRun,
    *,
    overwrite: bool = False,
    resume: bool = False,
    loss_fn: LossFn | None = None,
    on_eval: EvalCallback | None = None,
    extra_rows: TextTable | None = None,
    notes: dict[str, str] | None = None,
) -> TrainResult:
    """Train ``cfg`` and write its run folder; returns the budget, metrics and history.

    ``cfg`` may be a run :func:`prepare_run` made already (distillation and the sweep check
    the budget first): its data are then not read again. ``resume`` continues from the
    newest checkpoint in the run folder (model, optimizer, scheduler, RNG states, data
    position, history). ``loss_fn`` replaces the cross-entropy (distillation); ``on_eval``
    sees every validation result and may stop the run (a sweep's pruner). A config with
    self-training rounds runs them all (:mod:`budgetlora.training.selftrain`); ``extra_rows``
    (labelled, e.g. pseudo-labelled) join the training rows, and ``notes`` (title -> Markdown)
    are added to the report.
    """
    run = cfg
    cfg = run.cfg if isinstance(run, PreparedRun) else run
    if cfg.distill.teacher is not None and loss_fn is None:
        raise BudgetloraError(
            f"distill.teacher is set ({cfg.distill.teacher}): this config distils; "
            "run it with budgetlora distill (or clear the teacher: --set distill.teacher=null)"
        )
    if cfg.self_training.rounds and extra_rows is None:
        if loss_fn is not None or on_eval is not None:
            raise BudgetloraError("self-training cannot be combined with distillation or a sweep")
        return self_train(cfg, train, overwrite=overwrite, resume=resume)  # type: ignore[no-any-return]
    run_dir = Path(cfg.output)
    check_output(run_dir, overwrite, resume)
    runtime = make_runtime(cfg.train.mixed_precision)
    options = _Options(overwrite, resume, loss_fn, on_eval, extra_rows, notes or {})
    with ExitStack() as held:
        on_main_process(
            runtime.accelerator, lambda: held.enter_context(RunFolder(run_dir).lock()), f"locking {run_dir}"
        )
        return _train(run, runtime, options)


def _train(run: RunConfig | PreparedRun, runtime: Runtime, options: _Options) -> TrainResult:
    """:func:`train`, once its run folder is checked and locked."""
    # A run prepared before train() was called: that work belongs to this phase too.
    clock = _PhaseClock(run.seconds if isinstance(run, PreparedRun) else 0.0)
    prepared = run if isinstance(run, PreparedRun) else prepare_run(run)
    cfg, budget, folder = prepared.cfg, prepared.budget, RunFolder(Path(prepared.cfg.output))
    unlabelled = read_unlabelled(cfg.data) if cfg.data.unlabelled is not None else None
    splits, data_notes = _training_rows(cfg, prepared.splits, options.extra_rows)
    saved = _find_checkpoint(folder.path, cfg, runtime) if options.resume else None
    check_shared_folder(runtime.accelerator, folder.path)
    if runtime.is_main_process:
        print(f"trainable parameters of {cfg.model.name_or_path}:\n{budget.table()}", flush=True)
    clock.lap("read data and check the budget")
    session = _set_up(cfg, splits, budget, runtime, unlabelled)
    state = _restore(session, saved, folder)
    clock.lap("load weights, tokenize, set up")
    try:
        fit(session, state, options.loss_fn, options.on_eval)
    finally:
        state.history.close()
    clock.lap("train (with evaluations)")
    if state.progress.best_step > 0:
        load_trainable_state(session.bare, state.best_state)
    metrics = _final_metrics(session, splits, budget, state.progress)
    metrics["data"].update(data_notes)
    clock.lap("final evaluation")
    report_notes = {**options.notes, **_adaptation_notes(metrics)}
    if unlabelled is not None:
        report_notes.update(_shift_section(session, unlabelled, folder, metrics))
        clock.lap("shift report of the unlabelled texts")
    metrics["timing"]["phases"] = clock.seconds
    report = _RunReport(budget, metrics, state.history, clock, report_notes)
    on_main_process(
        runtime.accelerator,
        lambda: _write_run(folder, session, report, options.overwrite),
        f"writing the run folder {folder.path}",
    )
    runtime.accelerator.wait_for_everyone()
    return TrainResult(folder.path, cfg, budget, metrics, state.history.records, session.bare)


def _training_rows(
    cfg: RunConfig, splits: Splits, extra_rows: TextTable | None
) -> tuple[Splits, dict[str, Any]]:
    """The training rows as the run trains on them: altered by ``augment.*``, then with
    ``extra_rows`` after them; and what changed, for metrics.json."""
    notes: dict[str, Any] = {}
    settings = cfg.augment
    if settings.markers or settings.lowercase or settings.word_dropout:
        train_rows, notes["augmented"] = augment_table(splits.train, settings, cfg.train.seed)
        splits = replace(splits, train=train_rows)
    if extra_rows is not None:
        splits = replace(splits, train=concat_tables(splits.train, extra_rows))
        notes["pseudo_labelled"] = len(extra_rows)
    return splits, notes


def _adaptation_notes(metrics: dict[str, Any]) -> dict[str, str]:
    """Report sections for the augmentation and the masked-LM steps of a run, where it had them."""
    notes = {}
    augmented = metrics["data"].get("augmented")
    if augmented:
        notes["Augmentation"] = (
            f"Of {metrics['data']['train']:,} training texts, {augmented['markers']:,} lost their source markers, "
            f"{augmented['lowercase']:,} were lowercased without punctuation and {augmented['word_dropout']:,} "
            "lost words (augment.*)."
        )
    tapt = metrics.get("tapt")
    if tapt:
        notes["Task-adaptive pretraining"] = (
            f"{tapt['steps']:,} masked-LM steps through the adapter on {tapt['texts']:,} texts before training: "
            f"loss {tapt['first_loss']:.3f} at the start, {tapt['last_loss']:.3f} at the end (tapt.*)."
        )
    return notes


def _shift_section(
    session: _Session, unlabelled: TextTable, folder: RunFolder, metrics: dict[str, Any]
) -> dict[str, str]:
    """The shift report of the unlabelled texts by the trained model, into RUN/shift/; its
    accuracy into ``metrics`` and the report section that points to it."""
    from budgetlora.inference.shift import analyse, write_shift

    cfg, runtime = session.cfg, session.runtime
    merged = inference_model(session.bare, runtime, keep=True)
    labels = tuple(cfg.data.label_names or ())
    report = analyse(
        LoadedRun(cfg, merged, session.tokenizer, labels, runtime),
        unlabelled.texts,
        source=str(cfg.data.unlabelled),
        ids=unlabelled.ids,
        batch_size=cfg.train.eval_batch_size,
    )
    if runtime.is_main_process:
        write_shift(report, folder.shift)
        print("\n".join(report.lines()), flush=True)
    shift = report.summary
    metrics["shift"] = {"source": cfg.data.unlabelled, "accuracy": shift["accuracy"]}
    return {
        "Shift of the unlabelled texts": (
            f"{expectation(shift['accuracy']).capitalize()}. The whole report: [shift/shift.md](shift/shift.md)."
        )
    }


def _find_checkpoint(
    run_dir: Path, cfg: RunConfig, runtime: Runtime
) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """(folder, run state, this process's state) of the newest checkpoint, or None."""
    found = load_newest_readable(run_dir, runtime.process_index)
    if found is None:
        if runtime.is_main_process:
            print(f"no checkpoint in {run_dir}: starting from the beginning", flush=True)
        return None
    checkpoint, state, own = found
    if state["config"] != _comparable(cfg):
        raise BudgetloraError(
            f"cannot resume {run_dir}: the config differs from the interrupted run's "
            f"(see {run_dir / 'config.yaml'}); resume without changing options, or start a new {option('output')}"
        )
    if runtime.is_main_process:
        print(f"resuming from {checkpoint}", flush=True)
    return checkpoint, state, own


def _set_up(
    cfg: RunConfig, splits: Splits, budget: Budget, runtime: Runtime, unlabelled: TextTable | None = None
) -> _Session:
    """Weights, tokens, optimizer and schedule, each placed as the runtime's plan says
    (after the masked-LM steps of ``tapt.*``, if any)."""
    settings = cfg.train
    set_seed(settings.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = _build_model(cfg, budget)
    tapt = None
    if cfg.tapt.steps:
        from budgetlora.training.tapt import pretrain

        texts = splits.train.texts + (unlabelled.texts if unlabelled is not None else [])
        tapt = pretrain(model, tokenizer, texts, cfg, runtime)
    train_enc, val_enc, test_enc = _encode_splits(cfg, splits, tokenizer, runtime)
    plan = runtime.plan
    # Placed (and DDP-wrapped) first: the optimizer is built on the placed parameters.
    prepared = runtime.accelerator.prepare(compile_for_training(model) if settings.compile else model)
    optimizer = runtime.accelerator.prepare(_make_optimizer(model, settings, plan.fused_optimizer))
    total_steps = _total_steps(settings, train_enc, runtime)
    scheduler = _make_scheduler(optimizer, settings, total_steps)
    collate = Collator(train_enc, pad_id(tokenizer), plan.pad_to_multiple_of)
    encoded = (train_enc, val_enc, test_enc, collate)
    return _Session(
        cfg, runtime, prepared, model, tokenizer, optimizer, scheduler, *encoded, total_steps, tapt
    )


def _build_model(cfg: RunConfig, budget: Budget) -> nn.Module:
    """The peft model of ``cfg``, whose trainable parameters must be those the skeleton counted."""
    labels = cfg.data.label_names
    assert labels is not None  # set by prepare_run
    model = build_model(cfg.model, labels)
    built = count_trainable(model, cfg.budget)
    if built.groups != budget.groups:  # the skeleton and the real model must agree exactly
        raise RuntimeError(f"budget mismatch: skeleton {budget.groups} != model {built.groups}")
    return model


def _encode_splits(
    cfg: RunConfig, splits: Splits, tokenizer: PreTrainedTokenizerBase, runtime: Runtime
) -> tuple[Encoded, Encoded, Encoded | None]:
    """The train, validation and (if any) test rows tokenized; the main process first (it fills the cache)."""
    with runtime.accelerator.main_process_first():
        train_enc, val_enc = (
            encode(table.texts, table.labels, tokenizer, cfg.data.max_length)
            for table in (splits.train, splits.validation)
        )
        test_enc = (
            encode(splits.test.texts, splits.test.labels, tokenizer, cfg.data.max_length)
            if splits.test
            else None
        )
    return train_enc, val_enc, test_enc


def _total_steps(settings: TrainSettings, train_enc: Encoded, runtime: Runtime) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` of this process count's batches."""
    per_epoch = len(length_grouped_batches(
        train_enc.lengths, settings.batch_size, seed=settings.seed, epoch=0,
        world_size=runtime.num_processes, group_by_length=settings.group_by_length,
    ))  # fmt: skip
    steps_per_epoch = max(1, math.ceil(per_epoch / settings.grad_accum))
    return settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))


def _restore(
    session: _Session, saved: tuple[Path, dict[str, Any], dict[str, Any]] | None, folder: RunFolder
) -> _LoopState:
    """The loop's starting point: from the checkpoint if there is one, else step 0; and the
    history file, opened. (The resolved config is written from the start, so that an
    interrupted run can be resumed; over a finished run, with --overwrite, only at the end.)"""
    main = session.runtime.is_main_process
    if saved is None:
        progress, best_state, records = _Progress(), trainable_state(session.bare), list[dict[str, Any]]()
    else:
        progress, best_state, records = _restore_checkpoint(session, saved)
    folder.path.mkdir(parents=True, exist_ok=True)
    if main and saved is None and not folder.is_finished():
        save_config(session.cfg, folder.config)
    settings = session.cfg.train
    history = _History(
        folder.history_partial if main else None,
        folder.tensorboard if settings.tensorboard and main else None,
        echo=main and not settings.progress,
        records=records,
    )
    running_loss = saved[2]["running_loss"] if saved is not None else None
    return _LoopState(progress, best_state, history, running_loss)


def _restore_checkpoint(
    session: _Session, saved: tuple[Path, dict[str, Any], dict[str, Any]]
) -> tuple[_Progress, dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Weights, optimizer, schedule and RNG as the checkpoint saved them; its progress, best
    weights and history records.

    A checkpoint saved with another number of processes resumes at the same point of the
    schedule and the same fraction of its epoch: steps and batch positions are rescaled
    by the ratio of the process counts (a step covers that many more or fewer samples).
    The rest of that epoch is dealt out anew, so a few of its samples may be seen twice
    or not at all.
    """
    runtime = session.runtime
    _, state, own = saved
    load_trainable_state(session.bare, state["trainable"])
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    load_scaler_state(runtime.accelerator, state.get("scaler"))
    progress = _Progress(**state["progress"])
    records = state["history"]
    restore_rng(own["rng"], runtime.device)
    scale = state.get("processes", 1) / runtime.num_processes
    if scale != 1:
        progress, records = _rescale(progress, records, scale)
        session.scheduler.last_epoch = progress.step - 1
        with warnings.catch_warnings():  # "scheduler stepped before the optimizer": on purpose
            warnings.simplefilter("ignore", UserWarning)
            session.scheduler.step()  # sets the learning rate of the rescaled step
        if runtime.is_main_process:
            print(
                f"the checkpoint was saved by {state.get('processes', 1)} processes, resumed by "
                f"{runtime.num_processes}: continuing at step {progress.step} of {session.total_steps}",
                flush=True,
            )
    return progress, state["best_state"], records


def _rescale(
    progress: _Progress, records: list[dict[str, Any]], scale: float
) -> tuple[_Progress, list[dict[str, Any]]]:
    """Positions counted in steps of another process count, in steps of this one."""

    def steps(n: int) -> int:
        return int(round(n * scale))

    progress = replace(
        progress,
        step=steps(progress.step),
        batch_in_epoch=steps(progress.batch_in_epoch),
        best_step=steps(progress.best_step),
    )
    return progress, [{**r, "step": steps(r["step"])} for r in records]


def fit(
    session: _Session,
    state: _LoopState,
    loss_fn: LossFn | None = None,
    on_eval: EvalCallback | None = None,
) -> None:
    """The loop, an optimizer step at a time, until ``session.total_steps`` or an early
    stop: batches, forward, loss, backward, step, schedule, periodic evaluation and
    checkpoint. ``state`` is updated as it goes; SIGINT/SIGTERM save a checkpoint and raise
    :class:`TrainingInterrupted`. ``loss_fn`` replaces the cross-entropy (distillation)."""
    settings, progress = session.cfg.train, state.progress
    loss_fn = loss_fn or cross_entropy_loss(settings.label_smoothing)
    log = _TrainLog(session, state)
    eval_every = _eval_every(session)
    agreement = StopAgreement(session.runtime.accelerator, max_interval=settings.log_every)
    world = session.runtime.num_processes
    stop = False
    session.model.train()
    with _StopSignals() as signals, log.bar:
        while progress.step < session.total_steps and not stop:
            batches = session.epoch_batches(progress.epoch)
            steps = _step_groups(session.load(batches[progress.batch_in_epoch :]), settings.grad_accum)
            tick = time.perf_counter()
            for group in steps:
                loss_sum, samples = _optimizer_step(session, group, loss_fn)
                progress.advance(len(group), samples * world, time.perf_counter() - tick)
                epoch = progress.epoch + progress.batch_in_epoch / len(batches)
                log.add(loss_sum, samples * world, epoch)
                if progress.step % eval_every == 0:
                    stop = _evaluate(session, state, on_eval, epoch)
                _checkpoint_when_due(session, state, log.running_loss, agreement.stop(signals.received))
                if progress.step >= session.total_steps or stop:
                    break
                tick = time.perf_counter()
            if progress.batch_in_epoch >= len(batches):
                stop = _end_epoch(session, state, on_eval, eval_every, stop)


def _eval_every(session: _Session) -> int:
    """Steps between evaluations: ``train.eval_every``; without it four an epoch, so that
    the learning curves have a shape."""
    settings = session.cfg.train
    steps_per_epoch = math.ceil(len(session.epoch_batches(0)) / settings.grad_accum)
    return settings.eval_every or max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))


def _end_epoch(
    session: _Session, state: _LoopState, on_eval: EvalCallback | None, eval_every: int, stop: bool
) -> bool:
    """On to the next epoch, evaluating at its end with ``train.eval_each_epoch`` (unless the
    last step did); True to stop training."""
    progress = state.progress
    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    evaluated = progress.step % eval_every == 0
    if session.cfg.train.eval_each_epoch and not stop and not evaluated:
        return _evaluate(session, state, on_eval, float(progress.epoch))
    return stop


class _TrainLog:
    """The training records of the history (mean loss, learning rate, samples/s since the
    last one), every ``train.log_every`` steps and at the last, and the progress bar."""

    def __init__(self, session: _Session, state: _LoopState) -> None:
        runtime, progress = session.runtime, state.progress
        self.session, self.progress, self.history = session, progress, state.history
        # Loss summed on the device since the last log step: no host-device sync per step.
        self.running_loss = torch.zeros((), device=runtime.device)
        if state.running_loss is not None:
            self.running_loss += state.running_loss.to(runtime.device)
        self.window_seconds, self.window_samples = progress.train_seconds, 0
        self.bar = tqdm(
            total=session.total_steps,
            initial=progress.step,
            desc="train",
            unit="step",
            disable=not (runtime.is_main_process and session.cfg.train.progress),
        )

    def add(self, loss_sum: torch.Tensor, samples: int, epoch: float) -> None:
        """One more optimizer step, of ``samples`` (all processes) and summed loss ``loss_sum``."""
        self.running_loss += loss_sum
        self.window_samples += samples
        self.bar.update(1)
        progress, session = self.progress, self.session
        if progress.step % session.cfg.train.log_every == 0 or progress.step == session.total_steps:
            self._write(epoch)

    def _write(self, epoch: float) -> None:
        progress, session = self.progress, self.session
        # Reading the loss syncs host and device: only on log steps.
        mean_loss = (
            session.runtime.accelerator.reduce(self.running_loss, "mean").item() / progress.running_count
        )
        rate = self.window_samples / max(progress.train_seconds - self.window_seconds, 1e-9)
        lr = session.scheduler.get_last_lr()[0]
        self.history.add({
            "type": "train", "step": progress.step, "epoch": round(epoch, 4),
            "loss": mean_loss, "lr": lr, "samples_per_second": rate,
        })  # fmt: skip
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
        self.running_loss.zero_()
        progress.running_count = 0
        self.window_seconds, self.window_samples = progress.train_seconds, 0


def _evaluate(session: _Session, state: _LoopState, on_eval: EvalCallback | None, epoch: float) -> bool:
    """Validation metrics into the history, the best weights kept; True to stop training."""
    settings, progress = session.cfg.train, state.progress
    assert session.val_enc.labels is not None  # validation rows are labelled
    labels = session.cfg.data.label_names or ()
    metrics = score(session.logits(session.val_enc), session.val_enc.labels, labels)
    state.history.add({
        "type": "eval", "step": progress.step, "epoch": round(epoch, 4), "split": "validation",
        "loss": metrics["loss"], "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
    })  # fmt: skip
    value = as_score(settings.best_metric, metrics[settings.best_metric])
    if value > progress.best_value:
        progress.best_value, progress.best_step, progress.stale = value, progress.step, 0
        state.best_state = trainable_state(session.bare)
    else:
        progress.stale += 1
    stop = on_eval(progress.step, metrics) if on_eval is not None else False
    patience = settings.early_stopping_patience
    return stop or (patience is not None and progress.stale >= patience)


def _checkpoint_when_due(
    session: _Session, state: _LoopState, running_loss: torch.Tensor, interrupted: str | None
) -> None:
    """A checkpoint every ``train.checkpoint_every`` steps (none at the last: the run folder
    follows), and one on SIGINT/SIGTERM (``interrupted``), which then stops the run."""
    cfg, progress = session.cfg, state.progress
    periodic = cfg.train.checkpoint_every and progress.step % cfg.train.checkpoint_every == 0
    if not interrupted and not (periodic and progress.step < session.total_steps):
        return
    saved_to = _checkpoint(session, state, running_loss)
    if interrupted:
        raise TrainingInterrupted(
            f"interrupted by {interrupted} at step {progress.step}/{session.total_steps}; "
            f"checkpoint saved to {saved_to}. Resume with: budgetlora train --resume "
            f"--output {cfg.output}"
        )


def _checkpoint(session: _Session, state: _LoopState, running_loss: torch.Tensor) -> Path:
    """Save a resumable checkpoint (every process calls this at the same step)."""
    cfg = session.cfg
    saved = {
        "config": _comparable(cfg),
        "trainable": trainable_state(session.bare),
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "scaler": scaler_state(session.runtime.accelerator),
        "progress": dataclasses.asdict(state.progress),
        "best_state": state.best_state,
        "history": state.history.records,
    }
    # The device-side loss sum as it is (float32): a resumed run logs the same bits.
    own = {"running_loss": running_loss.detach().cpu()}
    return save_checkpoint(
        session.runtime, Path(cfg.output), state.progress.step, saved, cfg.train.keep_checkpoints, own
    )


def _step_groups(
    batches: Iterator[dict[str, torch.Tensor]], grad_accum: int
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The micro-batches of each optimizer step, in order (the last step of an epoch may have fewer)."""
    while group := list(islice(batches, grad_accum)):
        yield group


def _optimizer_step(
    session: _Session, group: list[dict[str, torch.Tensor]], loss_fn: LossFn
) -> tuple[torch.Tensor, int]:
    """Forward and backward over the micro-batches of one step, then one optimizer step.

    Returns the summed loss of the micro-batches (on the device, not synced) and this
    process's sample count.
    """
    accelerator, device = session.runtime.accelerator, session.runtime.device
    model, settings = session.model, session.cfg.train
    loss_sum = torch.zeros((), device=device)
    samples = 0
    for i, cpu_batch in enumerate(group):
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        last = i == len(group) - 1
        # Gradients are all-reduced across processes only on the last micro-batch.
        with nullcontext() if last else accelerator.no_sync(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = loss_fn(logits, batch)
            accelerator.backward(loss / len(group))
        loss_sum += loss.detach()
        samples += len(batch["input_ids"])
    if settings.max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    session.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16: the scaler skips steps with inf grads
        session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    return loss_sum, samples


def _final_metrics(session: _Session, splits: Splits, budget: Budget, progress: _Progress) -> dict[str, Any]:
    """Validation (and test) metrics of the kept weights, timing, data sizes and budget.

    Scored by a merged copy, as `budgetlora evaluate` scores the saved run: the same numbers.
    """
    labels = session.cfg.data.label_names or ()
    runtime = session.runtime
    assert session.val_enc.labels is not None
    merged = inference_model(session.bare, runtime, keep=True)
    start = time.perf_counter()
    val_logits = session.logits(session.val_enc, merged)
    eval_rate = len(session.val_enc) / max(time.perf_counter() - start, 1e-9)
    metrics: dict[str, Any] = {"validation": score(val_logits, session.val_enc.labels, labels)}
    if session.test_enc is not None and session.test_enc.labels is not None:
        metrics["test"] = score(session.logits(session.test_enc, merged), session.test_enc.labels, labels)
    del merged
    if session.tapt is not None:
        metrics["tapt"] = session.tapt
    metrics["best_step"] = progress.best_step
    metrics["steps"] = progress.step
    metrics["timing"] = {
        "train_seconds": round(progress.train_seconds, 3),
        "train_samples": progress.samples,
        "train_samples_per_second": progress.samples / max(progress.train_seconds, 1e-9),
        "eval_samples_per_second": eval_rate,
        "device": str(runtime.device),
        "processes": runtime.num_processes,
        "mixed_precision": runtime.mixed_precision,
    }
    if session.cfg.train.compile:
        metrics["timing"]["compilations"] = compilations()
    metrics["budget"] = budget.to_dict()
    metrics["data"] = {
        "train": len(splits.train),
        "validation": len(splits.validation),
        "test": len(splits.test) if splits.test else 0,
        "dropped": splits.dropped,
    }
    return metrics


def _comparable(cfg: RunConfig) -> dict[str, Any]:
    """The config as resumption compares it (progress bars may differ)."""
    values = config_to_dict(cfg)
    values["train"].pop("progress")
    return values


class TrainingInterrupted(BudgetloraError):
    """SIGINT/SIGTERM: a checkpoint was saved; the message says how to resume."""

    exit_code = 130


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between optimizer steps."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _PhaseClock:
    """Seconds of each phase of a run, for metrics.json ("where the time goes")."""

    def __init__(self, elapsed: float = 0.0) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter() - elapsed  # ``elapsed``: seconds of the first phase spent already

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


@dataclass
class _RunReport:
    """What the run folder gets besides the model: budget, metrics, history and report sections."""

    budget: Budget
    metrics: dict[str, Any]
    history: _History
    clock: _PhaseClock
    notes: dict[str, str]


def _write_run(folder: RunFolder, session: _Session, run: _RunReport, overwrite: bool) -> None:
    """Write every output file; each lands by an atomic rename, metrics.json last."""
    run_dir = folder.path
    if folder.is_finished() and not overwrite:  # checked at the start too; the lock makes this the last word
        raise BudgetloraError(
            f"{run_dir} holds a finished run that appeared while this one trained: nothing of this run was "
            f"written over it; pass {option('overwrite')} to replace it"
        )

    def save_model(staging: Path) -> None:
        session.bare.save_pretrained(staging)  # type: ignore[operator]
        session.tokenizer.save_pretrained(staging)

    folder.adopt(save_model)
    save_config(session.cfg, folder.config)
    folder.write_budget(run.budget.to_dict())
    if run.history.path is not None:
        folder.keep_history()
    _write_report(folder, session, run)
    run.clock.lap("write the adapter, report and plots")
    run.metrics["timing"]["phases"] = run.clock.seconds  # report.md was written before this last phase ended
    folder.write_metrics(run.metrics)  # last: its presence marks a finished run


def _write_report(folder: RunFolder, session: _Session, run: _RunReport) -> None:
    """report.md and its plots: the test split's metrics where there is one, else validation's."""
    cfg, metrics = session.cfg, run.metrics
    split = "test" if "test" in metrics else "validation"
    labels = cfg.data.label_names or ()
    write_report(
        folder.path,
        title=f"{display_name(cfg.model.name_or_path)} + {TITLES[cfg.model.method]} on {Path(cfg.data.source).name}",
        split=split,
        metrics=metrics[split],
        label_names=labels,
        history=run.history.records,
        budget=run.budget.to_dict(),
        train_labels=session.train_enc.labels,
        token_lengths=session.train_enc.full_lengths,
        max_length=cfg.data.max_length,
        timing=metrics["timing"],
        extra=run.notes,
    )
