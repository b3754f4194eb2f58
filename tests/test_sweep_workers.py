"""One study, several workers: the same `budgetlora sweep` command started several times on one
storage, as real processes, on SQLite (one machine) and on a real PostgreSQL server that the
test starts. Together they run the requested number of trials, each trial by one worker; a
worker killed mid-trial leaves its trial failed, and another worker runs it again."""

from __future__ import annotations

import csv
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from budgetlora.config import config_from_dict, load_config, save_config
from test_sweep import base_cfg

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
SPACE = "lora.r: [1, 2, 4]\ntrain.lr: [0.01, 0.003]\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """The URL of a fresh PostgreSQL server on the loopback address, stopped afterwards."""
    initdb = shutil.which("initdb") or next(
        iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None
    )
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (initdb not found): .ci/run installs Debian's postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 (the test extras) is not installed")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
    folder = Path(tempfile.mkdtemp(prefix="budgetlora-pg-"))  # not under pytest's root-only folder
    if os.geteuid() == 0:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", _free_port()
    bindir = Path(initdb).resolve().parent
    made = subprocess.run(
        _as_postgres(
            [str(bindir / "initdb"), "-D", str(data), "-U", "budgetlora", "--auth=trust", "-E", "UTF8"]
        ),
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed: {made.stderr[-500:]}")
    server = subprocess.Popen(
        _as_postgres(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(folder),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ]
        ),  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"postgresql+psycopg2://budgetlora@127.0.0.1:{port}/postgres"
    import psycopg2

    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user="budgetlora", dbname="postgres").close()
            break
        except psycopg2.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                shutil.rmtree(folder, ignore_errors=True)
                pytest.skip(
                    f"PostgreSQL did not start: {server.stderr.read()[-500:] if server.stderr else ''}"
                )
            time.sleep(0.3)
    yield url
    subprocess.run(
        _as_postgres([str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast"]), capture_output=True
    )
    server.wait(timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared-study.db'}"
    url: str = request.getfixturevalue("postgres")
    return url


def _start_worker(args: list[str], log: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "budgetlora", "sweep", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )


def _sweep_args(
    tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path, out: Path, storage: str
) -> list[str]:
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    save_config(base_cfg(tiny_model_dir, tiny_data_csv), base)
    space.write_text(SPACE)
    return [
        "--config", str(base), "--space", str(space), "--output", str(out), "--storage", storage,
        "--study-name", _study(out), "--heartbeat", "1", "--no-progress",
    ]  # fmt: skip


def _study(out: Path) -> str:
    """A study name of the test's own: the PostgreSQL server serves the whole module."""
    return f"{out.parent.name}-{out.name}"


def _check_consistent(out: Path, study: optuna.Study, trials: int) -> list[optuna.trial.FrozenTrial]:
    """The study holds ``trials`` finished or pruned trials, each run by one worker into its own
    folder; trials.csv and best.yaml say what the study says. Returns the study's trials."""
    kept = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    counted = [t for t in kept if t.state in COUNTED]
    assert len(counted) == trials, [(t.number, t.state) for t in kept]
    for t in counted:
        assert t.user_attrs.get("worker"), t.number  # recorded by the worker that ran it
    finished = {p.parent.name for p in out.glob("*trial-*/metrics.json")}
    assert finished == {
        f"{study.study_name}-trial-{t.number:04d}" for t in kept if t.state == TrialState.COMPLETE
    }
    with (out / "trials.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((int(r["trial"]), r["state"]) for r in rows) == sorted(
        (t.number, t.state.name.lower()) for t in kept
    )
    best = max((t for t in kept if t.state == TrialState.COMPLETE), key=lambda t: t.value or 0.0)
    expected = config_from_dict(best.user_attrs["config"])
    assert (
        load_config(out / "best.yaml").model == expected.model
        and load_config(out / "best.yaml").train == expected.train
    )
    return kept


def test_workers_on_one_study_run_the_requested_trials_exactly(
    storage: str, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    args = [*_sweep_args(tiny_model_dir, tiny_data_csv, tmp_path, out, storage), "--trials", "5"]
    workers = [_start_worker(args, tmp_path / f"worker-{i}.log") for i in range(3)]
    codes = [w.wait(timeout=600) for w in workers]
    logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(3)]
    assert codes == [0, 0, 0], logs
    study = optuna.load_study(study_name=_study(out), storage=storage)
    kept = _check_consistent(out, study, trials=5)
    ran = [int(log.split(" trial(s) run now")[0].rsplit("\n", 1)[-1]) for log in logs]
    assert sum(ran) == 5  # each worker counts the trials it ran: none twice, none lost
    assert len({t.user_attrs["worker"] for t in kept}) >= 2  # the work was shared


def test_a_worker_killed_mid_trial_leaves_it_failed_and_another_runs_it_again(
    storage: str, tiny_model_dir: Path, tiny_data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    args = [*_sweep_args(tiny_model_dir, tiny_data_csv, tmp_path, out, storage), "--trials", "4"]
    args += ["--set", "train.epochs=4"]  # trials long enough to be killed inside one
    doomed = _start_worker(args, tmp_path / "doomed.log")
    deadline, victim = time.monotonic() + 300, None
    while victim is None:  # wait for the doomed worker to be inside a trial
        assert doomed.poll() is None and time.monotonic() < deadline, (tmp_path / "doomed.log").read_text()
        try:
            trials = optuna.load_study(study_name=_study(out), storage=storage).get_trials(
                states=(TrialState.RUNNING,)
            )
        except KeyError:  # the study is not created yet
            trials = []
        victim = next((t for t in trials if t.user_attrs.get("worker", "").endswith(f":{doomed.pid}")), None)
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    survivor = _start_worker(args, tmp_path / "survivor.log")
    assert survivor.wait(timeout=600) == 0, (tmp_path / "survivor.log").read_text()

    study = optuna.load_study(study_name=_study(out), storage=storage)
    kept = _check_consistent(out, study, trials=4)
    killed = next(t for t in kept if t.number == victim.number)
    assert killed.state == TrialState.FAIL
    again = [t for t in kept if t.system_attrs.get("failed_trial") == victim.number]
    assert len(again) == 1 and again[0].state in COUNTED and again[0].params == killed.params
    with (out / "trials.csv").open(newline="") as fh:
        notes = {int(r["trial"]): r["note"] for r in csv.DictReader(fh)}
    assert (
        "worker stopped" in notes[victim.number] and f"trial {victim.number} again" in notes[again[0].number]
    )


def test_a_trial_past_the_count_is_dropped_before_it_runs() -> None:
    """The rule the workers share, on a real study: trials are ranked by number among those done
    and running; one ranked past the requested count (two workers started it at once) is
    marked surplus and left out of the study's tables."""
    from budgetlora.training.sweep import _check_not_surplus, _study_trials, _Surplus

    study = optuna.create_study()
    done = study.ask()
    study.tell(done, 0.5)
    first, second = study.ask(), study.ask()  # two workers start a trial at the same moment
    _check_not_surplus(study, first, 2)  # done + first make 2: it runs
    with pytest.raises(_Surplus, match="2 trials are done or running already"):
        _check_not_surplus(study, second, 2)
    study.tell(second, state=TrialState.FAIL)
    assert [t.number for t in _study_trials(study)] == [done.number, first.number]
    _check_not_surplus(study, study.ask(), 3)  # with room for a third, the next one runs
