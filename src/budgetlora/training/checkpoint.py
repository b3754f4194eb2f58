"""Resumable checkpoints of a training run: ``RUN/checkpoints/step-N/``.

Not ``accelerator.save_state``: that writes every prepared model's full state dict, i.e.
the frozen encoder too (about 500 MB for roberta-base per checkpoint). A LoRA run only
needs its trainable parameters (a few MB), the optimizer and scheduler, each process's
RNG states and the loop's position; the frozen weights come from the base model again.

Parameters are saved under the bare model's names (no ``module.`` from DDP, no
``_orig_mod.`` from torch.compile), so a checkpoint resumes with any number of
processes, compiled or not. Several processes write into one folder: the run folder must
be on a filesystem they all share (checked when training starts).
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from budgetlora.errors import BudgetloraError, option
from budgetlora.rundir import CheckpointFolder, RunFolder
from budgetlora.runtime import Runtime, is_main_process, rng_state

__all__ = [
    "save_checkpoint",
    "latest_checkpoint",
    "checkpoints",
    "load_newest_readable",
    "load_checkpoint",
    "trainable_state",
    "load_trainable_state",
]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable parameters of a bare (unwrapped) model, by name."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into a bare model's parameters, in each parameter's own dtype and device."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"checkpoint parameters not in the model: {', '.join(unknown[:5])}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def save_checkpoint(
    runtime: Runtime,
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    process_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` (main process) and each process's RNG and ``process_state`` as one
    folder, atomically.

    Every process must call this at the same step. The folder appears by one rename once
    complete; only the newest ``keep`` checkpoints are kept.
    """
    accelerator = runtime.accelerator
    folder = RunFolder(run_dir)
    final = folder.checkpoint(step)
    tmp = CheckpointFolder(final.staging)
    if is_main_process():
        shutil.rmtree(tmp.path, ignore_errors=True)
        tmp.path.mkdir(parents=True)
    accelerator.wait_for_everyone()
    mine = {"rng": rng_state(runtime.device), **(process_state or {})}
    torch.save(mine, tmp.process(accelerator.process_index))
    if is_main_process():
        torch.save({**state, "processes": accelerator.num_processes}, tmp.state)
    accelerator.wait_for_everyone()
    if is_main_process():
        shutil.rmtree(final.path, ignore_errors=True)
        os.replace(tmp.path, final.path)
        for old in folder.checkpoint_folders()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final.path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders, oldest first (each complete when it appeared: renamed in whole)."""
    return RunFolder(run_dir).checkpoint_folders()


def load_newest_readable(
    run_dir: Path, process_index: int
) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """(folder, run state, this process's state) of the newest checkpoint whose files can be
    read, saying which were skipped and why; None where the run has no checkpoint. A folder
    can be complete and its files still damaged (a disk that lost the last writes before a
    crash, a copy cut short): only reading them tells."""
    found = checkpoints(run_dir)
    problems = []
    for path in reversed(found):
        try:
            return (path, *load_checkpoint(path, process_index))
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as err:
            problems.append(f"{path}: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}")
            print(f"checkpoint {path} cannot be read ({problems[-1]}); trying an older one", flush=True)
    if found:
        raise BudgetloraError(
            f"no checkpoint of {run_dir} can be read: "
            + "; ".join(problems)
            + f". Start the run again without {option('resume')} (or with {option('overwrite')})"
        )
    return None


def load_checkpoint(path: Path, process_index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run state, this process's own state: "rng" and what it saved) of a checkpoint.

    A process the checkpoint has no file for (resumed with more processes than it was
    saved with) gets process 0's.
    """
    folder = CheckpointFolder(path)
    state = torch.load(folder.state, map_location="cpu", weights_only=False)
    for key in ("config", "trainable", "optimizer", "scheduler", "progress", "best_state", "history"):
        if key not in state:
            raise KeyError(f"state.pt holds no {key!r}")
    own = folder.process(process_index)
    if not own.is_file():
        own = folder.process(0)
    return state, torch.load(own, map_location="cpu", weights_only=False)
