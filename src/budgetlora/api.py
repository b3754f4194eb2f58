"""The Python API, read as the CLI reads: ``budgetlora.train(model=..., data=..., lora_r=8)``
takes one keyword per flag (``lora_r`` is ``--lora-r``, config key ``model.lora.r``), checked by
the same config tree with the same errors; results show themselves in Jupyter (the run's report
with its plots, the plan table, the shift report).

    import budgetlora
    run = budgetlora.train(model="roberta-base", data="fancyzhx/ag_news", lora_r=8, epochs=3, output="runs/qv")
    run                                   # the report, plots inline
    budgetlora.plan("roberta-base")       # a DataFrame
    budgetlora.predict(run, "test_unlabelled.pkl", allow_pickle=True)
"""

from __future__ import annotations

import base64
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from budgetlora.config import RunConfig, config_fields, load_config, option_name, with_overrides
from budgetlora.errors import BudgetloraError, name_options
from budgetlora.rundir import ReportFolder, RunFolder, ShiftFolder

__all__ = [
    "Run",
    "Page",
    "resolve_config",
    "train",
    "distill",
    "plan",
    "evaluate",
    "predict",
    "shift",
    "export",
]

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


@dataclass(frozen=True)
class Page:
    """A Markdown page on disk (a report), shown in Jupyter with its PNG plots inline."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def markdown(self) -> str:
        """The page, its plots embedded (data URIs) so that it shows wherever the notebook is."""
        text = self.path.read_text(encoding="utf-8")

        def embed(match: re.Match[str]) -> str:
            image = self.path.parent / match.group(2)
            if not image.is_file():
                return match.group(0)
            return (
                f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()})"
            )

        return _IMAGE.sub(embed, text)

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def __str__(self) -> str:
        return self.path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Run:
    """A finished run folder: its metrics, config and report (shown in Jupyter)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def metrics(self) -> dict[str, Any]:
        return RunFolder(self.path).read_metrics()

    @property
    def config(self) -> RunConfig:
        return load_config(RunFolder(self.path).config)

    @property
    def report(self) -> Page:
        return Page(RunFolder(self.path).report)

    def _repr_markdown_(self) -> str:
        return self.report.markdown()

    def __fspath__(self) -> str:
        return str(self.path)


def resolve_config(config: str | Path | RunConfig | None = None, **options: Any) -> RunConfig:
    """The config that ``train(config, **options)`` would run: a YAML file (a preset, a run's
    config.yaml) or a RunConfig or the defaults, with one keyword per flag applied."""
    base = config if isinstance(config, RunConfig) else load_config(config) if config else RunConfig()
    keys = {option_name(key): key for key, _ in config_fields()}
    unknown = [name for name in options if name not in keys]
    if unknown:
        hints = [
            f"{n!r} (did you mean {', '.join(difflib.get_close_matches(n, keys, 3)) or '?'})" for n in unknown
        ]
        raise BudgetloraError(
            f"unknown option {', '.join(hints)}: each option is a config key's name "
            "(budgetlora.config.option_name), e.g. lora_r=8 sets model.lora.r"
        )
    values = {keys[name]: list(v) if isinstance(v, tuple) else v for name, v in options.items()}
    return with_overrides(base, values)


def train(
    config: str | Path | RunConfig | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    **options: Any,
) -> Run:
    """``budgetlora train``: train within the budget and write the run folder (``output``).

    Args:
        config: YAML config (a preset, or a run folder's config.yaml; from Python also a RunConfig);
            the options override it
        overwrite: replace a finished run in the output folder (only once the new run finishes)
        resume: continue the interrupted run in the output folder from its last checkpoint (its
            config.yaml is the base config)
        options: one per flag of ``budgetlora train``, the flag without its dashes (``lora_r=8``)
    """
    from budgetlora.training.train import train as run_training

    return Run(run_training(resolve_config(config, **options), overwrite=overwrite, resume=resume).run_dir)


def distill(
    config: str | Path | RunConfig | None = None,
    *,
    compare_baseline: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    **options: Any,
) -> Run:
    """``budgetlora distill``: a budgeted student taught by ``teacher`` (a keyword, as --teacher);
    ``config``, ``overwrite`` and ``resume`` as :func:`train` takes them.

    Args:
        compare_baseline: also train the same student without distillation into OUTPUT-baseline
        options: one per flag of ``budgetlora distill``, the flag without its dashes (``teacher=...``)
    """
    from budgetlora.training.distill import distill as run_distillation

    cfg = resolve_config(config, **options)
    result = run_distillation(cfg, compare_baseline=compare_baseline, overwrite=overwrite, resume=resume)
    return Run(result.run_dir)


def plan(model: str, budget: int = RunConfig.budget, **options: Any) -> Any:
    """``budgetlora plan``: what fits ``budget`` (default: the config's) on ``model``, as a pandas
    DataFrame (one row a head × targets × layers, with the largest LoRA rank that fits and its
    exact count; ``options``: the keywords that train it, as
    ``head=default target_modules=query,value lora_r=11``); keywords as
    :func:`budgetlora.model.plan.plan` takes them (``labels``)."""
    import pandas as pd

    from budgetlora.model.plan import format_plan
    from budgetlora.model.plan import plan as plan_rows

    return pd.DataFrame(
        json.loads(name_options(format_plan(plan_rows(model, budget, **options), "json"), option_name))
    )


def evaluate(run: str | Path | Run, **options: Any) -> Page:
    """``budgetlora evaluate``: metrics on a labelled split or file (``split``, ``data``,
    ``output``, ``model``, ``batch_size``); returns the report it wrote (``.path``'s folder
    also holds metrics.json)."""
    from budgetlora.inference.predict import evaluate as run_evaluation

    run_dir = Path(run)
    output = Path(options.pop("output", None) or RunFolder(run_dir).evaluation(options.get("split", "test")))
    run_evaluation(run_dir, output=output, **options)
    return Page(ReportFolder(output).report)


def predict(run: str | Path | Run, data: str | Path, **options: Any) -> Any:
    """``budgetlora predict``: writes the submission (``output``, default submission.csv) and
    returns it as a pandas DataFrame (ID, Label); its path is in ``.attrs["path"]``."""
    import pandas as pd

    from budgetlora.inference.predict import predict as run_prediction

    path = run_prediction(Path(run), data, **options)
    frame = pd.read_csv(path)
    frame.attrs["path"] = str(path)
    return frame


def shift(run: str | Path | Run, data: str | Path, **options: Any) -> Page:
    """``budgetlora shift``: how ``data`` differs from the run's training rows and the accuracy
    to expect on it; returns the report (default folder RUN/shift-<name of data>)."""
    from budgetlora.inference.shift import shift as run_shift

    output = Path(options.pop("output", None) or RunFolder(Path(run)).shift_of(data))
    run_shift(Path(run), data, output=output, **options)
    return Page(ShiftFolder(output).report)


def export(run: str | Path | Run, out: str | Path, **options: Any) -> Path:
    """``budgetlora export``: a merged transformers model and/or ONNX (``formats``: merged, onnx,
    or all), checked against the run; ``options`` as :func:`budgetlora.inference.export.export`
    takes them. Returns the export folder."""
    from budgetlora.inference.export import export as run_export

    return run_export(Path(run), out, **options).output
