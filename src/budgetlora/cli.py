"""The command line: parse, then call the library function of the same name.

A command's options are made from the signature of the library function it calls (names,
types, defaults) and the ``Args:`` section of that function's docstring (the help), so each
default is written once, in the signature; ``_COMMANDS`` says which functions, and how a
parameter shows where its name alone does not (``--trials`` is ``n_trials``, ``OUT`` is
``output``). ``train`` and ``distill`` also get one flag per key of the config tree, made from
the tree itself (``--lr`` is ``train.lr``, booleans are ``--x/--no-x``, choices come from the
``Literal`` types, help from the fields' docstrings); ``--set KEY=VALUE`` takes a YAML value for
any key. User errors print one message and exit with code 2.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import importlib
import inspect
import json
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from budgetlora.config import (
    ADAPTER_METHODS,
    RunConfig,
    choices,
    config_fields,
    field_help,
    load_config,
    option_name,
    union_members,
    with_overrides,
)
from budgetlora.errors import BudgetloraError, name_options
from budgetlora.rundir import RunFolder, ShiftFolder, Submission, SweepFolder

__all__ = ["main", "build_parser", "flag_of"]

_GROUPS = {
    "": "run",
    "data": "data",
    "model": "model",
    **{f"model.{m.settings}": m.group_title for m in ADAPTER_METHODS.values() if m.settings},
    "train": "train",
    "distill": "distill",
    "augment": "augment (training-time augmentation)",
    "self_training": "self_training (with --unlabelled)",
    "tapt": "tapt (masked-LM steps before training; needs the checkpoint's MLM head)",
}


def flag_of(key: str) -> str:
    """The command-line flag of a config key: its option name with dashes (model.lora.r is --lora-r)."""
    return "--" + option_name(key).replace("_", "-")


_SEQUENCES = (tuple, list, collections.abc.Sequence)


def _flags(text: str) -> str:
    """Library text with each option it names (:func:`budgetlora.errors.option`) shown as its flag."""
    return name_options(text, flag_of, assign=" ")


def _value_type(annotation: Any) -> Any:
    """argparse's ``type`` for a field: text to the field's value, or ValueError (which
    argparse reports as "invalid <name> value")."""
    args = union_members(annotation)
    optional = type(None) in args
    words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
    (kind, *_) = [a for a in args if a is not type(None) and typing.get_origin(a) is not Literal] or [str]
    origin = typing.get_origin(kind)
    sequence = origin in _SEQUENCES
    item = typing.get_args(kind)[0] if sequence else kind
    parsers: dict[Any, Callable[[str], Any]] = {int: _integer, float: float}
    item_parse = parsers.get(item, str)

    def parse(text: str) -> Any:
        if text in words:
            return text
        if optional and text.lower() in ("none", "null"):
            return None
        if origin is dict:
            value = yaml.safe_load(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
        if sequence:
            try:
                return [item_parse(part.strip()) for part in text.split(",") if part.strip()]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {name} values like 0,1,5, got {text!r}") from None
        return item_parse(text)

    name = {int: "int", float: "float", str: "str"}.get(item, "str")
    parse.__name__ = (
        ("YAML mapping" if origin is dict else f"comma-separated {name}" if sequence else name)
        + "".join(f" or {w!r}" for w in words)
        + (" or none" if optional else "")
    )
    return parse


def _integer(text: str) -> int:
    """An integer, also written as 1e3."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise
        return int(value)


# --- options from a function's signature ------------------------------------------------------


@dataclass(frozen=True)
class _Shown:
    """How a parameter shows on the command line where its name alone does not say it."""

    name: str | None = None
    """``--flag`` for an option, ``METAVAR`` for a positional argument (default: the parameter's
    name, positional if it has no default)."""
    metavar: str | None = None
    given_as: Any = None
    """The type the command line gives where the function takes something made from it (a file's path)."""


@dataclass(frozen=True)
class _Source:
    """Parameters of a library function that become options of a command."""

    function: str
    """``module:name``, imported only when the command's parser is built."""
    names: tuple[str, ...] | None = None
    """The parameters taken, in the function's order (default: all of them)."""
    shown: Mapping[str, _Shown] = field(default_factory=dict)
    note: str = ""
    """Text put before each option's help."""


def _function(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_ENTRY = re.compile(r"^ {4}(\w+): (.*)$")


def _arg_docs(function: Any) -> dict[str, str]:
    """Parameter name -> its help: the ``Args:`` section of the docstring (``Attributes:`` of a dataclass)."""
    lines = iter((inspect.getdoc(function) or "").splitlines())
    for line in lines:
        if line.strip() in ("Args:", "Attributes:"):
            break
    docs: dict[str, str] = {}
    for line in lines:
        entry = _ENTRY.match(line)
        if entry:
            docs[entry.group(1)] = entry.group(2)
        elif line.startswith(" " * 8) and docs:
            docs[next(reversed(docs))] += " " + line.strip()
        else:
            break
    return docs


def _dataclass_of(annotation: Any) -> Any:
    """The dataclass a parameter takes, alone or None (``Limits | None`` -> ``Limits``); else None."""
    kinds = [a for a in union_members(annotation) if a is not type(None)]
    return kinds[0] if len(kinds) == 1 and dataclasses.is_dataclass(kinds[0]) else None


def _add_source(parser: argparse.ArgumentParser, source: _Source) -> None:
    """One argument per parameter of ``source``; a parameter that takes a dataclass gets one per field."""
    function = _function(source.function)
    docs, hints = _arg_docs(function), typing.get_type_hints(function)
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if source.names is not None and param.name not in source.names:
            continue
        nested = _dataclass_of(hints.get(param.name))
        if nested is not None:
            _add_source(parser, _Source(f"{nested.__module__}:{nested.__qualname__}", note=source.note))
            continue
        text = source.note + docs.get(param.name, "")
        shown = source.shown.get(param.name, _Shown())
        _add_parameter(parser, param, shown.given_as or hints.get(param.name, str), text, shown)


def _add_parameter(
    parser: argparse.ArgumentParser, param: inspect.Parameter, annotation: Any, text: str, shown: _Shown
) -> None:
    required = param.default is param.empty
    positional = required and param.kind is param.POSITIONAL_OR_KEYWORD
    name = shown.name or (param.name.upper() if positional else "--" + param.name.replace("_", "-"))
    if not name.startswith("--"):
        many = typing.get_origin(annotation) in _SEQUENCES
        parser.add_argument(param.name, metavar=name, nargs="+" if many else None, help=_escaped(text))
        return
    option: dict[str, Any] = {"dest": param.name, "help": _escaped(_with_default(text, param.default))}
    option.update({"required": True} if required else {"default": param.default})
    if isinstance(param.default, bool):
        option["action"] = argparse.BooleanOptionalAction if param.default else "store_true"
    elif choices(annotation):
        option["choices"] = choices(annotation)
    else:
        option.update(
            type=_value_type(annotation), metavar=shown.metavar or name[2:].replace("-", "_").upper()
        )
    parser.add_argument(name, **option)


def _with_default(text: str, default: Any) -> str:
    """The help of an option with its default shown, where one shows usefully."""
    if default is True:
        return f"{text} (default on)"
    if default is inspect.Parameter.empty or default is None or isinstance(default, bool):
        return text
    if isinstance(default, tuple | list):
        shown = ",".join(map(str, default))
    elif isinstance(default, float):
        shown = f"{default:g}"
    else:
        shown = f"{default:,}" if isinstance(default, int) and default >= 10_000 else str(default)
    return f"{text} (default {shown})"


def _escaped(text: str) -> str:
    return text.replace("%", "%%")


def _keywords(function: Any, args: argparse.Namespace, *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The keyword arguments of ``function`` that the command line holds; a dataclass parameter
    whose fields all have options is built from them."""
    given, hints = vars(args), typing.get_type_hints(function)
    keywords: dict[str, Any] = {}
    for name in inspect.signature(function).parameters:
        nested = _dataclass_of(hints.get(name))
        if name in skip:
            continue
        if name in given:
            keywords[name] = given[name]
        elif nested is not None and all(f.name in given for f in dataclasses.fields(nested)):
            keywords[name] = nested(**_keywords(nested, args))
    return keywords


# --- options from the config tree ------------------------------------------------------------


def _help(key: str) -> str:
    return _escaped(f"{field_help(key)} [{key}]")


def _add_config_option(parser: argparse._ActionsContainer, key: str, annotation: Any) -> None:
    """The flag of one config key. Only the options given reach the namespace (default SUPPRESS):
    the config file's value stays unless a flag names it, and `--max-steps none` can clear one."""
    flag, quiet, text = flag_of(key), argparse.SUPPRESS, _help(key)
    if annotation is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, dest=key, default=quiet, help=text)
    elif choices(annotation):
        parser.add_argument(flag, choices=choices(annotation), dest=key, default=quiet, help=text)
    else:
        metavar = key.rsplit(".", 1)[-1].upper()
        parser.add_argument(
            flag, type=_value_type(annotation), metavar=metavar, dest=key, default=quiet, help=text
        )


def _add_config_options(
    parser: argparse.ArgumentParser, keys: Callable[[str], bool], *, grouped: bool
) -> None:
    """A flag for each config key that ``keys`` takes, in groups by block (``train``, ``model.lora``, ...)."""
    groups = {
        block: parser.add_argument_group(f"config: {_flags(title)}") for block, title in _GROUPS.items()
    }
    for key, annotation in config_fields():
        if keys(key):
            _add_config_option(groups[key.rpartition(".")[0]] if grouped else parser, key, annotation)


def _set_options(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as config overrides (VALUE read as YAML)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise BudgetloraError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        try:
            overrides[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise BudgetloraError(f"--set {item!r}: the value is not valid YAML: {err}") from None
    return overrides


def _given_config_keys(
    args: argparse.Namespace, flags: Callable[[str], bool] | None = None
) -> dict[str, Any]:
    """The config keys the command line set: each key's own flag (of the keys ``flags`` takes;
    sweep's ``output`` is its folder, not the key), then ``--set``."""
    given = vars(args)
    overrides = {
        key: given[key] for key, _ in config_fields() if key in given and (flags is None or flags(key))
    }
    overrides.update(_set_options(args.set))
    return overrides


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The config file (or defaults) with the command-line options applied.

    With ``--resume`` and no ``--config``, the base is the run folder's own config.yaml.
    """
    run_config = RunFolder(Path(vars(args).get("output") or RunConfig().output)).config
    if args.config:
        cfg = load_config(args.config)
    elif getattr(args, "resume", False) and run_config.is_file():
        cfg = load_config(run_config)
    else:
        cfg = RunConfig()
    return with_overrides(cfg, _given_config_keys(args))


# --- the commands: call the library function, print --------------------------------------


def _print_config(cfg: RunConfig) -> int:
    from budgetlora.config import config_to_yaml

    print(config_to_yaml(cfg), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        return _print_config(cfg)
    from budgetlora.training.train import train

    result = train(cfg, overwrite=args.overwrite, resume=args.resume)
    if not _is_main_process():
        return 0
    split = "test" if "test" in result.metrics else "validation"
    print(
        f"\n{split} accuracy {result.metrics[split]['accuracy']:.4f}, macro-F1 {result.metrics[split]['macro_f1']:.4f}; "
        f"{result.metrics['timing']['train_samples_per_second']:.1f} train samples/s; run folder: {result.run_dir}"
    )
    return 0


def _is_main_process() -> bool:
    """False in the other processes of a torchrun / accelerate launch run."""
    from budgetlora.runtime import is_main_process  # here, not at the top: --help loads no torch

    return is_main_process()


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        return _print_config(cfg)
    from budgetlora.training.distill import distill

    result = distill(
        cfg, compare_baseline=args.compare_baseline, overwrite=args.overwrite, resume=args.resume
    )
    if not _is_main_process():
        return 0
    print()
    for name in ("teacher", "student", "baseline"):
        scores = result.summary[name]
        if scores is not None:
            shown = ", ".join(
                f"{s} accuracy {scores[s]['accuracy']:.4f}" for s in ("validation", "test") if s in scores
            )
            print(f"{name:<8} {shown}")
    print(f"run folder: {result.run_dir} (distill.json, report.md)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from budgetlora.inference.predict import evaluate

    metrics = evaluate(**_keywords(evaluate, args))
    if _is_main_process():
        print(
            f"{args.split}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, n={metrics['n']}"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from budgetlora.inference.predict import predict

    path = predict(**_keywords(predict, args))
    if _is_main_process():
        print(f"wrote {path} and {Submission(path).probs}")
    return 0


def cmd_shift(args: argparse.Namespace) -> int:
    from budgetlora.inference.shift import shift

    report = shift(**_keywords(shift, args))
    if _is_main_process():
        out = args.output or RunFolder(Path(args.run_dir)).shift_of(args.data)
        print("\n".join(report.lines()))
        print(f"wrote {ShiftFolder(Path(out)).report} (shift.json, shift_rows.csv, plots)")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from budgetlora.inference.predict import classify

    rows = classify(**_keywords(classify, args))
    for row in rows if _is_main_process() else []:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in row["probabilities"].items())
            print(f"{row['label']}\t{probs}\t{row['text'][:80]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from budgetlora.inference.export import export

    result = export(**_keywords(export, args))
    checks = ", ".join(
        f"{k.removesuffix('_max_logit_diff')} {v:.1e}" for k, v in result.info["checks"].items()
    )
    print(
        f"wrote {result.output} ({', '.join(result.info['formats'])}; largest logit difference to the run: {checks})"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from budgetlora.inference.serve import serve

    serve(**_keywords(serve, args))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from budgetlora.model.plan import format_plan, plan

    if args.by_method:
        return _plan_methods(args)
    rows = plan(**_keywords(plan, args))
    if args.style == "table":
        print(
            f"{args.model}, {args.labels} labels: the largest uniform LoRA rank that fits a budget of "
            f"{args.budget:,} trainable parameters (head included), by head, targets and layers\n"
        )
    print(_flags(format_plan(rows, args.style)))
    if args.style == "table":
        print(
            "\ntrain a row: budgetlora train --model MODEL --head H --target-modules T [--layers L] --lora-r R"
        )
    return 0


def _plan_methods(args: argparse.Namespace) -> int:
    from budgetlora.model.plan import format_method_plan, plan_methods

    rows = plan_methods(**_keywords(plan_methods, args))
    if args.style == "table":
        where = "all layers" if args.layers is None else "layers " + ",".join(map(str, args.layers))
        print(
            f"{args.model}, {args.labels} labels, --head {args.head}, --target-modules {','.join(args.targets)}, "
            f"{where}: each adapter method at the largest size that fits a budget of {args.budget:,} "
            "trainable parameters (head included)\n"
        )
    print(_flags(format_method_plan(rows, args.style)))
    if args.style == "table":
        print(
            "\ntrain a row, e.g.: budgetlora train " + _flags(next((r.options for r in rows if r.fits), ""))
        )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from budgetlora.training.sweep import load_space, sweep

    cfg = load_config(args.config) if args.config else RunConfig()
    cfg = with_overrides(cfg, _given_config_keys(args, _SWEEP_KEYS.__contains__))
    result = sweep(cfg, load_space(args.space), **_keywords(sweep, args, skip=("space",)))
    print(
        f"\n{result.ran} trial(s) run now, {len(result.rows)} in the study; table: {SweepFolder(result.output).trials_md}"
    )
    if result.best_config is not None:
        print(
            f"best: trial {result.best_trial}, validation {cfg.train.best_metric} {result.best_value:.4f}; "
            f"re-run: budgetlora {'distill' if result.best_config.distill.teacher else 'train'} "
            f"--config {SweepFolder(result.output).best_config}"
        )
    return 0


# --- the parser ---------------------------------------------------------------------------------

_Extra = tuple[tuple[str, ...], dict[str, Any]]
"""An option of the command line itself (no library parameter): its flags and add_argument's keywords."""

_SET: _Extra = (
    ("--set",),
    {
        "action": "append",
        "default": [],
        "metavar": "KEY=VALUE",
        "help": "Set a config key to a YAML value, e.g. --set model.lora.rank_pattern='{layer.11: 16}'",
    },
)
_PRINT_CONFIG: _Extra = (
    ("--print-config",),
    {"action": "store_true", "help": "Print the resolved config as YAML and exit"},
)
_BASE_CONFIG: _Extra = (
    ("--config",),
    {"metavar": "FILE", "help": "base config YAML (default: the built-in defaults)"},
)
_RUN_OPTIONS = _Source(
    "budgetlora.api:train", ("config", "overwrite", "resume"), {"config": _Shown(metavar="FILE")}
)
_SWEEP_KEYS = ("distill.teacher", "distill.alpha", "distill.temperature", "train.progress")


@dataclass(frozen=True)
class _Command:
    """A command: the function that runs it, its help, and where its options come from."""

    run: Callable[[argparse.Namespace], int]
    help: str
    description: str | None = None
    sources: tuple[_Source, ...] = ()
    extras: tuple[_Extra, ...] = ()
    config_keys: Callable[[str], bool] | None = None
    """The config keys that get a flag of their own."""
    extra: str | None = None
    """The package extra that the command's module needs."""


_COMMANDS: dict[str, _Command] = {
    "train": _Command(
        cmd_train,
        "train a LoRA adapter + head and write a run folder",
        "Train within the budget (checked before any work) and write a run folder: "
        "config.yaml, budget.json, adapter, tokenizer, history.jsonl, metrics.json, report.md and plots.",
        (_RUN_OPTIONS,),
        (_SET, _PRINT_CONFIG),
        lambda key: not key.startswith("distill."),
    ),
    "evaluate": _Command(
        cmd_evaluate,
        "metrics and report of a run on a labelled split",
        "Score a run on a labelled split and write RUN_DIR/eval-SPLIT/ (metrics.json, report.md, plots).",
        (_Source("budgetlora.inference.predict:evaluate"),),
    ),
    "predict": _Command(
        cmd_predict,
        "write an ID,Label submission CSV for unlabelled text",
        "Label every row of INPUT (CSV/TSV/JSONL/Parquet with a text column, a classic AG News CSV, "
        "or a pickled HF Dataset with --allow-pickle) and write ID,Label plus a .probs.csv beside it.",
        (_Source("budgetlora.inference.predict:predict", shown={"input_path": _Shown("INPUT")}),),
    ),
    "shift": _Command(
        cmd_shift,
        "how texts differ from a run's training rows, and the accuracy to expect on them",
        "Compare DATA (any input predict reads) with the run's training rows: lengths and "
        "truncation, repeated texts and texts shared with the training rows, a domain classifier "
        "(TF-IDF + logistic regression) that tells them apart, the model's class shares and confidences, "
        "and the accuracy to expect without labels (estimators fitted on the validation rows). Writes "
        "shift.md with plots, shift.json and shift_rows.csv.",
        (_Source("budgetlora.inference.shift:shift"),),
    ),
    "classify": _Command(
        cmd_classify,
        "label a few texts given on the command line",
        sources=(_Source("budgetlora.inference.predict:classify", shown={"texts": _Shown("TEXT")}),),
        extras=((("--json",), {"action": "store_true", "help": "one JSON object per line"}),),
    ),
    "export": _Command(
        cmd_export,
        "write a run as a merged transformers model (and/or an ONNX graph) with a model card",
        "Merge the run's LoRA adapter into the encoder (float32) and write OUT: with --format merged "
        "a save_pretrained folder that transformers.pipeline('text-classification', model=OUT) loads; with "
        "--format onnx model.onnx for onnxruntime; always the tokenizer, a model card (README.md) and "
        "export.json. Each form is checked against the run's logits before the folder appears.",
        (
            _Source(
                "budgetlora.inference.export:export",
                shown={"run_dir": _Shown("RUN"), "output": _Shown("OUT"), "formats": _Shown("--format")},
            ),
        ),
    ),
    "serve": _Command(
        cmd_serve,
        "an HTTP classifier (POST /classify) over an export or a run folder",
        "Serve PATH over HTTP: an export folder runs on onnxruntime, a run folder on torch. "
        'POST /classify {"texts": [...]} returns labels and probabilities; GET /health, GET /info. '
        "Requests arriving together share one length-sorted forward pass. Needs the serve extra (fastapi, uvicorn).",
        (_Source("budgetlora.inference.serve:serve"),),
        extra="serve",
    ),
    "plan": _Command(
        cmd_plan,
        "what fits a budget: head x targets x layers at the largest LoRA rank",
        "Count configurations on the model's weightless skeleton (only config.json is read: "
        "seconds, no weights) and print, for each head, target set and layers, the largest uniform "
        "LoRA rank that fits the budget, its exact trainable count and its share of the budget.",
        (
            _Source(
                "budgetlora.model.plan:plan",
                ("model", "budget", "labels"),
                {"model": _Shown("--model"), "budget": _Shown("--budget")},
            ),
            _Source("budgetlora.model.plan:format_plan", ("style",), {"style": _Shown("--format")}),
            _Source(
                "budgetlora.model.plan:plan_methods",
                ("head", "targets", "layers"),
                {"targets": _Shown("--target-modules")},
                note="with --methods: ",
            ),
        ),
        (
            (
                ("--methods",),
                {
                    "action": "store_true",
                    "dest": "by_method",  # not plan_methods' own `methods`
                    "help": "instead: every adapter method (lora, vera, fourierft, ia3, loha, lokr) at its "
                    "largest size that fits, on one head, target set and layers",
                },
            ),
        ),
    ),
    "distill": _Command(
        cmd_distill,
        "train a budgeted student on a teacher's soft labels",
        "Train a student (all train options; the budget is enforced) on (1 - alpha) * CE + "
        "alpha * T^2 * KL(teacher || student). The teacher's logits are computed once and cached. "
        "The teacher, alpha and T are config keys (distill.*): the run's config.yaml re-runs it. "
        "The run folder also gets distill.json and a Distillation section in report.md.",
        (_RUN_OPTIONS, _Source("budgetlora.api:distill", ("compare_baseline",))),
        (_SET, _PRINT_CONFIG),
        lambda key: True,
    ),
    "sweep": _Command(
        cmd_sweep,
        "budget-aware hyperparameter search (optuna)",
        "Search a YAML space around a base config with optuna. Over-budget trials are pruned before "
        "training; weak ones are pruned early (median rule). Writes trial folders, trials.csv/.md, best.yaml, plots. "
        "Start the same command several times on one --storage (PostgreSQL for several machines) to run the study "
        "with several workers: together they run --trials exactly.",
        (
            _Source(
                "budgetlora.training.sweep:sweep",
                ("space", "n_trials", "output", "sampler", "storage", "study_name", "seed", "heartbeat"),
                {
                    "space": _Shown("--space", "FILE", given_as=str),
                    "n_trials": _Shown("--trials"),
                    "output": _Shown("--output", "DIR"),
                    "storage": _Shown(metavar="URL"),
                    "heartbeat": _Shown(metavar="SECONDS"),
                },
            ),
        ),
        (_BASE_CONFIG, _SET),
        _SWEEP_KEYS.__contains__,
    ),
}


def _add_command(sub: Any, name: str, command: _Command, *, options: bool) -> None:
    """The command's sub-parser; with ``options``, its arguments too (importing the library functions they come from)."""
    parser = sub.add_parser(name, help=command.help, description=command.description)
    parser.set_defaults(func=command.run)
    if not options:
        return
    try:
        for source in command.sources:
            _add_source(parser, source)
    except ImportError as err:
        raise BudgetloraError(
            f"budgetlora {name} needs the {command.extra} extra ({err.name} is missing): "
            f"pip install 'budgetlora[{command.extra}]'"
        ) from err
    for flags, keywords in command.extras:
        parser.add_argument(*flags, **keywords)
    if command.config_keys is not None:
        _add_config_options(parser, command.config_keys, grouped=name in ("train", "distill"))


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; the options only of ``commands`` (default: of all of them)."""
    wanted = set(_COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="budgetlora",
        description="Fine-tune a pretrained encoder for text classification with LoRA under a hard budget of trainable parameters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in _COMMANDS.items():
        _add_command(sub, name, command, options=name in wanted)
    return parser


def _quiet_libraries() -> None:
    """transformers' load report lists the new head as 'missing' on every run: expected, so hidden."""
    from transformers.utils import logging as hf_logging

    # Raised inside peft's model wrapping on every build (transformers 5), nothing the user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    named = argv[:1] if argv[:1] and argv[0] in _COMMANDS else []  # only its options are built
    try:
        parser = build_parser(named)
    except BudgetloraError as err:
        print(f"budgetlora {named[0]}: error: {err}", file=sys.stderr)
        return err.exit_code
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args))
    except BudgetloraError as err:
        print(f"budgetlora {args.command}: error: {_flags(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"budgetlora {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if "budgetlora.runtime" in sys.modules:  # only a command that set up a runtime has processes to end
            sys.modules["budgetlora.runtime"].end_processes()


if __name__ == "__main__":
    sys.exit(main())
