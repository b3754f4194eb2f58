"""The training loop: one explicit loop on accelerate, read top to bottom.

Order of work in :func:`train`: read the data (no tokenization) → count the budget on
the weightless skeleton and refuse an over-budget config → load weights → tokenize
(cached) → loop (forward, loss, backward, step, schedule, periodic eval, keep the
best) → save the adapter, metrics and report into the run folder.
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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from budgetlora.batching import Collator, Encoded, encode, iterate, length_grouped_batches, pad_id
from budgetlora.budget import Budget, check_budget, count_trainable, measure, resolve_rank
from budgetlora.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from budgetlora.config import RunConfig, TrainSettings, config_to_dict, save_config
from budgetlora.data import Splits, load_splits
from budgetlora.errors import BudgetloraError
from budgetlora.modeling import build_model, load_tokenizer
from budgetlora.predict import make_accelerator, predict_logits, score
from budgetlora.report import write_report
from budgetlora.rundir import write_json_atomic

__all__ = [
    "TrainResult",
    "TrainingInterrupted",
    "LossFn",
    "EvalCallback",
    "train",
    "prepare_run",
    "cross_entropy_loss",
    "check_output",
]

# (logits (batch, labels), batch dict with "labels" and "index") -> scalar loss.
# "index" holds each sample's row in Splits.train, e.g. to look up cached teacher logits.
LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
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


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=label_smoothing)

    return loss


def prepare_run(cfg: RunConfig) -> tuple[RunConfig, Splits, Budget]:
    """Read the data, resolve label names and ``lora.r: auto``, and check the budget.

    Nothing is tokenized and no weights are read: an over-budget config fails in seconds.
    """
    splits = load_splits(cfg.data)
    labels = tuple(splits.label_names)
    cfg = replace(cfg, data=replace(cfg.data, label_names=labels))
    if cfg.model.lora.r == "auto":
        rank = resolve_rank(cfg.model, labels, cfg.budget)
        cfg = replace(cfg, model=replace(cfg.model, lora=replace(cfg.model.lora, r=rank)))
    budget = measure(cfg.model, labels, cfg.budget)
    check_budget(budget, cfg.model, labels)
    return cfg, splits, budget


def check_output(run_dir: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to write over a finished run (unless ``overwrite``), or to resume what is not there."""
    if resume and not run_dir.is_dir():
        raise BudgetloraError(f"--resume: run folder {run_dir} does not exist")
    if resume and (run_dir / "metrics.json").exists():
        raise BudgetloraError(
            f"--resume: {run_dir} already finished (metrics.json exists); nothing to resume"
        )
    if (run_dir / "metrics.json").exists() and not overwrite:
        raise BudgetloraError(
            f"{run_dir} already holds a finished run; choose another --output, or pass --overwrite "
            "(its files are replaced only when the new run finishes)"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise BudgetloraError(f"--output {run_dir} exists and is not a folder")


def _make_optimizer(model: nn.Module, settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=settings.lr, fused=device.type == "cuda")


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


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
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
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
    batch_in_epoch: int = 0  # batches of `epoch` already trained on
    samples: int = 0
    train_seconds: float = 0.0
    running_count: int = 0  # micro-batches since the last log step
    best_value: float = -1.0
    best_step: int = 0
    stale: int = 0  # evaluations since the best one


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


def train(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    loss_fn: LossFn | None = None,
    on_eval: EvalCallback | None = None,
) -> TrainResult:
    """Train ``cfg`` and write its run folder; returns the budget, metrics and history.

    ``resume`` continues from the newest checkpoint in the run folder (model, optimizer,
    scheduler, RNG states, data position, history). ``loss_fn`` replaces the
    cross-entropy (distillation); ``on_eval`` sees every validation result and may stop
    the run (a sweep's pruner).
    """
    run_dir = Path(cfg.output)
    check_output(run_dir, overwrite, resume)
    settings = cfg.train
    accelerator = make_accelerator(settings.mixed_precision)
    main = accelerator.is_main_process
    on_cuda = accelerator.device.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    cfg, splits, budget = prepare_run(cfg)
    labels = cfg.data.label_names
    assert labels is not None
    checkpoint = latest_checkpoint(run_dir) if resume else None
    saved, saved_own = load_checkpoint(checkpoint, accelerator.process_index) if checkpoint else ({}, {})
    if saved and saved["config"] != _comparable(cfg):
        raise BudgetloraError(
            f"cannot resume {run_dir}: the config differs from the interrupted run's "
            f"(see {run_dir / 'config.yaml'}); resume without changing options, or start a new --output"
        )
    if main:
        print(f"trainable parameters of {cfg.model.name_or_path}:\n{budget.table()}", flush=True)
        if checkpoint:
            print(f"resuming from {checkpoint}", flush=True)
        elif resume:
            print(f"no checkpoint in {run_dir}: starting from the beginning", flush=True)

    set_seed(settings.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = build_model(cfg.model, labels)
    built = count_trainable(model, cfg.budget)
    if built.groups != budget.groups:  # the skeleton and the real model must agree exactly
        raise RuntimeError(f"budget mismatch: skeleton {budget.groups} != model {built.groups}")

    with accelerator.main_process_first():
        train_enc = encode(splits.train.texts, splits.train.labels, tokenizer, cfg.data.max_length)
        val_enc = encode(splits.validation.texts, splits.validation.labels, tokenizer, cfg.data.max_length)
        test_enc = (
            encode(splits.test.texts, splits.test.labels, tokenizer, cfg.data.max_length)
            if splits.test
            else None
        )
    val_labels = val_enc.labels
    assert val_labels is not None

    pad_token_id = pad_id(tokenizer)
    collate = Collator(train_enc, pad_token_id, 8 if on_cuda else 1)
    world, rank = accelerator.num_processes, accelerator.process_index

    def epoch_batches(epoch: int) -> list[np.ndarray]:
        return length_grouped_batches(
            train_enc.lengths,
            settings.batch_size,
            seed=settings.seed,
            epoch=epoch,
            world_size=world,
            rank=rank,
            group_by_length=settings.group_by_length,
        )

    steps_per_epoch = max(1, math.ceil(len(epoch_batches(0)) / settings.grad_accum))
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    warmup = (
        settings.warmup_steps
        if settings.warmup_steps is not None
        else int(settings.warmup_ratio * total_steps)
    )

    optimizer = _make_optimizer(model, settings, accelerator.device)
    scheduler_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[
        settings.scheduler
    ]
    scheduler = get_scheduler(
        scheduler_name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    if settings.compile and on_cuda:
        model = torch.compile(model)  # type: ignore[assignment]
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = loss_fn or cross_entropy_loss(settings.label_smoothing)

    progress = _Progress()
    best_state = _trainable_state(model)
    history_records: list[dict[str, Any]] = []
    if saved:
        _load_trainable_state(model, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        progress = _Progress(**saved["progress"])
        best_state = saved["best_state"]
        history_records = saved["history"]
        restore_rng(saved_own["rng"])

    run_dir.mkdir(parents=True, exist_ok=True)
    if main and not saved and not (run_dir / "metrics.json").exists():
        # The resolved config, from the start, so that an interrupted run can be resumed.
        # (Over a finished run, with --overwrite, it is replaced only at the end.)
        save_config(cfg, run_dir / "config.yaml")
    history = _History(
        run_dir / ".history.jsonl.partial" if main else None,
        run_dir / "tensorboard" if settings.tensorboard and main else None,
        echo=main and not settings.progress,
        records=history_records,
    )

    def run_eval(epoch: float) -> bool:
        """Evaluate on validation, keep the best weights; True when training should stop."""
        nonlocal best_state
        logits = predict_logits(
            model, val_enc, accelerator, batch_size=settings.eval_batch_size, pad_token_id=pad_token_id
        )
        metrics = score(logits, val_labels, labels)
        history.add(
            {
                "type": "eval",
                "step": progress.step,
                "epoch": round(epoch, 4),
                "split": "validation",
                "loss": metrics["loss"],
                "accuracy": metrics["accuracy"],
                "macro_f1": metrics["macro_f1"],
            }
        )
        value = metrics[settings.best_metric]
        if value > progress.best_value:
            progress.best_value, progress.best_step, progress.stale = value, progress.step, 0
            best_state = _trainable_state(model)
        else:
            progress.stale += 1
        stop_requested = on_eval(progress.step, metrics) if on_eval is not None else False
        patience = settings.early_stopping_patience
        return stop_requested or (patience is not None and progress.stale >= patience)

    def checkpoint_now() -> Path:
        state = {
            "config": _comparable(cfg),
            "trainable": _trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": dataclasses.asdict(progress),
            "best_state": best_state,
            "history": history.records,
        }
        # The device-side loss sum as it is (float32): a resumed run logs the same bits.
        own = {"running_loss": running_loss.detach().cpu()}
        return save_checkpoint(accelerator, run_dir, progress.step, state, settings.keep_checkpoints, own)

    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        desc="train",
        unit="step",
        disable=not (main and settings.progress),
    )
    # Loss summed on the device since the last log step: no host-device sync per step.
    running_loss = torch.zeros((), device=accelerator.device)
    if saved:
        running_loss += saved_own["running_loss"].to(accelerator.device)
    window_start, window_samples = time.perf_counter(), 0
    stop = False
    model.train()
    try:
        with _StopSignals() as signals:
            while progress.step < total_steps and not stop:
                batches = epoch_batches(progress.epoch)
                tick = time.perf_counter()
                micro = 0
                loader = iterate(
                    batches[progress.batch_in_epoch :],
                    collate,
                    num_workers=settings.num_workers,
                    pin_memory=on_cuda,
                )
                for i, cpu_batch in enumerate(loader, start=progress.batch_in_epoch):
                    batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in cpu_batch.items()}
                    micro += 1
                    sync = micro % settings.grad_accum == 0 or i == len(batches) - 1
                    with accelerator.no_sync(model) if not sync else nullcontext():
                        logits = model(
                            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                        ).logits
                        loss = loss_fn(logits, batch)
                        accelerator.backward(loss / settings.grad_accum)
                    running_loss += loss.detach()
                    progress.running_count += 1
                    n = len(batch["input_ids"]) * world
                    progress.samples += n
                    window_samples += n
                    if not sync:
                        continue
                    micro = 0
                    if settings.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    progress.step += 1
                    progress.batch_in_epoch = i + 1
                    bar.update(1)
                    epoch_progress = progress.epoch + (i + 1) / len(batches)
                    log_step = progress.step % settings.log_every == 0 or progress.step == total_steps
                    if log_step:
                        # Reading the loss syncs host and device: only on log steps.
                        mean_loss = accelerator.reduce(running_loss, "mean").item() / progress.running_count
                        now = time.perf_counter()
                        rate = window_samples / max(now - window_start, 1e-9)
                        record = {
                            "type": "train",
                            "step": progress.step,
                            "epoch": round(epoch_progress, 4),
                            "loss": mean_loss,
                            "lr": scheduler.get_last_lr()[0],
                            "samples_per_second": rate,
                        }
                        history.add(record)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}", sps=f"{rate:.0f}")
                        running_loss.zero_()
                        progress.running_count = 0
                        window_start, window_samples = now, 0
                    if settings.eval_every and progress.step % settings.eval_every == 0:
                        progress.train_seconds += time.perf_counter() - tick
                        stop = run_eval(epoch_progress)
                        tick = window_start = time.perf_counter()
                        window_samples = 0
                    interrupted = _signal_received(signals, accelerator, check_all=log_step)
                    periodic = settings.checkpoint_every and progress.step % settings.checkpoint_every == 0
                    if interrupted or (periodic and progress.step < total_steps):
                        progress.train_seconds += time.perf_counter() - tick
                        tick = time.perf_counter()
                        saved_to = checkpoint_now()
                        if interrupted:
                            raise TrainingInterrupted(
                                f"interrupted by {interrupted} at step {progress.step}/{total_steps}; "
                                f"checkpoint saved to {saved_to}. Resume with: budgetlora train --resume --output {run_dir}"
                            )
                    if progress.step >= total_steps or stop:
                        break
                progress.train_seconds += time.perf_counter() - tick
                if progress.batch_in_epoch >= len(batches):
                    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                    evaluated = settings.eval_every and progress.step % settings.eval_every == 0
                    if settings.eval_each_epoch and not stop and not evaluated:
                        stop = run_eval(float(progress.epoch))
    except BaseException:
        # An exception out of the loop (a pruned sweep trial, an error): close the files.
        history.close()
        bar.close()
        raise
    bar.close()

    if progress.best_step > 0:
        _load_trainable_state(model, best_state)
    unwrapped = accelerator.unwrap_model(model)
    if hasattr(unwrapped, "_orig_mod"):
        unwrapped = unwrapped._orig_mod
    eval_start = time.perf_counter()
    val_logits = predict_logits(
        model, val_enc, accelerator, batch_size=settings.eval_batch_size, pad_token_id=pad_token_id
    )
    eval_rate = len(val_enc) / max(time.perf_counter() - eval_start, 1e-9)
    metrics: dict[str, Any] = {"validation": score(val_logits, val_labels, labels)}
    if test_enc is not None and test_enc.labels is not None:
        test_logits = predict_logits(
            model, test_enc, accelerator, batch_size=settings.eval_batch_size, pad_token_id=pad_token_id
        )
        metrics["test"] = score(test_logits, test_enc.labels, labels)
    metrics["best_step"] = progress.best_step
    metrics["steps"] = progress.step
    metrics["timing"] = {
        "train_seconds": round(progress.train_seconds, 3),
        "train_samples": progress.samples,
        "train_samples_per_second": progress.samples / max(progress.train_seconds, 1e-9),
        "eval_samples_per_second": eval_rate,
        "device": str(accelerator.device),
        "processes": world,
        "mixed_precision": accelerator.mixed_precision,
    }
    metrics["budget"] = budget.to_dict()
    metrics["data"] = {
        "train": len(splits.train),
        "validation": len(splits.validation),
        "test": len(splits.test) if splits.test else 0,
        "dropped": splits.dropped,
    }
    history.close()
    if main:
        _write_run(run_dir, cfg, budget, unwrapped, tokenizer, metrics, history, train_enc, "test" in metrics)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, cfg, budget, metrics, history.records, unwrapped)


def _comparable(cfg: RunConfig) -> dict[str, Any]:
    """The config as resumption compares it (progress bars may differ)."""
    values = config_to_dict(cfg)
    values["train"].pop("progress")
    return values


def _signal_received(signals: _StopSignals, accelerator: Any, *, check_all: bool) -> str | None:
    """The signal that asks to stop, agreed by all processes.

    One process alone decides at every step; several agree only on log steps (a
    collective per step would cost a host-device sync each time).
    """
    if accelerator.num_processes == 1:
        return signals.received
    if not check_all:
        return None
    flag = torch.tensor([1.0 if signals.received else 0.0], device=accelerator.device)
    return "a signal" if accelerator.reduce(flag, "sum").item() > 0 else None


def _load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


def _write_run(
    run_dir: Path,
    cfg: RunConfig,
    budget: Budget,
    model: nn.Module,
    tokenizer: Any,
    metrics: dict[str, Any],
    history: _History,
    train_enc: Encoded,
    has_test: bool,
) -> None:
    """Write every output file; each lands by an atomic rename."""
    staging = Path(tempfile.mkdtemp(prefix=".save.", dir=run_dir))
    try:
        model.save_pretrained(staging)  # type: ignore[operator]
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            if item.is_file():
                os.replace(item, run_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    save_config(cfg, run_dir / "config.yaml")
    write_json_atomic(run_dir / "budget.json", budget.to_dict())
    if history.path is not None:
        os.replace(history.path, run_dir / "history.jsonl")
    split = "test" if has_test else "validation"
    labels = cfg.data.label_names or ()
    write_report(
        run_dir,
        title=f"{Path(cfg.model.name_or_path).name} + LoRA on {Path(cfg.data.source).name}",
        split=split,
        metrics=metrics[split],
        label_names=labels,
        history=history.records,
        budget=budget.to_dict(),
        train_labels=train_enc.labels,
        token_lengths=train_enc.full_lengths,
        max_length=cfg.data.max_length,
        timing=metrics["timing"],
    )
    write_json_atomic(run_dir / "metrics.json", metrics)  # last: its presence marks a finished run
