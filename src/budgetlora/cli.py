"""The command line: parse, then call the library function of the same name.

``train`` and ``distill`` get one flag per key of the config tree, made from the tree
itself (``--lr`` is ``train.lr``, booleans are ``--x/--no-x``, choices come from the
``Literal`` types, help from the fields' docstrings); ``--set KEY=VALUE`` takes a YAML
value for any key. User errors print one message and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from budgetlora.config import (
    RunConfig,
    choices,
    config_fields,
    field_help,
    load_config,
    option_name,
    union_members,
    with_overrides,
)
from budgetlora.errors import BudgetloraError
from budgetlora.rundir import RunFolder, ShiftFolder, Submission, SweepFolder

__all__ = ["main", "build_parser", "flag_of"]

_GROUPS = {
    "": "run",
    "data": "data",
    "model": "model",
    "model.lora": "model.lora (target_modules and layers serve every method)",
    "model.vera": "model.vera (--method vera)",
    "model.fourierft": "model.fourierft (--method fourierft)",
    "model.loha": "model.loha (--method loha)",
    "model.lokr": "model.lokr (--method lokr)",
    "train": "train",
    "distill": "distill",
    "augment": "augment (training-time augmentation)",
    "self_training": "self_training (with --unlabelled)",
    "tapt": "tapt (masked-LM steps before training; needs the checkpoint's MLM head)",
}


def flag_of(key: str) -> str:
    """The command-line flag of a config key: its option name with dashes (model.lora.r is --lora-r)."""
    return "--" + option_name(key).replace("_", "-")


def _value_type(annotation: Any) -> Any:
    """argparse's ``type`` for a field: text to the field's value, or ValueError (which
    argparse reports as "invalid <name> value")."""
    args = union_members(annotation)
    optional = type(None) in args
    words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
    (kind, *_) = [a for a in args if a is not type(None) and typing.get_origin(a) is not Literal] or [str]
    origin = typing.get_origin(kind)
    item = typing.get_args(kind)[0] if origin is tuple else kind
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
        if origin is tuple:
            try:
                return [item_parse(part.strip()) for part in text.split(",") if part.strip()]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {name} values like 0,1,5, got {text!r}") from None
        return item_parse(text)

    name = {int: "int", float: "float", str: "str"}.get(item, "str")
    parse.__name__ = (
        ("YAML mapping" if origin is dict else f"comma-separated {name}" if origin is tuple else name)
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


def _help(key: str) -> str:
    return f"{field_help(key)} [{key}]".replace("%", "%%")


def _add_train_options(parser: argparse.ArgumentParser, *, distill: bool = False) -> None:
    """The options of ``train`` (and, with ``distill``, of ``distill``: the distill.* keys too)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config (a preset, or a run folder's config.yaml); options below override it",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Set a config key to a YAML value, e.g. --set model.lora.rank_pattern='{layer.11: 16}'",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a finished run in --output (only once the new run finishes)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue the interrupted run in --output from its last checkpoint (its config.yaml is the base config)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="Print the resolved config as YAML and exit"
    )
    groups = {block: parser.add_argument_group(f"config: {title}") for block, title in _GROUPS.items()}
    for key, annotation in config_fields():
        if key.startswith("distill.") and not distill:
            continue
        group = groups[key.rpartition(".")[0]]
        # Only the options given reach the namespace (default SUPPRESS): the config file's
        # value stays unless a flag names it, and `--max-steps none` can clear one.
        flag, quiet, text = flag_of(key), argparse.SUPPRESS, _help(key)
        if annotation is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, dest=key, default=quiet, help=text
            )
        elif choices(annotation):
            group.add_argument(flag, choices=choices(annotation), dest=key, default=quiet, help=text)
        else:
            metavar = key.rsplit(".", 1)[-1].upper()
            group.add_argument(
                flag, type=_value_type(annotation), metavar=metavar, dest=key, default=quiet, help=text
            )


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
    given = vars(args)
    overrides = {key: given[key] for key, _ in config_fields() if key in given}
    overrides.update(_set_options(args.set))
    return with_overrides(cfg, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from budgetlora.config import config_to_yaml

    cfg = config_from_args(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
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
    return os.environ.get("RANK", "0") == "0"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from budgetlora.inference.predict import evaluate

    metrics = evaluate(
        args.run_dir,
        data=args.data,
        split=args.split,
        output=args.output,
        model=args.model,
        batch_size=args.batch_size,
    )
    if not _is_main_process():
        return 0
    print(
        f"{args.split}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, n={metrics['n']}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from budgetlora.inference.predict import predict

    path = predict(
        args.run_dir,
        args.input,
        output=args.output,
        text_column=args.text_column,
        allow_pickle=args.allow_pickle,
        model=args.model,
        batch_size=args.batch_size,
        shift=args.shift,
        prior_correction=args.prior_correction,
    )
    if _is_main_process():
        print(f"wrote {path} and {Submission(path).probs}")
    return 0


def cmd_shift(args: argparse.Namespace) -> int:
    from budgetlora.inference.shift import shift

    report = shift(
        args.run_dir,
        args.data,
        output=args.output,
        text_column=args.text_column,
        allow_pickle=args.allow_pickle,
        model=args.model,
        batch_size=args.batch_size,
    )
    if _is_main_process():
        out = args.output or RunFolder(Path(args.run_dir)).shift_of(args.data)
        print("\n".join(report.lines()))
        print(f"wrote {ShiftFolder(Path(out)).report} (shift.json, shift_rows.csv, plots)")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from budgetlora.inference.predict import classify

    rows = classify(args.run_dir, args.texts, model=args.model, batch_size=args.batch_size)
    for row in rows if _is_main_process() else []:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in row["probabilities"].items())
            print(f"{row['label']}\t{probs}\t{row['text'][:80]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from budgetlora.inference.export import FORMATS, export

    formats = FORMATS if args.format == "all" else tuple(f.strip() for f in args.format.split(","))
    result = export(args.run_dir, args.out, formats=formats, model=args.model, overwrite=args.overwrite)
    checks = ", ".join(
        f"{k.removesuffix('_max_logit_diff')} {v:.1e}" for k, v in result.info["checks"].items()
    )
    print(
        f"wrote {result.output} ({', '.join(result.info['formats'])}; largest logit difference to the run: {checks})"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from budgetlora.inference.serve import serve
    except ImportError as err:
        raise BudgetloraError(
            f"budgetlora serve needs the serve extra ({err.name} is missing): pip install 'budgetlora[serve]'"
        ) from err
    serve(
        args.path,
        host=args.host,
        port=args.port,
        max_texts=args.max_texts,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue,
        max_connections=args.max_connections,
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from budgetlora.model.plan import format_plan, plan

    if args.methods:
        return _plan_methods(args)
    rows = plan(args.model, args.budget, args.labels)
    if args.format == "table":
        print(
            f"{args.model}, {args.labels} labels: the largest uniform LoRA rank that fits a budget of "
            f"{args.budget:,} trainable parameters (head included), by head, targets and layers\n"
        )
    print(format_plan(rows, args.format))
    if args.format == "table":
        print(
            "\ntrain a row: budgetlora train --model MODEL --head H --target-modules T [--layers L] --lora-r R"
        )
    return 0


def _plan_methods(args: argparse.Namespace) -> int:
    from budgetlora.model.plan import format_method_plan, plan_methods

    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    try:
        layers = None if args.layers is None else tuple(int(x) for x in args.layers.split(",") if x.strip())
    except ValueError as err:
        raise BudgetloraError(f"--layers {args.layers!r}: expected integers like 0,1,5") from err
    rows = plan_methods(args.model, args.budget, args.labels, head=args.head, targets=targets, layers=layers)
    if args.format == "table":
        where = f"layers {args.layers}" if layers is not None else "all layers"
        print(
            f"{args.model}, {args.labels} labels, --head {args.head}, --target-modules {','.join(targets)}, "
            f"{where}: each adapter method at the largest size that fits a budget of {args.budget:,} "
            "trainable parameters (head included)\n"
        )
    print(format_method_plan(rows, args.format))
    if args.format == "table":
        print("\ntrain a row, e.g.: budgetlora train " + next((r.options for r in rows if r.fits), ""))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from budgetlora.config import config_to_yaml
    from budgetlora.training.distill import distill

    cfg = config_from_args(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    result = distill(
        cfg, compare_baseline=args.compare_baseline, overwrite=args.overwrite, resume=args.resume
    )
    summary = result.summary
    if not _is_main_process():
        return 0
    print()
    for name in ("teacher", "student", "baseline"):
        scores = summary[name]
        if scores is not None:
            shown = ", ".join(
                f"{s} accuracy {scores[s]['accuracy']:.4f}" for s in ("validation", "test") if s in scores
            )
            print(f"{name:<8} {shown}")
    print(f"run folder: {result.run_dir} (distill.json, report.md)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from budgetlora.training.sweep import load_space, sweep

    cfg = load_config(args.config) if args.config else RunConfig()
    overrides = {
        f"distill.{name}": value
        for name in ("teacher", "alpha", "temperature")
        if (value := getattr(args, name)) is not None
    }
    overrides.update(_set_options(args.set))
    if args.no_progress:
        overrides["train.progress"] = False
    result = sweep(
        with_overrides(cfg, overrides),
        load_space(args.space),
        n_trials=args.trials,
        output=args.output,
        sampler=args.sampler,
        storage=args.storage,
        study_name=args.study_name,
        seed=args.seed,
        heartbeat=args.heartbeat,
    )
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


def _add_inference_common(parser: argparse.ArgumentParser, *, export: bool = False) -> None:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a finished run folder (from budgetlora train)"
        + (
            ", or an export folder with model.onnx (budgetlora export --format onnx): onnxruntime"
            if export
            else ""
        ),
    )
    parser.add_argument("--model", help="base model folder or Hub id, if not the one recorded in the run")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per inference batch (default 256 on a GPU, 16 on a CPU)",
    )


def _add_text_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-column", default="text", help="text column name (default text)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a pickled input (unpickling runs code: trusted files only)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="budgetlora",
        description="Fine-tune a pretrained encoder for text classification with LoRA under a hard budget of trainable parameters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a LoRA adapter + head and write a run folder",
        description="Train within the budget (checked before any work) and write a run folder: "
        "config.yaml, budget.json, adapter, tokenizer, history.jsonl, metrics.json, report.md and plots.",
    )
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="metrics and report of a run on a labelled split",
        description="Score a run on a labelled split and write RUN_DIR/eval-SPLIT/ (metrics.json, report.md, plots).",
    )
    _add_inference_common(p)
    p.add_argument("--data", help="data source (default: the run's own)")
    p.add_argument(
        "--split",
        default="test",
        help="train, validation or test (default test); a --data file is scored whole",
    )
    p.add_argument("--output", help="output folder (default RUN_DIR/eval-SPLIT, or RUN_DIR/eval-FILESTEM)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="write an ID,Label submission CSV for unlabelled text",
        description="Label every row of INPUT (CSV/TSV/JSONL/Parquet with a text column, a classic AG News CSV, "
        "or a pickled HF Dataset with --allow-pickle) and write ID,Label plus a .probs.csv beside it.",
    )
    _add_inference_common(p, export=True)
    p.add_argument("input", metavar="INPUT", help="file of texts to label")
    p.add_argument("--output", default="submission.csv", help="submission path (default submission.csv)")
    _add_text_input_options(p)
    p.add_argument(
        "--shift",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also print the shift report's summary and write it whole to <output>.shift.json "
        "(default on; a run folder only)",
    )
    p.add_argument(
        "--prior-correction",
        choices=("none", "em"),
        default="none",
        help="em: label the rows under the class shares that EM re-estimates on them (calibrated on the "
        "run's validation rows; for a test set whose classes are not balanced as the training rows are). "
        "Default none",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "shift",
        help="how texts differ from a run's training rows, and the accuracy to expect on them",
        description="Compare DATA (any input predict reads) with the run's training rows: lengths and "
        "truncation, repeated texts and texts shared with the training rows, a domain classifier "
        "(TF-IDF + logistic regression) that tells them apart, the model's class shares and confidences, "
        "and the accuracy to expect without labels (estimators fitted on the validation rows). Writes "
        "shift.md with plots, shift.json and shift_rows.csv.",
    )
    _add_inference_common(p)
    p.add_argument("data", metavar="DATA", help="file of texts (as predict's INPUT)")
    p.add_argument("--output", help="output folder (default RUN_DIR/shift-<DATA's name>)")
    _add_text_input_options(p)
    p.set_defaults(func=cmd_shift)

    p = sub.add_parser("classify", help="label a few texts given on the command line")
    _add_inference_common(p, export=True)
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser(
        "export",
        help="write a run as a merged transformers model (and/or an ONNX graph) with a model card",
        description="Merge the run's LoRA adapter into the encoder (float32) and write OUT: with --format merged "
        "a save_pretrained folder that transformers.pipeline('text-classification', model=OUT) loads; with "
        "--format onnx model.onnx for onnxruntime; always the tokenizer, a model card (README.md) and "
        "export.json. Each form is checked against the run's logits before the folder appears.",
    )
    p.add_argument("run_dir", metavar="RUN", help="a finished run folder (from budgetlora train)")
    p.add_argument("out", metavar="OUT", help="export folder to write")
    p.add_argument(
        "--format",
        default="merged",
        help="merged (default), onnx, or all (both; also merged,onnx)",
    )
    p.add_argument("--model", help="base model folder or Hub id, if not the one recorded in the run")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing export (once the new one is complete)"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "serve",
        help="an HTTP classifier (POST /classify) over an export or a run folder",
        description="Serve PATH over HTTP: an export folder runs on onnxruntime, a run folder on torch. "
        'POST /classify {"texts": [...]} returns labels and probabilities; GET /health, GET /info. '
        "Requests arriving together share one length-sorted forward pass. Needs the serve extra (fastapi, uvicorn).",
    )
    p.add_argument("path", metavar="PATH", help="an export folder (budgetlora export) or a run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-texts", type=int, default=256, help="most texts one request may send (default 256)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="most texts of waiting requests scored in one forward pass (default 32)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more requests after the first (default 5 ms)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1_000_000, help="largest request body (default 1,000,000 bytes)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=2048,
        help="most texts waiting to be scored; a request past it gets 503 with Retry-After (default 2048)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="most open connections; past it new ones get 503 at once (default 512)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "plan",
        help="what fits a budget: head x targets x layers at the largest LoRA rank",
        description="Count configurations on the model's weightless skeleton (only config.json is read: "
        "seconds, no weights) and print, for each head, target set and layers, the largest uniform "
        "LoRA rank that fits the budget, its exact trainable count and its share of the budget.",
    )
    p.add_argument("--model", required=True, help="Hub model id or a local folder (config.json is enough)")
    p.add_argument(
        "--budget", type=int, required=True, help="hard cap on trainable parameters, head included"
    )
    p.add_argument("--labels", type=int, default=4, help="number of classes (default 4)")
    p.add_argument(
        "--format",
        choices=("table", "markdown", "csv", "json"),
        default="table",
        help="output format (default table)",
    )
    p.add_argument(
        "--methods",
        action="store_true",
        help="instead: every adapter method (lora, vera, fourierft, ia3, loha, lokr) at its largest size "
        "that fits, on one head, target set and layers",
    )
    p.add_argument("--head", default="linear", help="with --methods: the head (default linear)")
    p.add_argument(
        "--target-modules", default="all", help="with --methods: role or module names (default all)"
    )
    p.add_argument("--layers", default=None, help="with --methods: layers, e.g. 6,7,8 (default all)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "distill",
        help="train a budgeted student on a teacher's soft labels",
        description="Train a student (all train options; the budget is enforced) on (1 - alpha) * CE + "
        "alpha * T^2 * KL(teacher || student). The teacher's logits are computed once and cached. "
        "The teacher, alpha and T are config keys (distill.*): the run's config.yaml re-runs it. "
        "The run folder also gets distill.json and a Distillation section in report.md.",
    )
    _add_train_options(p, distill=True)
    p.add_argument(
        "--compare-baseline",
        action="store_true",
        help="also train the same student without distillation into OUTPUT-baseline",
    )
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "sweep",
        help="budget-aware hyperparameter search (optuna)",
        description="Search a YAML space around a base config with optuna. Over-budget trials are pruned before "
        "training; weak ones are pruned early (median rule). Writes trial folders, trials.csv/.md, best.yaml, plots. "
        "Start the same command several times on one --storage (PostgreSQL for several machines) to run the study "
        "with several workers: together they run --trials exactly.",
    )
    p.add_argument("--config", metavar="FILE", help="base config YAML (default: the built-in defaults)")
    p.add_argument(
        "--space", required=True, metavar="FILE", help="search space YAML (config key -> range or choices)"
    )
    p.add_argument(
        "--trials", type=int, default=20, help="trials in the study, pruned ones included (default 20)"
    )
    p.add_argument(
        "--output", required=True, metavar="DIR", help="sweep folder (study.db, trial-NNNN/, best.yaml)"
    )
    p.add_argument("--sampler", default="tpe", choices=["tpe", "grid"], help="optuna sampler (default tpe)")
    p.add_argument("--storage", metavar="URL", help="optuna storage URL (default sqlite:///DIR/study.db)")
    p.add_argument("--study-name", help="study name in the storage (default: the name of DIR)")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a running trial records a beat this often; one silent for 3 beats (its worker killed) is marked "
        "failed and run again by a worker of the study (default 60)",
    )
    p.add_argument(
        "--teacher", metavar="PATH_OR_ID", help="distil every trial from this teacher [distill.teacher]"
    )
    p.add_argument(
        "--alpha", type=float, help="distillation alpha unless searched (default 0.5) [distill.alpha]"
    )
    p.add_argument(
        "--temperature", type=float, help="distillation T unless searched (default 2.0) [distill.temperature]"
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set a base config key")
    p.add_argument("--no-progress", action="store_true", help="No progress bars (logs only).")
    p.set_defaults(func=cmd_sweep)

    return parser


def _quiet_libraries() -> None:
    """transformers' load report lists the new head as 'missing' on every run: expected, so hidden."""
    from transformers.utils import logging as hf_logging

    # Raised inside peft's model wrapping on every build (transformers 5), nothing the user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args))
    except BudgetloraError as err:
        print(f"budgetlora {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"budgetlora {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if "budgetlora.runtime" in sys.modules:  # only a command that set up a runtime has processes to end
            sys.modules["budgetlora.runtime"].end_processes()


if __name__ == "__main__":
    sys.exit(main())
