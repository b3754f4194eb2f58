"""One writer per output: a second command on the same folder or file stops at once, naming the
first; a killed writer leaves nothing that blocks the next one; a damaged newest checkpoint
falls back to an older one. Real `budgetlora` processes against the real lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from budgetlora.rundir import output_lock
from budgetlora.training.checkpoint import checkpoints
from commands import run_cli
from test_resume import ENV, _train_args


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "budgetlora", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, process: subprocess.Popen[str], what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, (
            f"the first writer ended before {what}: {process.communicate()[1][-2000:]}"
        )
        assert time.monotonic() < deadline, f"no {what} within 300 s"
        time.sleep(0.05)


def test_a_second_train_on_the_same_output_stops_at_once_naming_the_first(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = _train_args(tiny_model_dir, tiny_data_csv, out, epochs=40)
    first = _start(args)
    _wait_for(lambda: bool(checkpoints(out)), first, "a checkpoint")
    second = run_cli(*args)
    assert second.returncode == 2
    assert f"--output {out} is being written by budgetlora process {first.pid}" in second.stderr
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 130, stderr[-2000:]
    resumed = run_cli("train", "--resume", "--output", str(out), "--no-progress")  # the lock is free again
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "metrics.json").is_file()


def test_a_killed_writer_does_not_block_resume(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    first = _start(_train_args(tiny_model_dir, tiny_data_csv, out, epochs=40))
    _wait_for(lambda: bool(checkpoints(out)), first, "a checkpoint")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (tmp_path / ".run.lock").is_file()  # left behind, and no obstacle
    resumed = run_cli("train", "--resume", "--output", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out / 'checkpoints'}" in resumed.stdout


def test_resume_falls_back_from_a_damaged_checkpoint(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    first = _start(_train_args(tiny_model_dir, tiny_data_csv, out, epochs=40))
    _wait_for(lambda: len(checkpoints(out)) >= 2, first, "two checkpoints")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    older, newest = checkpoints(out)[-2:]
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # cut short, as by a crash
    resumed = run_cli("train", "--resume", "--output", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        f"checkpoint {newest} cannot be read" in resumed.stdout and f"resuming from {older}" in resumed.stdout
    )


def test_resume_with_no_readable_checkpoint_names_them(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    first = _start(_train_args(tiny_model_dir, tiny_data_csv, out, epochs=40))
    _wait_for(lambda: bool(checkpoints(out)), first, "a checkpoint")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    for folder in checkpoints(out):
        (folder / "state.pt").write_bytes(b"not a checkpoint")
    resumed = run_cli("train", "--resume", "--output", str(out), "--no-progress")
    assert resumed.returncode == 2
    assert "no checkpoint of" in resumed.stderr and str(checkpoints(out)[-1]) in resumed.stderr


@pytest.mark.parametrize("command", ["predict", "evaluate", "shift", "export"])
def test_every_writing_command_stops_when_its_output_is_held(
    command: str, tiny_run, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / ("out.csv" if command == "predict" else "out")
    args = {
        "predict": ["predict", str(tiny_run.run_dir), str(tiny_data_csv), "--output", str(out)],
        "evaluate": ["evaluate", str(tiny_run.run_dir), "--split", "test", "--output", str(out)],
        "shift": ["shift", str(tiny_run.run_dir), str(tiny_data_csv), "--output", str(out)],
        "export": ["export", str(tiny_run.run_dir), str(out)],
    }[command]
    with output_lock(out):
        done = run_cli(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{out} is being written by budgetlora process {os.getpid()}" in done.stderr
    assert not out.exists()
