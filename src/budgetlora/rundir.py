"""The layout of a run folder and of an export folder (which file says what), the checks
that a folder is one, and files written atomically: a crash never leaves a truncated file.

A run folder (``budgetlora train``) holds ``config.yaml`` from its start; the adapter, the
tokenizer, ``budget.json`` and the report when it finishes, and ``metrics.json`` last, whose
presence marks a finished run. An export folder (``budgetlora export``) holds ``export.json``
and, with ``--format onnx``, ``model.onnx``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from budgetlora.errors import BudgetloraError, option, setting

__all__ = [
    "CONFIG",
    "METRICS",
    "BUDGET",
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "TOKENIZER_CONFIG",
    "EXPORT_INFO",
    "ONNX_FILE",
    "is_finished",
    "tokenizer_source",
    "read_budget",
    "headline_metrics",
    "check_run_dir",
    "check_output",
    "read_export_info",
    "check_export_dir",
    "check_output_path",
    "write_text_atomic",
    "write_json_atomic",
    "atomic_path",
    "replace_dir_atomic",
    "output_lock",
]

CONFIG = "config.yaml"
METRICS = "metrics.json"
BUDGET = "budget.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors")
TOKENIZER_CONFIG = "tokenizer_config.json"
EXPORT_INFO = "export.json"
ONNX_FILE = "model.onnx"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / METRICS).is_file()


def tokenizer_source(folder: Path, fallback: str) -> str:
    """The folder itself where a tokenizer was saved in it, else ``fallback`` (the base model)."""
    return str(folder) if (folder / TOKENIZER_CONFIG).is_file() else fallback


def read_budget(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``budget.json`` (the trainable-parameter breakdown), or None before it is written."""
    path = run_dir / BUDGET
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def headline_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """Accuracy, macro-F1 and row count of each scored split of a run ({} before it finishes)."""
    if not is_finished(run_dir):
        return {}
    metrics = json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    return {
        split: {key: metrics[split][key] for key in ("accuracy", "macro_f1", "n")}
        for split in ("validation", "test")
        if isinstance(metrics.get(split), dict)
    }


def check_run_dir(run_dir: Path) -> None:
    """Refuse what is not a run folder with a trained adapter, saying what is missing."""
    if not run_dir.is_dir():
        raise BudgetloraError(f"run folder not found: {run_dir}")
    if not (run_dir / CONFIG).is_file():
        raise BudgetloraError(f"{run_dir} is not a budgetlora run folder: {CONFIG} is missing")
    missing = [f for f in ADAPTER_FILES if not (run_dir / f).is_file()]
    if missing:
        raise BudgetloraError(
            f"run folder {run_dir} has no trained adapter ({', '.join(missing)} missing): "
            "did its training finish? Re-run it with `budgetlora train --config "
            f"{run_dir / CONFIG}`"
        )


def check_output(run_dir: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to write over a finished run (unless ``overwrite``), or to resume what is not there."""
    if resume and not run_dir.is_dir():
        raise BudgetloraError(f"{option('resume')}: run folder {run_dir} does not exist")
    if resume and is_finished(run_dir):
        raise BudgetloraError(
            f"{option('resume')}: {run_dir} already finished ({METRICS} exists); nothing to resume"
        )
    if is_finished(run_dir) and not overwrite:
        raise BudgetloraError(
            f"{run_dir} already holds a finished run; choose another {option('output')}, or pass {option('overwrite')} "
            "(its files are replaced only when the new run finishes)"
        )
    check_output_path(run_dir, option("output"), folder=True)


def read_export_info(path: Path, option: str = "PATH") -> dict[str, Any]:
    """The ``export.json`` of an export folder; a clear error if it is missing or unreadable."""
    file = path / EXPORT_INFO
    if not file.is_file():
        raise BudgetloraError(f"{option} {path} is not a budgetlora export: {EXPORT_INFO} is missing")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BudgetloraError(f"{file} cannot be read: {err}") from err
    names = info.get("label_names") if isinstance(info, dict) else None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise BudgetloraError(f"{file} records no label_names (a list of at least two names)")
    if not isinstance(info.get("max_length"), int):
        raise BudgetloraError(f"{file} records no max_length")
    return info


def check_export_dir(path: Path, option: str = "PATH") -> dict[str, Any]:
    """``export.json`` of an export folder with its ONNX graph, checked (no model loaded)."""
    info = read_export_info(path, option)
    if "onnx" not in info.get("formats", []) or not (path / ONNX_FILE).is_file():
        raise BudgetloraError(
            f"{option} {path}: the export has no {ONNX_FILE}; re-export it with {setting('format', 'onnx')} (or all)"
        )
    return info


def check_output_path(path: Path, option: str, *, folder: bool) -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder goes or
    the reverse, a file among its parents, or a parent folder without write permission."""
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise BudgetloraError(f"{option} {path} exists and is not a {kind}; give a {kind} path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BudgetloraError(f"{option} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BudgetloraError(f"{option} {path}: no permission to write in {parent}")


_HELD: dict[Path, int] = {}  # the outputs this process holds the lock of, and how many times


@contextmanager
def output_lock(path: Path, option: str = option("output")) -> Iterator[None]:
    """Hold the one-writer lock of ``path`` (a folder or a file to write) while the block runs.

    The lock is an exclusive ``flock`` on ``.<name>.lock`` beside ``path`` (beside, not in it:
    an export folder is swapped whole), which records the holder and is removed on release.
    A second writer stops at once with an error naming the holder. The operating system
    drops the lock when its process ends, however it ends, so a killed run never blocks the
    next one (its lock file stays behind, free). A process that holds the lock already takes
    it again freely (self-training's last round writes the folder its rounds live in). Where
    ``fcntl`` does not exist (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms budgetlora is tested on
        yield
        return
    key = path.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    key.parent.mkdir(parents=True, exist_ok=True)
    lock_file = key.parent / f".{key.name}.lock"
    fd = _locked(lock_file, fcntl, f"{option} {path}", option)
    try:
        os.pwrite(fd, f"budgetlora process {os.getpid()} on {os.uname().nodename}".encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            lock_file.unlink(missing_ok=True)  # while still holding it: no one can hold this file now
    finally:
        os.close(fd)  # closing the file drops the lock


def _locked(lock_file: Path, fcntl: Any, what: str, option: str) -> int:
    """An open descriptor of ``lock_file`` holding its exclusive lock. The file is the one at
    that path when the lock is taken: a holder removes it as it lets go, and a lock on a file
    already removed would guard nothing, so that case opens the new one and tries again."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise BudgetloraError(
                f"{what} is being written by {holder}: one writer at a time. Wait for it to finish "
                f"(or stop it), or choose another {option}"
            ) from None
        try:
            current = os.stat(lock_file).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def replace_dir_atomic(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with ``fill(tmp_dir)`` and swap it in for ``target`` in one rename.

    The old folder (if any) is renamed aside first and removed only after the new one
    is in place, so an interrupted write leaves either the old or the new folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private (0700)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
