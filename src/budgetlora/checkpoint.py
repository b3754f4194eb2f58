"""Resumable checkpoints of a training run: ``RUN/checkpoints/step-N/``.

Not ``accelerator.save_state``: that writes every prepared model's full state dict, i.e.
the frozen encoder too (about 500 MB for roberta-base per checkpoint). A LoRA run only
needs its trainable parameters (a few MB), the optimizer and scheduler, each process's
RNG states and the loop's position; the frozen weights come from the base model again.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "restore_rng"]

_PREFIX = "step-"


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator: Accelerator,
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
    root = run_dir / "checkpoints"
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    mine = {"rng": _rng_state(), **(process_state or {})}
    torch.save(mine, tmp / f"process-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(state, tmp / "state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = sorted((run_dir / "checkpoints").glob(f"{_PREFIX}*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, process_index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run state, this process's own state: "rng" and what it saved) of a checkpoint."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    own = path / f"process-{process_index}.pt"
    if not own.is_file():  # resumed with more processes than it was saved with
        own = path / "process-0.pt"
    return state, torch.load(own, map_location="cpu", weights_only=False)
