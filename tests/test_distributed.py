"""What several processes do together, run by real torchrun processes on the CPU (gloo):
a failure of the main process reaches the others, every process must see the run folder,
a signal to one process stops all of them at the same step, and a run interrupted with
one number of processes resumes with another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from budgetlora.training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from budgetlora.errors import BudgetloraError
    from budgetlora.runtime import (
        StopAgreement, check_shared_folder, end_processes, make_runtime, on_main_process,
    )

    runtime = make_runtime("no")
    rank, base = runtime.process_index, Path(sys.argv[1])

    def fail_on_main():
        raise RuntimeError("disk full")

    try:
        on_main_process(runtime.accelerator, fail_on_main, "writing the report")
    except (RuntimeError, BudgetloraError) as err:
        print(f"rank {rank} write: {type(err).__name__}: {err}", flush=True)
    print(f"rank {rank} result: {on_main_process(runtime.accelerator, lambda: 42, 'x')}", flush=True)

    check_shared_folder(runtime.accelerator, base / "shared")
    print(f"rank {rank} shared: ok", flush=True)
    try:  # as if each node had a filesystem of its own
        check_shared_folder(runtime.accelerator, base / f"node-{rank}")
    except BudgetloraError as err:
        print(f"rank {rank} separate: {err}", flush=True)

    agreement = StopAgreement(runtime.accelerator, max_interval=4)
    for step in range(1, 100):
        received = "SIGTERM" if rank == 1 and step >= 6 else None
        if stop := agreement.stop(received):
            print(f"rank {rank} stopped at step {step}: {stop}", flush=True)
            break
    end_processes()
    """
)


def test_processes_share_failures_folders_and_stops(tmp_path: Path) -> None:
    script = tmp_path / "together.py"
    script.write_text(SCRIPT)
    start = time.monotonic()
    done = subprocess.run(
        [*TORCHRUN, str(script), str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - start < 120  # nobody waited for a collective timeout
    out = done.stdout
    assert "rank 0 write: RuntimeError: disk full" in out
    assert "rank 1 write: BudgetloraError: the main process failed while writing the report" in out
    assert "rank 0 result: 42" in out and "rank 1 result: None" in out
    assert "rank 0 shared: ok" in out and "rank 1 shared: ok" in out
    assert not (tmp_path / "shared" / ".budgetlora-shared-check").exists()
    for rank in (0, 1):
        assert f"rank {rank} separate: `output` {tmp_path / f'node-{rank}'}: 1 of 2 processes" in out
    # Rank 1 got the signal at step 6; both agree at the next agreement, step 8.
    assert "rank 0 stopped at step 8: a signal to another process" in out
    assert "rank 1 stopped at step 8: SIGTERM" in out


def _train(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(data), "--output", str(out), "--epochs", "12",
        "--lr", "1e-2", "--batch-size", "8", "--lora-r", "4", "--set", "data.validation_size=0.2",
        "--set", "data.test_size=0.2", "--max-length", "32", "--log-every", "2", "--eval-every", "400",
        "--checkpoint-every", "6", "--no-progress", *extra,
    ]  # fmt: skip


def _start_and_interrupt(command: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while latest_checkpoint(out) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_a_run_resumes_with_another_number_of_processes(
    first: int, then: int, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    launch = {1: [sys.executable, "-m", "budgetlora"], 2: [*TORCHRUN, "-m", "budgetlora"]}
    killed = _start_and_interrupt([*launch[first], *_train(out, tiny_model_dir, tiny_data_csv)], out)
    assert killed.returncode != 0 and "interrupted by" in killed.stderr, killed.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    assert state["processes"] == first
    # Saved under the bare model's names, whatever wrapped it (DDP adds "module.").
    assert state["trainable"] and not any(name.startswith("module.") for name in state["trainable"])
    stopped = state["progress"]["step"]

    resumed = subprocess.run(
        [*launch[then], "train", "--resume", "--output", str(out), "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"saved by {first} processes, resumed by {then}" in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    # 288 training rows; steps of 8 samples a process: 36 an epoch with 1 process, 18 with 2.
    assert metrics["timing"]["processes"] == then and metrics["steps"] == 12 * 36 // then
    assert metrics["test"]["n"] == 96 and metrics["test"]["accuracy"] > 0.9
    steps = [r["step"] for r in map(json.loads, (out / "history.jsonl").read_text().splitlines())]
    assert steps == sorted(steps)  # the history continues in the new step count
    assert steps[-1] == metrics["steps"] and stopped * first // then <= steps[-1]


@pytest.mark.parametrize("victim", [0, 1])
def test_a_process_killed_stops_the_others_and_the_run_resumes(
    victim: int, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    """SIGKILL to one of two training processes (no handler runs, no checkpoint is written): the
    other stops within a bounded time instead of waiting in a collective for ever, torchrun
    exits non-zero naming the process that died, and --resume continues from the last checkpoint."""
    out = tmp_path / "run"
    command = [*TORCHRUN, "-m", "budgetlora", *_train(out, tiny_model_dir, tiny_data_csv)]
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while latest_checkpoint(out) is None and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.poll() is None, launcher.communicate()[1][-3000:]
    workers = {
        int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children() if "RANK" in p.environ()
    }
    assert sorted(workers) == [0, 1]
    workers[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    stdout, stderr = launcher.communicate(timeout=300)
    assert time.monotonic() - killed_at < 120, "the surviving process hung"
    assert launcher.returncode != 0 and not (out / "metrics.json").exists()
    assert f"rank      : {victim}" in stderr and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers.values())

    resumed = subprocess.run(
        [*TORCHRUN, "-m", "budgetlora", "train", "--resume", "--output", str(out), "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 * 36 // 2 and metrics["test"]["accuracy"] > 0.9
