"""Every device decision of a training or inference process, in one place.

The rest of budgetlora is device-agnostic: it asks a :class:`Runtime` which device,
precision, padding multiple, pinning, optimizer kernel and inference batch size to use,
and calls the helpers here for what differs between one process and several (who writes,
how processes agree to stop, whose RNG is saved). :func:`plan_device` makes the
decisions as a pure function, so the CPU test suite takes its CUDA branches too; the
lines that only a GPU can run are the few marked "CUDA only" below.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from torch import nn

from budgetlora.errors import BudgetloraError, option
from budgetlora.rundir import output_lock

__all__ = [
    "writer_lock",
    "DevicePlan",
    "Runtime",
    "plan_device",
    "make_runtime",
    "cpu_has_fast_bf16",
    "unwrap",
    "compile_for_training",
    "compilations",
    "rng_state",
    "restore_rng",
    "StopAgreement",
    "is_main_process",
    "on_main_process",
    "check_shared_folder",
    "end_processes",
]

T = TypeVar("T")

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DevicePlan:
    """What one process does on its device; made by :func:`plan_device`."""

    device_type: str
    """"cuda" or "cpu"."""
    mixed_precision: str
    """Autocast of training: "no", "bf16" or "fp16"."""
    pin_memory: bool
    """Page-locked host batches, so that host-to-device copies overlap compute (CUDA)."""
    pad_to_multiple_of: int
    """Pad batch widths to a multiple of this (8 on CUDA: tensor-core shapes)."""
    fused_optimizer: bool
    """Fused AdamW kernels (CUDA)."""
    inference_batch_size: int
    """Default inference batch: 256 on a GPU; 16 on a CPU, where large batches fall out of cache."""
    inference_dtype: torch.dtype
    """Weights of a merged inference model: half precision where training autocasts to it."""
    tf32: bool
    """TF32 matmuls (CUDA)."""
    note: str | None = None
    """Why the request was changed (said once on stderr), e.g. fp16 asked for on a CPU."""


def plan_device(
    device_type: str,
    mixed_precision: str = "auto",
    *,
    gpu_native_bf16: bool = False,
    cpu_fast_bf16: bool = False,
) -> DevicePlan:
    """The decisions for a process on ``device_type`` ("cuda" or "cpu").

    ``mixed_precision="auto"``: bf16 on GPUs with native bf16 (compute capability 8.0+:
    A100, H100, RTX 30xx and newer), fp16 on older GPUs (V100, T4: their bf16 is emulated
    and slow); on a CPU bf16 where it has bf16 matrix units (AMX / AVX512-BF16: MiniLM
    trained 1.33x faster at the same accuracy), else fp32. fp16 on a CPU runs in fp32:
    there is no fp16 autocast there.
    """
    cuda = device_type == "cuda"
    note = None
    if mixed_precision == "auto":
        if cuda:
            mixed_precision = "bf16" if gpu_native_bf16 else "fp16"
        else:
            mixed_precision = "bf16" if cpu_fast_bf16 else "no"
    if mixed_precision == "fp16" and not cuda:
        note = "budgetlora: fp16 needs a GPU; running in fp32 on the CPU"
        mixed_precision = "no"
    return DevicePlan(
        device_type=device_type,
        mixed_precision=mixed_precision,
        pin_memory=cuda,
        pad_to_multiple_of=8 if cuda else 1,
        fused_optimizer=cuda,
        inference_batch_size=256 if cuda else 16,
        inference_dtype=_HALF.get(mixed_precision, torch.float32),
        tf32=cuda,
        note=note,
    )


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix units (AMX) or AVX512-BF16."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence guarded
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _gpu_native_bf16(device: torch.device) -> bool:  # CUDA only
    # Asked of this process's own GPU, after placement; torch.cuda.is_bf16_supported()
    # would count emulated bf16 and look at cuda:0.
    return torch.cuda.get_device_capability(device)[0] >= 8


def _process_state() -> PartialState:
    """This process's place among the processes of a run (set up once, as make_runtime sets it up)."""
    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True in the process that writes and prints: rank 0 of a torchrun / accelerate launch
    run, or the only process. The one test of it, also before a :class:`Runtime` exists."""
    return bool(_process_state().is_main_process)


@dataclass(frozen=True)
class Runtime:
    """A process's accelerator and its device plan."""

    accelerator: Accelerator
    plan: DevicePlan

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        """See :func:`is_main_process`."""
        return is_main_process()

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def mixed_precision(self) -> str:
        return self.plan.mixed_precision


def make_runtime(mixed_precision: str = "auto") -> Runtime:
    """The runtime of this process: its device (cuda:LOCAL_RANK under torchrun), the plan
    for it, and an Accelerator with the planned precision.

    Without CUDA the Accelerator is created with ``cpu=True``: accelerate only sets up
    multi-process CPU training (gloo, under torchrun) in that mode.
    """
    on_cuda = torch.cuda.is_available()
    # accelerate keeps one process-wide state and refuses a second Accelerator with other
    # settings (a sweep, or train() called twice); the process group itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    state = _process_state()  # places this process on its device
    plan = plan_device(
        state.device.type,
        mixed_precision,
        gpu_native_bf16=on_cuda and _gpu_native_bf16(state.device),
        cpu_fast_bf16=not on_cuda and cpu_has_fast_bf16(),
    )
    if plan.note and is_main_process():
        print(plan.note, file=sys.stderr)
    if plan.tf32:  # CUDA only
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(Accelerator(mixed_precision=plan.mixed_precision, cpu=not on_cuda), plan)


def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The bare model under DDP and torch.compile wrappers: its parameter names carry no
    ``module.`` or ``_orig_mod.`` prefix, and its forward is the eager one."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)  # type: ignore[no-any-return]


def compile_for_training(model: nn.Module) -> nn.Module:
    """torch.compile for the training forward. Length-grouped batches change the sequence
    length every batch: compiled for dynamic shapes, so that a new length is no new graph.
    Compiled state of an earlier run in this process (a sweep's trials) is dropped first."""
    torch._dynamo.reset()
    return torch.compile(model, dynamic=True)  # type: ignore[return-value]


def compilations() -> int:
    """Graphs torch.compile has compiled in this process since the last reset."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


# --- what each process saves and restores --------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """The RNG states this process draws from: Python, NumPy, torch's CPU and its own GPU's."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):  # CUDA only
        torch.cuda.set_rng_state(state["cuda"], device)


def scaler_state(accelerator: Accelerator) -> dict[str, Any] | None:
    """fp16's loss-scaler state (None without one): a resumed run continues its scale."""
    scaler = accelerator.scaler
    return scaler.state_dict() if scaler is not None else None


def load_scaler_state(accelerator: Accelerator, state: dict[str, Any] | None) -> None:
    if state is not None and accelerator.scaler is not None:  # CUDA only (fp16)
        accelerator.scaler.load_state_dict(state)


# --- several processes ------------------------------------------------------------


class StopAgreement:
    """When all processes agree to stop after a signal (SIGINT/SIGTERM to any of them).

    Agreeing costs a collective (a host-device sync): one process decides at every step,
    several agree every ``interval`` steps. The interval starts at ``max_interval`` (the
    log interval) and is re-planned at each agreement from the slowest process's seconds
    since the previous one, so that processes agree about every ``seconds`` even where
    steps are slow and torchrun's grace period after SIGTERM is short.
    """

    def __init__(self, accelerator: Accelerator, *, max_interval: int, seconds: float = 5.0) -> None:
        self.accelerator = accelerator
        self.max_interval = max(1, max_interval)
        self.interval = self.max_interval
        self.seconds = seconds
        self._since = 0
        self._last = time.monotonic()

    def stop(self, received: str | None) -> str | None:
        """Called once per optimizer step on every process; the reason to stop, or None."""
        if self.accelerator.num_processes == 1:
            return received
        self._since += 1
        if self._since < self.interval:
            return None
        now = time.monotonic()
        mine = torch.tensor([1.0 if received else 0.0, now - self._last], device=self.accelerator.device)
        flag, elapsed = self.accelerator.reduce(mine, "max").tolist()  # type: ignore[union-attr]
        self.interval = next_interval(self._since, elapsed, self.seconds, self.max_interval)
        self._since, self._last = 0, now
        return received or ("a signal to another process" if flag > 0 else None)


def next_interval(steps: int, elapsed: float, seconds: float, max_interval: int) -> int:
    """Steps between agreements so that they come about every ``seconds``, given that the
    last ``steps`` steps took ``elapsed`` seconds on the slowest process; 1..max_interval."""
    per_step = elapsed / max(steps, 1)
    if per_step <= 0:
        return max_interval
    return int(min(max_interval, max(1, seconds // per_step)))


def on_main_process(accelerator: Accelerator, work: Callable[[], T], what: str) -> T | None:
    """Run ``work`` on the main process while the others wait, and let all of them know
    whether it failed: the main process re-raises, the others raise an error naming
    ``what``, instead of waiting in a barrier until the collective times out."""
    result, failure = None, None
    if is_main_process():
        try:
            result = work()
        except BaseException as err:  # every kind: the other processes must hear of it
            failure = err
    if accelerator.num_processes > 1:
        failed = torch.tensor([1.0 if failure is not None else 0.0], device=accelerator.device)
        if accelerator.reduce(failed, "sum").item() > 0 and failure is None:  # type: ignore[union-attr]
            raise BudgetloraError(f"the main process failed while {what}; see its error above")
    if failure is not None:
        raise failure
    return result


def writer_lock(path: Path, option: str = option("output")) -> AbstractContextManager[None]:
    """The one-writer lock of an output (:func:`budgetlora.rundir.output_lock`), taken by the
    main process alone: it is the one that writes, and the others would find it taken."""
    return output_lock(path, option) if is_main_process() else nullcontext()


def end_processes() -> None:
    """Tear down the process group (if any) before the interpreter exits: gloo's threads,
    left running at exit, abort a process ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_shared_folder(accelerator: Accelerator, folder: Path) -> None:
    """Several processes write one run folder: check that every process sees the same one
    (nodes without a shared filesystem, or a relative path from other working folders)."""
    if accelerator.num_processes == 1:
        return
    main = is_main_process()
    token = [secrets.token_hex(8) if main else ""]
    marker = folder / ".budgetlora-shared-check"
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(token[0])
    broadcast_object_list(token)
    accelerator.wait_for_everyone()
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    missing = torch.tensor([0.0 if seen else 1.0], device=accelerator.device)
    blind = int(accelerator.reduce(missing, "sum").item())  # type: ignore[union-attr]
    accelerator.wait_for_everyone()
    if main:
        marker.unlink(missing_ok=True)
    if blind:
        raise BudgetloraError(
            f"{option('output')} {folder}: {blind} of {accelerator.num_processes} processes do not see the folder the "
            f"main process writes. Training with several nodes needs an {option('output')} on a filesystem that "
            f"every node shares (NFS, Lustre, ...), given as an absolute path (host {os.uname().nodename})"
        )
