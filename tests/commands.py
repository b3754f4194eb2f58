"""budgetlora's commands as tests run them: the CLI in a subprocess or in this process, and a real
`budgetlora serve` process with a small HTTP client."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``budgetlora ARGS`` in a real subprocess (``python -m budgetlora``), offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "budgetlora", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/SCRIPT ARGS`` from the repository root, as its docstring says to run it."""
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(repo / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=repo, timeout=900)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``budgetlora ARGS`` in this process, as :func:`run_cli` reports it (exit code, stdout,
    stderr) without an interpreter start-up: the same ``main`` that ``python -m budgetlora`` calls."""
    from budgetlora.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's --help and usage errors
            code = int(exit_.code or 0)
    return subprocess.CompletedProcess(["budgetlora", *args], code, out.getvalue(), err.getvalue())


def main_exit(*args: str) -> tuple[int, str]:
    """``budgetlora ARGS`` in this process: exit code and stderr."""
    result = cli(*args)
    return result.returncode, result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def request(url: str, body: bytes | None = None, method: str | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body) of one HTTP request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def post(base: str, payload: Any) -> tuple[int, Any]:
    return request(f"{base}/classify", json.dumps(payload).encode())


@contextmanager
def server(path: Path, *options: str) -> Iterator[str]:
    """A `budgetlora serve` subprocess; yields its base URL once /health answers."""
    with serving(path, *options) as (base, _):
        yield base


@contextmanager
def serving(path: Path, *options: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A `budgetlora serve` subprocess; yields its base URL and the process once /health answers,
    and checks on leaving that it stopped cleanly (SIGTERM, unless the test stopped it)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "budgetlora", "serve", str(path), "--port", str(port), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")  # type: ignore[union-attr]
            try:
                if request(f"{base}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health in 300 s"
            time.sleep(0.5)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        output = proc.communicate(timeout=60)[0]
    # uvicorn shuts down (the app's shutdown ran: "stopped"), then re-raises the SIGTERM it caught.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert output.rstrip().endswith("budgetlora serve: stopped"), output
    assert "Traceback" not in output, output
