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
import os
import shutil
import signal
import tempfile
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
from budgetlora.rundir import (
    BUDGET,
    CONFIG,
    METRICS,
    check_output,
    is_finished,
    output_lock,
    write_json_atomic,
)
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


def prepare_run(cfg: RunConfig) -> tuple[RunConfig, Splits, Budget]:
    """Read the data, resolve label names and an ``auto`` size (``lora.r``, ``vera.r``, ...), and check the budget.

    Nothing is tokenized and no weights are read: an over-budget config, or a max length
    beyond the model's position embeddings, fails in seconds.
    """
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
    return cfg, splits, budget


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
        self.running_loss: torch.Tensor | None = None  # the loss sum at the checkpoint, when resuming
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


@dataclass
class _Best:
    """The trainable weights of the best validation score so far (its value and step are in _Progress)."""

    state: dict[str, torch.Tensor]


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

    def logits(self, encoded: Encoded, model: nn.Module | None = None) -> np.ndarray:
        """Logits of ``encoded`` by the training model (or ``model``), in row order."""
        return predict_logits(
            model if model is not None else self.bare,
            encoded,
            self.runtime,
            batch_size=self.cfg.train.eval_batch_size,
            pad_token_id=pad_id(self.tokenizer),
        )


def train(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    loss_fn: LossFn | None = None,
    on_eval: EvalCallback | None = None,
    extra_rows: TextTable | None = None,
    notes: dict[str, str] | None = None,
) -> TrainResult:
    """Train ``cfg`` and write its run folder; returns the budget, metrics and history.

    ``resume`` continues from the newest checkpoint in the run folder (model, optimizer,
    scheduler, RNG states, data position, history). ``loss_fn`` replaces the
    cross-entropy (distillation); ``on_eval`` sees every validation result and may stop
    the run (a sweep's pruner). A config with self-training rounds runs them all
    (:mod:`budgetlora.training.selftrain`); ``extra_rows`` (labelled, e.g. pseudo-labelled) join the
    training rows, and ``notes`` (title -> Markdown) are added to the report.
    """
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
    with ExitStack() as held:
        on_main_process(
            runtime.accelerator, lambda: held.enter_context(output_lock(run_dir)), f"locking {run_dir}"
        )
        return _train(cfg, runtime, overwrite, resume, loss_fn, on_eval, extra_rows, notes or {})


def _train(
    cfg: RunConfig,
    runtime: Runtime,
    overwrite: bool,
    resume: bool,
    loss_fn: LossFn | None,
    on_eval: EvalCallback | None,
    extra_rows: TextTable | None,
    notes: dict[str, str],
) -> TrainResult:
    """:func:`train`, once its run folder is checked and locked."""
    run_dir = Path(cfg.output)
    clock = _PhaseClock()
    cfg, splits, budget = prepare_run(cfg)
    unlabelled = read_unlabelled(cfg.data) if cfg.data.unlabelled is not None else None
    splits, data_notes = _training_rows(cfg, splits, extra_rows)
    saved = _find_checkpoint(run_dir, cfg, runtime) if resume else None
    check_shared_folder(runtime.accelerator, run_dir)
    if runtime.is_main_process:
        print(f"trainable parameters of {cfg.model.name_or_path}:\n{budget.table()}", flush=True)
    clock.lap("read data and check the budget")
    session = _set_up(cfg, splits, budget, runtime, unlabelled)
    progress, best, history = _restore(session, saved, run_dir)
    clock.lap("load weights, tokenize, set up")
    try:
        fit(session, progress, best, history, loss_fn, on_eval)
    finally:
        history.close()
    clock.lap("train (with evaluations)")
    if progress.best_step > 0:
        load_trainable_state(session.bare, best.state)
    metrics = _final_metrics(session, splits, budget, progress)
    metrics["data"].update(data_notes)
    clock.lap("final evaluation")
    report_notes = {**notes, **_adaptation_notes(metrics)}
    if unlabelled is not None:
        shift = _shift_report(session, unlabelled, run_dir)
        metrics["shift"] = {"source": cfg.data.unlabelled, "accuracy": shift["accuracy"]}
        report_notes["Shift of the unlabelled texts"] = (
            f"{expectation(shift['accuracy']).capitalize()}. The whole report: [shift/shift.md](shift/shift.md)."
        )
        clock.lap("shift report of the unlabelled texts")
    metrics["timing"]["phases"] = clock.seconds
    on_main_process(
        runtime.accelerator,
        lambda: _write_run(run_dir, session, budget, metrics, history, clock, report_notes, overwrite),
        f"writing the run folder {run_dir}",
    )
    runtime.accelerator.wait_for_everyone()
    return TrainResult(run_dir, cfg, budget, metrics, history.records, session.bare)


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


def _shift_report(session: _Session, unlabelled: TextTable, run_dir: Path) -> dict[str, Any]:
    """The shift report of the unlabelled texts by the trained model, into RUN/shift/."""
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
        write_shift(report, run_dir / "shift")
        print("\n".join(report.lines()), flush=True)
    return report.summary


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
    labels = cfg.data.label_names
    assert labels is not None  # set by prepare_run
    set_seed(settings.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = build_model(cfg.model, labels)
    built = count_trainable(model, cfg.budget)
    if built.groups != budget.groups:  # the skeleton and the real model must agree exactly
        raise RuntimeError(f"budget mismatch: skeleton {budget.groups} != model {built.groups}")
    tapt = None
    if cfg.tapt.steps:
        from budgetlora.training.tapt import pretrain

        texts = splits.train.texts + (unlabelled.texts if unlabelled is not None else [])
        tapt = pretrain(model, tokenizer, texts, cfg, runtime)

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

    plan = runtime.plan
    bare = model
    # Placed (and DDP-wrapped) first: the optimizer is built on the placed parameters.
    prepared = runtime.accelerator.prepare(compile_for_training(model) if settings.compile else model)
    optimizer = runtime.accelerator.prepare(_make_optimizer(bare, settings, plan.fused_optimizer))
    per_epoch = len(length_grouped_batches(
        train_enc.lengths, settings.batch_size, seed=settings.seed, epoch=0,
        world_size=runtime.num_processes, group_by_length=settings.group_by_length,
    ))  # fmt: skip
    steps_per_epoch = max(1, math.ceil(per_epoch / settings.grad_accum))
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    warmup = (
        settings.warmup_steps
        if settings.warmup_steps is not None
        else int(settings.warmup_ratio * total_steps)
    )
    scheduler_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    scheduler = get_scheduler(
        scheduler_name[settings.scheduler],
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
    )
    return _Session(
        cfg=cfg,
        runtime=runtime,
        model=prepared,
        bare=bare,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        train_enc=train_enc,
        val_enc=val_enc,
        test_enc=test_enc,
        collate=Collator(train_enc, pad_id(tokenizer), plan.pad_to_multiple_of),
        total_steps=total_steps,
        tapt=tapt,
    )


def _restore(
    session: _Session, saved: tuple[Path, dict[str, Any], dict[str, Any]] | None, run_dir: Path
) -> tuple[_Progress, _Best, _History]:
    """The loop's starting point: from the checkpoint if there is one, else step 0.

    A checkpoint saved with another number of processes resumes at the same point of the
    schedule and the same fraction of its epoch: steps and batch positions are rescaled
    by the ratio of the process counts (a step covers that many more or fewer samples).
    The rest of that epoch is dealt out anew, so a few of its samples may be seen twice
    or not at all.
    """
    runtime = session.runtime
    main = runtime.is_main_process
    progress = _Progress()
    best = _Best(trainable_state(session.bare))
    records: list[dict[str, Any]] = []
    if saved is not None:
        _, state, own = saved
        load_trainable_state(session.bare, state["trainable"])
        session.optimizer.load_state_dict(state["optimizer"])
        session.scheduler.load_state_dict(state["scheduler"])
        load_scaler_state(runtime.accelerator, state.get("scaler"))
        progress = _Progress(**state["progress"])
        best = _Best(state["best_state"])
        records = state["history"]
        restore_rng(own["rng"], runtime.device)
        scale = state.get("processes", 1) / runtime.num_processes
        if scale != 1:
            progress, records = _rescale(progress, records, scale)
            session.scheduler.last_epoch = progress.step - 1
            with warnings.catch_warnings():  # "scheduler stepped before the optimizer": on purpose
                warnings.simplefilter("ignore", UserWarning)
                session.scheduler.step()  # sets the learning rate of the rescaled step
            if main:
                print(
                    f"the checkpoint was saved by {state.get('processes', 1)} processes, resumed by "
                    f"{runtime.num_processes}: continuing at step {progress.step} of {session.total_steps}",
                    flush=True,
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    if main and saved is None and not is_finished(run_dir):
        # The resolved config, from the start, so that an interrupted run can be resumed.
        # (Over a finished run, with --overwrite, it is replaced only at the end.)
        save_config(session.cfg, run_dir / CONFIG)
    settings = session.cfg.train
    history = _History(
        run_dir / ".history.jsonl.partial" if main else None,
        run_dir / "tensorboard" if settings.tensorboard and main else None,
        echo=main and not settings.progress,
        records=records,
    )
    history.running_loss = own["running_loss"] if saved is not None else None
    return progress, best, history


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
    progress: _Progress,
    best: _Best,
    history: _History,
    loss_fn: LossFn | None = None,
    on_eval: EvalCallback | None = None,
) -> None:
    """The loop, an optimizer step at a time, until ``session.total_steps`` or an early
    stop. ``progress``, ``best`` and ``history`` are updated as it goes; SIGINT/SIGTERM
    save a checkpoint and raise :class:`TrainingInterrupted`."""
    cfg, runtime = session.cfg, session.runtime
    settings = cfg.train
    accelerator, device, world = runtime.accelerator, runtime.device, runtime.num_processes
    loss_fn = loss_fn or cross_entropy_loss(settings.label_smoothing)
    agreement = StopAgreement(accelerator, max_interval=settings.log_every)
    # Loss summed on the device since the last log step: no host-device sync per step.
    running_loss = torch.zeros((), device=device)
    if history.running_loss is not None:
        running_loss += history.running_loss.to(device)
    window_seconds, window_samples = progress.train_seconds, 0
    bar = tqdm(
        total=session.total_steps,
        initial=progress.step,
        desc="train",
        unit="step",
        disable=not (runtime.is_main_process and settings.progress),
    )

    # Without train.eval_every: four evaluations an epoch, so that the learning curves have a shape.
    steps_per_epoch = math.ceil(len(session.epoch_batches(0)) / settings.grad_accum)
    eval_every = settings.eval_every or max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))
    stop = False
    session.model.train()
    with _StopSignals() as signals, bar:
        while progress.step < session.total_steps and not stop:
            batches = session.epoch_batches(progress.epoch)
            steps = _step_groups(
                iterate(
                    batches[progress.batch_in_epoch :],
                    session.collate,
                    num_workers=settings.num_workers,
                    pin_memory=runtime.plan.pin_memory,
                ),
                settings.grad_accum,
            )
            tick = time.perf_counter()
            for group in steps:
                loss_sum, samples = _optimizer_step(session, group, loss_fn)
                running_loss += loss_sum
                progress.running_count += len(group)
                progress.samples += samples * world
                window_samples += samples * world
                progress.step += 1
                progress.batch_in_epoch += len(group)
                progress.train_seconds += time.perf_counter() - tick
                bar.update(1)
                epoch_progress = progress.epoch + progress.batch_in_epoch / len(batches)

                if progress.step % settings.log_every == 0 or progress.step == session.total_steps:
                    # Reading the loss syncs host and device: only on log steps.
                    mean_loss = accelerator.reduce(running_loss, "mean").item() / progress.running_count
                    rate = window_samples / max(progress.train_seconds - window_seconds, 1e-9)
                    lr = session.scheduler.get_last_lr()[0]
                    history.add({
                        "type": "train", "step": progress.step, "epoch": round(epoch_progress, 4),
                        "loss": mean_loss, "lr": lr, "samples_per_second": rate,
                    })  # fmt: skip
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
                    running_loss.zero_()
                    progress.running_count = 0
                    window_seconds, window_samples = progress.train_seconds, 0
                if progress.step % eval_every == 0:
                    stop = _evaluate(session, progress, best, history, on_eval, epoch_progress)
                interrupted = agreement.stop(signals.received)
                periodic = settings.checkpoint_every and progress.step % settings.checkpoint_every == 0
                if interrupted or (periodic and progress.step < session.total_steps):
                    saved_to = _checkpoint(session, progress, best, history, running_loss)
                    if interrupted:
                        raise TrainingInterrupted(
                            f"interrupted by {interrupted} at step {progress.step}/{session.total_steps}; "
                            f"checkpoint saved to {saved_to}. Resume with: budgetlora train --resume "
                            f"--output {cfg.output}"
                        )
                if progress.step >= session.total_steps or stop:
                    break
                tick = time.perf_counter()
            if progress.batch_in_epoch >= len(batches):
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                evaluated = progress.step % eval_every == 0
                if settings.eval_each_epoch and not stop and not evaluated:
                    stop = _evaluate(session, progress, best, history, on_eval, float(progress.epoch))


def _evaluate(
    session: _Session,
    progress: _Progress,
    best: _Best,
    history: _History,
    on_eval: EvalCallback | None,
    epoch: float,
) -> bool:
    """Validation metrics into the history, the best weights kept; True to stop training."""
    settings = session.cfg.train
    assert session.val_enc.labels is not None  # validation rows are labelled
    labels = session.cfg.data.label_names or ()
    metrics = score(session.logits(session.val_enc), session.val_enc.labels, labels)
    history.add({
        "type": "eval", "step": progress.step, "epoch": round(epoch, 4), "split": "validation",
        "loss": metrics["loss"], "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
    })  # fmt: skip
    value = as_score(settings.best_metric, metrics[settings.best_metric])
    if value > progress.best_value:
        progress.best_value, progress.best_step, progress.stale = value, progress.step, 0
        best.state = trainable_state(session.bare)
    else:
        progress.stale += 1
    stop = on_eval(progress.step, metrics) if on_eval is not None else False
    patience = settings.early_stopping_patience
    return stop or (patience is not None and progress.stale >= patience)


def _checkpoint(
    session: _Session, progress: _Progress, best: _Best, history: _History, running_loss: torch.Tensor
) -> Path:
    """Save a resumable checkpoint (every process calls this at the same step)."""
    cfg = session.cfg
    state = {
        "config": _comparable(cfg),
        "trainable": trainable_state(session.bare),
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "scaler": scaler_state(session.runtime.accelerator),
        "progress": dataclasses.asdict(progress),
        "best_state": best.state,
        "history": history.records,
    }
    # The device-side loss sum as it is (float32): a resumed run logs the same bits.
    own = {"running_loss": running_loss.detach().cpu()}
    return save_checkpoint(
        session.runtime, Path(cfg.output), progress.step, state, cfg.train.keep_checkpoints, own
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

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


def _write_run(
    run_dir: Path,
    session: _Session,
    budget: Budget,
    metrics: dict[str, Any],
    history: _History,
    clock: _PhaseClock,
    notes: dict[str, str],
    overwrite: bool,
) -> None:
    """Write every output file; each lands by an atomic rename, metrics.json last."""
    if is_finished(run_dir) and not overwrite:  # checked at the start too; the lock makes this the last word
        raise BudgetloraError(
            f"{run_dir} holds a finished run that appeared while this one trained: nothing of this run was "
            f"written over it; pass {option('overwrite')} to replace it"
        )
    cfg, model, tokenizer, train_enc = session.cfg, session.bare, session.tokenizer, session.train_enc
    staging = Path(tempfile.mkdtemp(prefix=".save.", dir=run_dir))
    try:
        model.save_pretrained(staging)  # type: ignore[operator]
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            if item.is_file():
                os.replace(item, run_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    save_config(cfg, run_dir / CONFIG)
    write_json_atomic(run_dir / BUDGET, budget.to_dict())
    if history.path is not None:
        os.replace(history.path, run_dir / "history.jsonl")
    split = "test" if "test" in metrics else "validation"
    labels = cfg.data.label_names or ()
    write_report(
        run_dir,
        title=f"{display_name(cfg.model.name_or_path)} + {TITLES[cfg.model.method]} on {Path(cfg.data.source).name}",
        split=split,
        metrics=metrics[split],
        label_names=labels,
        history=history.records,
        budget=budget.to_dict(),
        train_labels=train_enc.labels,
        token_lengths=train_enc.full_lengths,
        max_length=cfg.data.max_length,
        timing=metrics["timing"],
        extra=notes,
    )
    clock.lap("write the adapter, report and plots")
    metrics["timing"]["phases"] = clock.seconds  # report.md was written before this last phase ended
    write_json_atomic(run_dir / METRICS, metrics)  # last: its presence marks a finished run
