"""The training loop: one explicit loop on accelerate, read top to bottom.

Order of work in :func:`train`: read the data (no tokenization) → count the budget on
the weightless skeleton and refuse an over-budget config → load weights → tokenize
(cached) → loop (forward, loss, backward, step, schedule, periodic eval, keep the
best) → save the adapter, metrics and report into the run folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from budgetlora.batching import Collator, Encoded, encode, iterate, length_grouped_batches
from budgetlora.budget import Budget, check_budget, count_trainable, measure, resolve_rank
from budgetlora.config import RunConfig, TrainSettings, save_config
from budgetlora.data import Splits, load_splits
from budgetlora.errors import BudgetloraError
from budgetlora.modeling import build_model, load_tokenizer
from budgetlora.predict import predict_logits, score
from budgetlora.report import write_report
from budgetlora.rundir import write_json_atomic

__all__ = ["TrainResult", "LossFn", "EvalCallback", "train", "prepare_run", "cross_entropy_loss"]

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


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


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


def _check_output(run_dir: Path, overwrite: bool) -> None:
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

    def __init__(self, path: Path | None, tensorboard_dir: Path | None, echo: bool = False) -> None:
        self.records: list[dict[str, Any]] = []
        self.path = path
        self.echo = echo  # print each record (when there is no progress bar to show it)
        self._fh = path.open("w", encoding="utf-8") if path is not None else None
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


def train(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    loss_fn: LossFn | None = None,
    on_eval: EvalCallback | None = None,
) -> TrainResult:
    """Train ``cfg`` and write its run folder; returns the budget, metrics and history.

    ``loss_fn`` replaces the cross-entropy (distillation); ``on_eval`` sees every
    validation result and may stop the run (a sweep's pruner).
    """
    run_dir = Path(cfg.output)
    _check_output(run_dir, overwrite)
    settings = cfg.train
    accelerator = Accelerator(mixed_precision=_mixed_precision(settings.mixed_precision))
    main = accelerator.is_main_process
    on_cuda = accelerator.device.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    cfg, splits, budget = prepare_run(cfg)
    labels = cfg.data.label_names
    assert labels is not None
    if main:
        print(f"trainable parameters of {cfg.model.name_or_path}:\n{budget.table()}", flush=True)

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

    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    collate = Collator(train_enc, pad_id, 8 if on_cuda else 1)
    world, rank = accelerator.num_processes, accelerator.process_index
    batches_per_epoch = len(
        length_grouped_batches(
            train_enc.lengths, settings.batch_size, seed=0, epoch=0, world_size=world, rank=rank
        )
    )
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / settings.grad_accum))
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

    run_dir.mkdir(parents=True, exist_ok=True)
    history = _History(
        run_dir / ".history.jsonl.partial" if main else None,
        run_dir / "tensorboard" if settings.tensorboard and main else None,
        echo=main and not settings.progress,
    )
    best_value, best_step, best_state, stale = -1.0, 0, _trainable_state(model), 0

    def run_eval(step: int, epoch: float) -> bool:
        """Evaluate on validation, keep the best weights; True when early stopping says stop."""
        nonlocal best_value, best_step, best_state, stale
        logits = predict_logits(
            model, val_enc, accelerator, batch_size=settings.eval_batch_size, pad_token_id=pad_id
        )
        assert val_enc.labels is not None
        metrics = score(logits, val_enc.labels, labels)
        history.add(
            {
                "type": "eval",
                "step": step,
                "epoch": round(epoch, 4),
                "split": "validation",
                "loss": metrics["loss"],
                "accuracy": metrics["accuracy"],
                "macro_f1": metrics["macro_f1"],
            }
        )
        value = metrics[settings.best_metric]
        if value > best_value:
            best_value, best_step, best_state, stale = value, step, _trainable_state(model), 0
        else:
            stale += 1
        stop_requested = on_eval(step, metrics) if on_eval is not None else False
        patience = settings.early_stopping_patience
        return stop_requested or (patience is not None and stale >= patience)

    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not (main and settings.progress))
    step, epoch, micro, samples = 0, 0, 0, 0
    train_seconds = 0.0
    running_loss = torch.zeros((), device=accelerator.device)
    running_count = 0
    window_start, window_samples = time.perf_counter(), 0
    stop = False
    model.train()
    while step < total_steps and not stop:
        batches = length_grouped_batches(
            train_enc.lengths,
            settings.batch_size,
            seed=settings.seed,
            epoch=epoch,
            world_size=world,
            rank=rank,
            group_by_length=settings.group_by_length,
        )
        tick = time.perf_counter()
        for i, batch in enumerate(
            iterate(batches, collate, num_workers=settings.num_workers, pin_memory=on_cuda)
        ):
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            micro += 1
            sync = micro % settings.grad_accum == 0 or i == len(batches) - 1
            with accelerator.no_sync(model) if not sync else nullcontext():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = loss_fn(logits, batch)
                accelerator.backward(loss / settings.grad_accum)
            running_loss += loss.detach()
            running_count += 1
            n = len(batch["input_ids"]) * world
            samples += n
            window_samples += n
            if not sync:
                continue
            micro = 0
            if settings.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            epoch_progress = epoch + (i + 1) / len(batches)
            if step % settings.log_every == 0 or step == total_steps:
                # Reading the loss syncs host and device: only on log steps.
                mean_loss = accelerator.reduce(running_loss, "mean").item() / running_count
                now = time.perf_counter()
                rate = window_samples / max(now - window_start, 1e-9)
                record = {
                    "type": "train",
                    "step": step,
                    "epoch": round(epoch_progress, 4),
                    "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_second": rate,
                }
                history.add(record)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}", sps=f"{rate:.0f}")
                running_loss.zero_()
                running_count, window_start, window_samples = 0, now, 0
            if settings.eval_every and step % settings.eval_every == 0:
                train_seconds += time.perf_counter() - tick
                stop = run_eval(step, epoch_progress)
                tick = time.perf_counter()
                window_start, window_samples = tick, 0
            if step >= total_steps or stop:
                break
        train_seconds += time.perf_counter() - tick
        epoch += 1
        if (
            settings.eval_each_epoch
            and not stop
            and not (settings.eval_every and step % settings.eval_every == 0)
        ):
            stop = run_eval(step, float(epoch))
    bar.close()

    if best_step > 0:
        _load_trainable_state(model, best_state)
    unwrapped = accelerator.unwrap_model(model)
    if hasattr(unwrapped, "_orig_mod"):
        unwrapped = unwrapped._orig_mod
    assert val_enc.labels is not None
    eval_start = time.perf_counter()
    val_logits = predict_logits(
        model, val_enc, accelerator, batch_size=settings.eval_batch_size, pad_token_id=pad_id
    )
    eval_rate = len(val_enc) / max(time.perf_counter() - eval_start, 1e-9)
    metrics: dict[str, Any] = {"validation": score(val_logits, val_enc.labels, labels)}
    test_logits = None
    if test_enc is not None and test_enc.labels is not None:
        test_logits = predict_logits(
            model, test_enc, accelerator, batch_size=settings.eval_batch_size, pad_token_id=pad_id
        )
        metrics["test"] = score(test_logits, test_enc.labels, labels)
    metrics["best_step"] = best_step
    metrics["steps"] = step
    metrics["timing"] = {
        "train_seconds": round(train_seconds, 3),
        "train_samples": samples,
        "train_samples_per_second": samples / max(train_seconds, 1e-9),
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
        _write_run(
            run_dir, cfg, budget, unwrapped, tokenizer, metrics, history, train_enc, test_logits is not None
        )
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, cfg, budget, metrics, history.records, unwrapped)


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
