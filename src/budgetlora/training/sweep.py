"""Budget-aware hyperparameter search with optuna.

Each trial is a normal training run (:func:`budgetlora.training.train.train`, or
:func:`budgetlora.training.distill.distill` when a teacher is given) in ``<output>/trial-NNNN``.
The budget is a hard constraint checked on the weightless skeleton before anything
trains: an over-budget trial is pruned at once. Validation scores reach optuna's pruner
after every evaluation. The study lives in ``<output>/study.db`` (or any optuna storage
URL), so an interrupted sweep continues where it stopped and several processes can share one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from budgetlora.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    key_of,
    save_config,
    with_overrides,
)
from budgetlora.errors import BudgetloraError, OverBudgetError, option, setting
from budgetlora.reporting.metrics import as_score, lower_is_better
from budgetlora.rundir import SweepFolder, atomic_path, check_output_path, write_text_atomic
from budgetlora.training.train import PreparedRun, prepare_run, train

__all__ = ["SearchParam", "SweepResult", "load_space", "parse_space", "sweep"]

_DISTILL_KEYS = ("distill.alpha", "distill.temperature")
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class SearchParam:
    """One searched (or fixed) config key."""

    key: str
    kind: Literal["int", "float", "categorical", "fixed"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    """Categorical values (lists allowed, e.g. target module lists); the fixed value for 'fixed'."""

    def labels(self) -> list[Any]:
        """What optuna stores for each choice: the value itself, or its YAML text for a list."""
        return [_label(c) for c in self.choices]


def _label(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip()


def _normalize_key(key: str, teacher: bool) -> str:
    """The config key a search space names (:func:`budgetlora.config.key_of`: the key, or a short name)."""
    full = key_of(key)
    if full is None:
        raise BudgetloraError(
            f"search space key {key!r} is not a config key; use dotted keys such as train.lr, "
            "model.lora.r (or lora.r), model.method, vera.r, model.head, train.batch_size, distill.alpha"
        )
    if full in _DISTILL_KEYS and not teacher:
        raise BudgetloraError(f"search space key {key} needs a teacher ({option('distill.teacher')})")
    return full


def parse_space(space: dict[str, Any], *, teacher: bool = False) -> list[SearchParam]:
    """Read a search space: ``key: [choices]``, ``key: {type: int|float, low, high, log, step}``,
    ``key: {type: categorical, choices: [...]}``, or ``key: value`` (fixed, e.g. ``lora.r: auto``)."""
    if not isinstance(space, dict) or not space:
        raise BudgetloraError(
            "a search space must be a non-empty mapping of config keys to ranges or choices"
        )
    params: dict[str, SearchParam] = {}
    for raw_key, spec in space.items():
        key = _normalize_key(str(raw_key), teacher)
        if key in params:
            raise BudgetloraError(f"search space names {key} twice")
        where = f"search space {raw_key}"
        if isinstance(spec, list):
            if not spec:
                raise BudgetloraError(f"{where}: an empty list of choices")
            params[key] = SearchParam(key, "categorical", choices=tuple(spec))
        elif isinstance(spec, dict) and spec.get("type") == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise BudgetloraError(f"{where}: type categorical needs a non-empty list 'choices'")
            params[key] = SearchParam(key, "categorical", choices=tuple(choices))
        elif isinstance(spec, dict) and spec.get("type") in ("int", "float"):
            params[key] = _range(key, where, spec)
        elif isinstance(spec, dict):
            raise BudgetloraError(
                f"{where}: 'type' must be int, float or categorical, got {spec.get('type')!r}"
            )
        else:
            params[key] = SearchParam(key, "fixed", choices=(spec,))
    return list(params.values())


def _range(key: str, where: str, spec: dict[str, Any]) -> SearchParam:
    usage = "a range is {type: int|float, low: L, high: H (>= L), log: true|false, step: S}"
    try:  # YAML 1.1 reads 1e-4 (no dot) as text
        low, high = float(spec["low"]), float(spec["high"])
        step = None if spec.get("step") is None else float(spec["step"])
    except (KeyError, TypeError, ValueError):
        raise BudgetloraError(f"{where}: {spec!r}; {usage}") from None
    if set(spec) - {"type", "low", "high", "log", "step"} or low > high:
        raise BudgetloraError(f"{where}: {spec!r}; {usage}")
    if spec["type"] == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise BudgetloraError(f"{where}: type int needs integer low, high and step")
    if not all(math.isfinite(v) for v in (low, high, step or 1)) or (step is not None and step <= 0):
        raise BudgetloraError(f"{where}: {spec!r}; low, high and step must be finite, step > 0")
    if spec.get("log") and (low <= 0 or step is not None):
        raise BudgetloraError(f"{where}: {spec!r}; a log range needs low > 0 and no step")
    return SearchParam(key, spec["type"], low=low, high=high, log=bool(spec.get("log", False)), step=step)


def load_space(path: str | Path) -> dict[str, Any]:
    """Read ``space.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise BudgetloraError(f"search space file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise BudgetloraError(f"cannot parse search space {path}: {err}") from err


def _candidates(p: SearchParam) -> list[Any]:
    """The values of ``p`` that are checked up front: its choices, or a range's bounds."""
    if p.kind in ("int", "float"):
        kind = int if p.kind == "int" else float
        return [kind(p.low or 0), kind(p.high or 0)]
    return list(p.choices)


def _valid_beside(base_cfg: RunConfig, key: str, value: Any, candidates: dict[str, list[Any]]) -> bool:
    """Whether ``key: value`` makes a valid config with some values of the other searched keys: a
    momentum is refused with the base config's adamw, not in a space that also searches sgd."""
    others = [k for k in candidates if k != key]
    for combination in itertools.islice(itertools.product(*(candidates[k] for k in others)), 1000):
        try:
            with_overrides(base_cfg, {key: value, **dict(zip(others, combination, strict=True))})
        except BudgetloraError:
            continue
        return True
    return False


def _check_before_writing(base_cfg: RunConfig, params: Sequence[SearchParam]) -> None:
    """What can be checked before the sweep folder is made: every bound and choice of the
    space as a config value, and the base config's data and max length (unless the space
    searches the data or the model)."""
    from budgetlora.data.tables import load_splits
    from budgetlora.model.modeling import check_max_length

    candidates = {p.key: _candidates(p) for p in params}
    for p in params:
        for value in candidates[p.key]:
            try:
                with_overrides(base_cfg, {p.key: value})
            except BudgetloraError as err:
                if not (isinstance(err, ConfigError) and _valid_beside(base_cfg, p.key, value, candidates)):
                    raise BudgetloraError(f"search space {p.key}: the value {value!r}: {err}") from None
    searched = {p.key for p in params}
    if not any(key.startswith("data.") for key in searched) and "model.name_or_path" not in searched:
        check_max_length(base_cfg.model, base_cfg.data.max_length)
        load_splits(base_cfg.data)


def _grid(params: Sequence[SearchParam]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for p in params:
        if p.kind == "categorical":
            grid[p.key] = p.labels()
        elif p.kind == "int" and not p.log:
            grid[p.key] = list(range(int(p.low or 0), int(p.high or 0) + 1, int(p.step or 1)))
        elif p.kind != "fixed":
            raise BudgetloraError(
                f"{setting('sampler', 'grid')} needs lists or int ranges; {p.key} is a {p.kind} range"
            )
    return grid


def _suggest(trial: optuna.Trial, params: Sequence[SearchParam]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in params:
        if p.kind == "fixed":
            values[p.key] = p.choices[0]
        elif p.kind == "int":
            step = int(p.step or 1)
            values[p.key] = trial.suggest_int(p.key, int(p.low or 0), int(p.high or 0), step=step, log=p.log)
        elif p.kind == "float":
            values[p.key] = trial.suggest_float(
                p.key, float(p.low or 0), float(p.high or 0), log=p.log, step=p.step
            )
        else:
            label = trial.suggest_categorical(p.key, p.labels())
            values[p.key] = p.choices[p.labels().index(label)]
    return values


@dataclass
class SweepResult:
    output: Path
    study: optuna.Study
    best_value: float | None
    best_trial: int | None
    best_config: RunConfig | None
    """The best trial's resolved config, its output pointing at ``<output>/best``."""
    rows: list[dict[str, Any]]
    """trials.csv, best first."""
    ran: int
    """Trials this call ran (pruned ones included)."""


def _make_sampler(name: str, params: Sequence[SearchParam], seed: int) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return optuna.samplers.GridSampler(_grid(params), seed=seed)
    if name == "tpe":
        return _SeededByTrial(seed)
    raise BudgetloraError(f"{option('sampler')} {name!r}: allowed: tpe, grid")


class _SeededByTrial(optuna.samplers.BaseSampler):
    """TPE made afresh for each trial, seeded by the sweep's seed plus the trial's number: workers
    that start trials at the same moment draw differently, and a sweep run again draws the same.
    (TPE keeps no state but its random generator: the history comes from the study.)"""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._tpe = optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = optuna.samplers.TPESampler(seed=self._seed + trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, space: dict[str, Any]
    ) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, name: str, distribution: Any
    ) -> Any:
        return self._tpe.sample_independent(study, trial, name, distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._tpe.after_trial(study, trial, state, values)


_WORKER = f"{socket.gethostname()}:{os.getpid()}"
"""This process, as the trials it runs record it."""


def _study_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials but those dropped as surplus before they ran."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]


class _Surplus(Exception):
    """A trial started while the requested number were already done or running elsewhere."""


def _open_storage(url: str, heartbeat: float) -> optuna.storages.RDBStorage:
    """The study's database. Every running trial beats every ``heartbeat`` seconds; one that
    stops beating for three beats (its worker killed) is marked failed and run again once.
    Workers that open a new database at once may race to create its tables: the loser tries again."""
    # SQLite: a worker waits for the others' writes rather than fail on a locked database.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    attempt = 0
    while True:
        try:
            with warnings.catch_warnings():  # the heartbeat is marked experimental since optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=max(1, round(heartbeat)),
                    grace_period=max(3, round(3 * heartbeat)),
                    **_retry_stale(),
                )
        except SQLAlchemyError as err:
            attempt += 1
            racing = isinstance(err, IntegrityError) or "already exists" in str(err)
            if not racing or attempt == 5:
                raise
            time.sleep(attempt)


def _retry_stale() -> dict[str, Any]:
    """RDBStorage's argument that runs a stale trial again once (renamed in optuna 4.9)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
            return {
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1
                )
            }
        return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}


def _check_not_surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> None:
    """Stop ``trial`` when the trials done and running before it (by number) make ``target``."""
    live = sorted(t.number for t in study.get_trials(deepcopy=False, states=(*_COUNTED, TrialState.RUNNING)))
    if trial.number in live and live.index(trial.number) >= target:
        trial.set_user_attr("surplus", True)
        raise _Surplus(f"trial {trial.number}: {target} trials are done or running already")


def _run_trials(
    study: optuna.Study, objective: Any, target: int, tries: int, after_trial: Any, heartbeat: float
) -> list[int]:
    """Run trials until the study holds ``target`` finished or pruned ones, alongside any other
    worker on the same study: while the last ones run elsewhere this worker waits for them, and
    takes over a trial whose worker stopped beating (marked failed, then run again). This worker
    starts at most ``tries`` trials (failed ones count: an error in every trial ends the sweep).
    Returns the numbers of the trials it ran."""
    before = {t.number for t in study.get_trials(deepcopy=False)}
    waited = False
    while True:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        counted = sum(t.state in _COUNTED for t in trials)
        mine = [t.number for t in trials if t.number not in before and t.user_attrs.get("worker") == _WORKER]
        if counted >= target or len(mine) >= tries:
            return mine
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if counted + running >= target:
            if not waited:
                print(
                    f"sweep: {counted} trials done, the last {running} running elsewhere: waiting for them",
                    flush=True,
                )
                waited = True
            time.sleep(heartbeat)
            continue
        study.optimize(objective, n_trials=1, catch=(BudgetloraError, _Surplus), callbacks=[after_trial])


def _check_same_study(study: optuna.Study, fingerprint: dict[str, Any]) -> None:
    """A resumed study must search the same space from the same base config."""
    if not study.user_attrs:
        for name, value in fingerprint.items():
            study.set_user_attr(name, value)
        return
    changed = [name for name, value in fingerprint.items() if study.user_attrs.get(name) != value]
    if changed:
        raise BudgetloraError(
            f"study {study.study_name!r} was started with another {' and '.join(changed)}; "
            f"use another {option('output')} or {option('study_name')} for a new search"
        )


def sweep(
    base_cfg: RunConfig,
    space: dict[str, Any],
    *,
    n_trials: int = 20,
    output: str | Path,
    sampler: Literal["tpe", "grid"] = "tpe",
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    pruner: Literal["median", "none"] = "median",
    heartbeat: float = 60.0,
) -> SweepResult:
    """Search ``space`` around ``base_cfg`` until the study holds ``n_trials`` finished or pruned
    trials (a resumed study runs only what is missing), maximising the validation
    ``train.best_metric`` (minimising ``loss``); with ``base_cfg.distill.teacher`` set, every
    trial distils from it (and the space may search ``distill.alpha`` and ``distill.temperature``).
    Several workers (processes or machines) may run the same sweep on one
    ``storage``: together they run ``n_trials`` exactly.

    Args:
        base_cfg: the config every trial starts from
        space: search space (config key -> range or choices), as load_space reads it from YAML
        n_trials: trials in the study, pruned ones included
        output: sweep folder (study.db, trial-NNNN/, best.yaml; also trials.csv, trials.md, plots)
        sampler: optuna sampler
        storage: optuna storage URL (default sqlite:///DIR/study.db)
        study_name: study name in the storage (default: the name of DIR)
        seed: sampler seed
        pruner: median: weak trials stop early (median rule); none: every trial runs to the end
        heartbeat: a running trial records a beat this often, in seconds; one silent for 3 beats (its
            worker killed) is marked failed and run again by a worker of the study
    """
    _check_options(n_trials, seed, sampler)
    params = parse_space(space, teacher=base_cfg.distill.teacher is not None)
    if sampler == "grid":
        _grid(params)
    _check_before_writing(base_cfg, params)
    folder = SweepFolder(Path(output))
    storage = storage or f"sqlite:///{folder.study.resolve()}"
    study = _create_study(
        folder,
        storage,
        heartbeat,
        study_name=study_name or folder.path.resolve().name,
        direction="minimize" if lower_is_better(base_cfg.train.best_metric) else "maximize",
        sampler=_make_sampler(sampler, params, seed),
        pruner=optuna.pruners.MedianPruner() if pruner == "median" else optuna.pruners.NopPruner(),
    )
    _record_inputs(study, folder, base_cfg, space)
    search = _Search(base_cfg, params, folder, study, storage, _target(n_trials, sampler, params))
    missing = max(0, search.target - sum(t.state in _COUNTED for t in study.trials))
    mine = (
        _run_trials(study, search.objective, search.target, missing, search.after_trial, heartbeat)
        if missing
        else []
    )
    return search.finish(mine)


def _check_options(n_trials: int, seed: int, sampler: str) -> None:
    """Refuse, before the study is opened, a trial count, seed or sampler that cannot run."""
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise BudgetloraError(f"invalid value for {option('trials')}: {n_trials!r} (a positive integer)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise BudgetloraError(f"invalid value for {option('seed')}: {seed!r} (an integer in 0..2**32-1)")
    if sampler not in ("tpe", "grid"):
        raise BudgetloraError(f"{option('sampler')} {sampler!r}: allowed: tpe, grid")


def _record_inputs(
    study: optuna.Study, folder: SweepFolder, base_cfg: RunConfig, space: dict[str, Any]
) -> None:
    """Check that a study being resumed searched the same base config and space, then write
    both into the sweep folder (space.yaml, base.yaml)."""
    base = config_to_dict(replace(base_cfg, output="-", train=replace(base_cfg.train, progress=True)))
    _check_same_study(
        study, {"base config": base, "search space": json.loads(json.dumps(space, default=str))}
    )
    write_text_atomic(folder.space, yaml.safe_dump(space, sort_keys=False))
    save_config(replace(base_cfg, output=str(folder.best_run)), folder.base_config)


def _create_study(folder: SweepFolder, storage: str, heartbeat: float, **options: Any) -> optuna.Study:
    """The sweep's study (made, or loaded where it exists), in a sweep folder made if needed;
    a storage that cannot be opened leaves no empty folder behind."""
    out = folder.path
    check_output_path(out, option("output"), folder=True)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.create_study(storage=_open_storage(storage, heartbeat), load_if_exists=True, **options)
    except (ImportError, ValueError, SQLAlchemyError) as err:  # a URL optuna (on SQLAlchemy) cannot open
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty
        raise BudgetloraError(f"{option('storage')} {storage!r}: cannot open the study: {err}") from None


def _target(n_trials: int, sampler: str, params: Sequence[SearchParam]) -> int:
    """The trials the study is to hold: ``n_trials``, or fewer where a grid has fewer points."""
    if sampler != "grid":
        return n_trials
    size = 1
    for values in _grid(params).values():
        size *= len(values)
    return min(n_trials, size)


@dataclass
class _Search:
    """A sweep as it runs: what each trial and each table needs."""

    base_cfg: RunConfig
    params: list[SearchParam]
    folder: SweepFolder
    study: optuna.Study
    storage: str
    target: int

    @property
    def metric(self) -> str:
        return self.base_cfg.train.best_metric

    def objective(self, trial: optuna.Trial) -> float:
        """Train one trial (after checking its budget on the skeleton); its validation score."""
        _check_not_surplus(self.study, trial, self.target)
        trial.set_user_attr("worker", _WORKER)
        trial_cfg = self._trial_config(trial)
        prepared = _prepare_trial(trial, trial_cfg, time.perf_counter())
        trial.set_user_attr("trainable", prepared.budget.trainable)
        trial.set_user_attr("config", config_to_dict(prepared.cfg))
        metric = self.metric

        def on_eval(step: int, metrics: dict[str, Any]) -> bool:
            trial.report(metrics[metric], step)
            if trial.should_prune():
                note = f"pruned by the median rule at step {step} (validation {metric} {metrics[metric]:.4f})"
                trial.set_user_attr("note", note)
                raise optuna.TrialPruned(note)
            return False

        try:
            if prepared.cfg.distill.teacher is not None:  # the trial's own config says whether it distils
                from budgetlora.training.distill import distill

                result = distill(prepared, on_eval=on_eval).student
            else:
                result = train(prepared, on_eval=on_eval)
        except BudgetloraError as err:
            trial.set_user_attr("note", "error: " + str(err).splitlines()[0])
            raise
        if "test" in result.metrics:
            trial.set_user_attr("test_accuracy", result.metrics["test"]["accuracy"])
        trial.set_user_attr("validation_accuracy", result.metrics["validation"]["accuracy"])
        return float(result.metrics["validation"][metric])

    def _trial_config(self, trial: optuna.Trial) -> RunConfig:
        """The base config with the trial's values, its output in the trial's folder."""
        overrides = _suggest(trial, self.params)
        trial_dir = self.folder.trial(trial.number, self.study.study_name)
        try:
            return with_overrides(replace(self.base_cfg, output=str(trial_dir)), overrides)
        except ConfigError as err:
            # Each value passed alone (_check_before_writing); together these contradict each other.
            trial.set_user_attr("note", "contradicting options: " + "; ".join(err.problems))
            raise optuna.TrialPruned(str(err)) from None

    def after_trial(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        _write_tables(
            study,
            self.folder,
            self.params,
            self.metric,
            self.storage,
            self.base_cfg.distill.teacher,
            note=None,
        )

    def finish(self, mine: list[int]) -> SweepResult:
        """The plots, tables and ``best.yaml`` of the study as it stands, after this worker's trials (``mine``)."""
        study, folder, metric = self.study, self.folder, self.metric
        trials = _study_trials(study)
        ran = sum(t.state in _COUNTED and t.number in mine for t in trials)
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        failed = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("note")]
        if not completed and failed:
            raise BudgetloraError(
                f"no trial could run; the first: trial {failed[0].number}: {failed[0].user_attrs['note']}"
            )
        _plot_history(folder.history_plot, trials, metric)
        note = _plot_importances(folder.importances_plot, study)
        teacher = self.base_cfg.distill.teacher
        rows = _write_tables(study, folder, self.params, metric, self.storage, teacher, note=note)
        best_config = None
        best = max(completed, key=lambda t: as_score(metric, t.value or 0.0)) if completed else None
        if best is not None:
            best_config = replace(config_from_dict(best.user_attrs["config"]), output=str(folder.best_run))
            save_config(best_config, folder.best_config)
        return SweepResult(
            folder.path,
            study,
            best.value if best else None,
            best.number if best else None,
            best_config,
            rows,
            ran,
        )


def _prepare_trial(trial: optuna.Trial, cfg: RunConfig, start: float) -> PreparedRun:
    """The trial's data read and budget checked: an over-budget trial is pruned untrained."""
    try:
        return prepare_run(cfg)
    except OverBudgetError as err:
        reason = str(err).splitlines()[0]
        trial.set_user_attr("note", reason)
        trial.set_user_attr("check_seconds", time.perf_counter() - start)
        raise optuna.TrialPruned(reason) from None
    except BudgetloraError as err:
        trial.set_user_attr("note", "config error: " + str(err).splitlines()[0])
        raise


def _row(t: FrozenTrial, params: Sequence[SearchParam]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "trial": t.number,
        "state": t.state.name.lower(),
        "value": t.value,
        "test_accuracy": t.user_attrs.get("test_accuracy"),
        "trainable": t.user_attrs.get("trainable"),
        "seconds": round(t.duration.total_seconds(), 3) if t.duration else None,
    }
    for p in params:
        if p.kind != "fixed":
            row[p.key] = t.params.get(p.key)
    row["note"] = t.user_attrs.get("note", "")
    if "failed_trial" in t.system_attrs:  # optuna's RetryFailedTrialCallback
        row["note"] = f"trial {t.system_attrs['failed_trial']} again (its worker stopped); " + row["note"]
    elif t.state == TrialState.FAIL and not row["note"]:
        row["note"] = "its worker stopped (no heartbeat); run again"
    return row


def _sort_key(t: FrozenTrial, metric: str) -> tuple[int, float, int]:
    if t.state == TrialState.COMPLETE:
        return (0, -as_score(metric, t.value or 0.0), t.number)
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    return (1 if last is not None else 2, -as_score(metric, last or 0.0), t.number)


def _write_tables(
    study: optuna.Study,
    folder: SweepFolder,
    params: Sequence[SearchParam],
    metric: str,
    storage: str,
    teacher: str | None,
    note: str | None,
) -> list[dict[str, Any]]:
    """trials.csv and trials.md, best first (then pruned trials by their last score)."""
    trials = _study_trials(study)
    rows = [_row(t, params) for t in sorted(trials, key=lambda t: _sort_key(t, metric))]
    header = list(rows[0]) if rows else ["trial", "state", "value"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(folder.trials_csv) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.3g}"
        return "" if value is None else str(value).replace("|", "\\|")

    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    lines = [
        f"# Sweep {study.study_name}",
        "",
        f"Objective: validation {metric} ({'minimised' if lower_is_better(metric) else 'maximised'})."
        f" Storage: `{storage}`." + (f" Teacher: `{teacher}`." if teacher else ""),
        "Trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".",
        "",
    ]
    completed = [r for r in rows if r["state"] == "complete"]
    if completed:
        best_dir = folder.trial(completed[0]["trial"], study.study_name)
        lines += [
            f"Best: trial {completed[0]['trial']} (validation {metric} {cell(completed[0]['value'])}, "
            f"run folder `{best_dir}`). Re-run it: "
            f"`budgetlora {'distill' if teacher else 'train'} --config {folder.best_config}`.",
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(r[h]) for h in header) + " |" for r in rows]
    lines += ["", f"![optimization history]({folder.history_plot.name})", ""]
    if note is not None:
        lines += [note if note else f"![parameter importances]({folder.importances_plot.name})", ""]
    write_text_atomic(folder.trials_md, "\n".join(lines))
    return rows


# --- plots (matplotlib Figure objects: no pyplot state, no GUI backend) ---------------


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _plot_history(path: Path, trials: Sequence[FrozenTrial], metric: str) -> None:
    """Each trial's validation score, pruned trials' last score, and the best so far."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    values = [float(t.value or 0.0) for t in done]
    ax.scatter([t.number for t in done], values, color="#4c72b0", label="completed", zorder=3)
    if done:
        best = [max(values[: i + 1], key=lambda v: as_score(metric, v)) for i in range(len(done))]
        ax.step([t.number for t in done], best, where="post", color="#dd8452", label="best so far")
    cut = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    last = [t.intermediate_values[max(t.intermediate_values)] for t in cut]
    if cut:
        ax.scatter([t.number for t in cut], last, marker="x", color="grey", label="pruned (last score)")
    for i, t in enumerate(t for t in trials if t.state == TrialState.PRUNED and not t.intermediate_values):
        ax.axvline(
            t.number, color="#c44e52", alpha=0.3, lw=1, label="pruned before training" if i == 0 else None
        )
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Optimization history")
    if trials:
        ax.legend(loc="best", fontsize="small")
    _save(fig, path)


def _plot_importances(path: Path, study: optuna.Study) -> str:
    """Draw fANOVA parameter importances; returns '' when drawn, else a note saying why not."""
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    varying = sorted(
        k for k in {k for t in done for k in t.params} if len({repr(t.params.get(k)) for t in done}) > 1
    )
    if len(done) < 2 or not varying or len({t.value for t in done}) < 2:
        path.unlink(missing_ok=True)
        return (
            "Parameter importances: not drawn; they need at least 2 completed trials that differ "
            f"in parameters and in score ({len(done)} completed)."
        )
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying)
    except (RuntimeError, ValueError) as err:
        return f"Parameter importances: not drawn ({err})."
    names = list(importances)[::-1]
    fig = Figure(figsize=(7, 0.5 * len(names) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="#4c72b0")
    ax.set_xlabel("importance (fANOVA, share of variance)")
    ax.set_title(f"Parameter importances ({len(done)} completed trials)")
    _save(fig, path)
    return ""
