"""Every adapter method at the largest size that fits the same exact budget, side by side on AG News.

    python benchmarks/methods.py --model minilm --epochs 1                 # every method x budget
    python benchmarks/methods.py --model mpnet --epochs 1                  # needs benchmarks/fetch_mpnet.py
    python benchmarks/methods.py --model minilm --max-train-samples 800    # a quick, smaller run
    python benchmarks/methods.py --model minilm --table                    # the table of the results so far

Each (budget, method) is one real `budgetlora train` process on the quality benchmark's split of
../shared/data/ag_news/sample.csv (quality.make_split: 3,920 train / 560 validation / 1,120 test rows,
stratified, seed 42), with the same head (--head linear), targets (--target-modules all: every
projection of every layer), epochs, seed, learning rate and evaluations; the method's main size
knob is `auto` (the largest that fits the budget; see `budgetlora plan --methods`). The best
validation checkpoint is scored once on the test rows. Results go to
benchmarks/results/methods_<model>/<budget>-<method>[-lr<LR>].json as each run finishes (a run
already there is skipped unless --again; the suffix names a learning rate other than 2e-3, set per
method with --lr-for) and the table to benchmarks/results/methods_<model>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import RESULTS, SPLIT, make_split, model_folder, model_label, standard_error  # noqa: E402
from speed import REPO, hardware  # noqa: E402

METHODS = ("lora", "vera", "fourierft", "ia3", "loha", "lokr")
SIZE_FLAGS = {
    "lora": "--lora-r",
    "vera": "--vera-r",
    "fourierft": "--fourierft-n-frequency",
    "ia3": None,
    "loha": "--loha-r",
    "lokr": "--lokr-r",
}
SIZE_KEYS = {
    "lora": ("lora", "r"),
    "vera": ("vera", "r"),
    "fourierft": ("fourierft", "n_frequency"),
    "loha": ("loha", "r"),
    "lokr": ("lokr", "r"),
}
EVALS_PER_RUN = 2
DEFAULT_LR = 2e-3


def run_command(
    method: str, budget: int, lr: float, folder: Path, split: Path, run_dir: Path, args: argparse.Namespace
) -> list[str]:
    command = [sys.executable, "-m", "budgetlora", "train", "--model", str(folder), "--data", str(split)]
    command += ["--output", str(run_dir), "--method", method, "--head", "linear", "--target-modules", "all"]
    command += ["--budget", str(budget), "--epochs", f"{args.epochs:g}", "--seed", str(args.seed)]
    command += ["--lr", f"{lr:g}", "--no-progress"]
    flag = SIZE_FLAGS[method]
    if flag is not None:
        command += [flag, "auto"]
    rows = SPLIT["train"] * 4
    if args.max_train_samples:
        command += ["--max-train-samples", str(args.max_train_samples)]
        rows = min(rows, args.max_train_samples)
    steps = math.ceil(rows / 32) * args.epochs  # the default batch size, 32
    command += ["--eval-every", str(max(1, math.ceil(steps / EVALS_PER_RUN)))]
    return command


def run_name(budget: int, method: str, lr: float) -> str:
    """``1000000-vera``, or ``1000000-vera-lr0.01`` at a learning rate other than DEFAULT_LR."""
    return f"{budget}-{method}" + ("" if lr == DEFAULT_LR else f"-lr{lr:g}")


def result_path(results: Path, model: str, budget: int, method: str, lr: float) -> Path:
    return results / f"methods_{model_label(model)}" / f"{run_name(budget, method, lr)}.json"


def run_one(method: str, budget: int, lr: float, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    folder = model_folder(args.model)
    split = make_split(root)
    run_dir = root / "runs" / run_name(budget, method, lr)
    command = run_command(method, budget, lr, folder, split, run_dir, args)
    shown = shlex.join(["budgetlora", *command[3:]])
    shown = (
        shown.replace(str(folder), "MODEL").replace(str(split), "DATA").replace(str(root / "runs"), "RUNS")
    )
    print("+", shown, flush=True)
    out: dict[str, Any] = {
        "method": method,
        "budget": budget,
        "command": shown,
        "model": model_label(args.model),
    }
    out.update(epochs=args.epochs, seed=args.seed, lr=lr, max_train_samples=args.max_train_samples)
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    out["process_seconds"] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        lines = [
            line for line in proc.stderr.splitlines() if "error" in line.lower()
        ] or proc.stderr.splitlines()[-1:]
        out.update(status="refused" if proc.returncode == 2 else "failed", message=" ".join(lines)[:600])
        return out
    import yaml

    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    budget_record = json.loads((run_dir / "budget.json").read_text())
    block_knob = SIZE_KEYS.get(method)
    out.update(
        status="ok",
        size=None if block_knob is None else config["model"][block_knob[0]][block_knob[1]],
        trainable=metrics["budget"]["trainable"],
        frozen_not_counted=sum(budget_record.get("frozen_not_counted", {}).values()),
        test_accuracy=metrics["test"]["accuracy"],
        test_macro_f1=metrics["test"]["macro_f1"],
        test_rows=metrics["test"]["n"],
        validation_accuracy=metrics["validation"]["accuracy"],
        steps=metrics["steps"],
        train_seconds=metrics["timing"]["train_seconds"],
        train_samples_per_second=metrics["timing"]["train_samples_per_second"],
    )
    return out


def table(results_dir: Path, model: str, note: str) -> str:
    folder = results_dir / f"methods_{model_label(model)}"
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    order = {m: i for i, m in enumerate(METHODS)}
    results.sort(key=lambda r: (-r["budget"], -(r.get("test_accuracy") or -1), order[r["method"]]))
    lines = [
        f"# Adapter methods under one exact budget: {model_label(model)} on AG News",
        "",
        "Each row: one `budgetlora train` with `--head linear --target-modules all`, the method's size "
        "knob `auto` (the largest that fits), the same split, epochs and seed, and the learning rate "
        f"{DEFAULT_LR:g} unless the lr column says otherwise (`python benchmarks/methods.py`; commands below). Frozen: tensors the method adds but never "
        "trains (VeRA's shared random matrices), not counted against the budget.",
        "",
    ]
    if results:
        first = results[0]
        rows = first.get("max_train_samples") or SPLIT["train"] * 4
        lines += [
            f"Training rows: {rows:,}; epochs: {first['epochs']:g}; seed: {first['seed']}; "
            f"test rows: {first.get('test_rows', SPLIT['test'] * 4):,}.",
            f"Hardware: {first.get('hardware', '?')}.",
            *([f"Note: {note}"] if note else []),
            "",
        ]
    lines += [
        "| budget | method | lr | size | trainable | frozen (not counted) | test accuracy | macro-F1 | train samples/s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(
                f"| {r['budget']:,} | {r['method']} | {r['lr']:g} | {r['status']}: {r.get('message', '')[:80]} | | | | | |"
            )
            continue
        size = "-" if r["size"] is None else f"{r['size']:,}"
        se = standard_error(r["test_accuracy"], r["test_rows"])
        lines.append(
            f"| {r['budget']:,} | {r['method']} | {r['lr']:g} | {size} | {r['trainable']:,} | {r['frozen_not_counted']:,} "
            f"| {r['test_accuracy']:.2%} ± {se:.2%} | {r['test_macro_f1']:.4f} | {r['train_samples_per_second']:.1f} |"
        )
    lines += ["", "± is the binomial standard error of the accuracy on the test rows.", "", "Commands:", ""]
    lines += [f"    {r['command']}" for r in results]
    return "\n".join(lines) + "\n"


def _lr_for(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, float]:
    """``--lr-for METHOD=LR`` options as {method: lr}; a bad one is a usage error (exit 2)."""
    rates = {}
    for item in items:
        method, _, text = item.partition("=")
        try:
            rate = float(text)
        except ValueError:
            parser.error(f"--lr-for {item!r}: expected METHOD=LR, e.g. vera=1e-2")
        if method not in METHODS or not rate > 0:
            parser.error(f"--lr-for {item!r}: the method is one of {', '.join(METHODS)}, the rate > 0")
        rates[method] = rate
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="minilm", help="minilm, mpnet (see fetch_mpnet.py) or a model folder"
    )
    parser.add_argument(
        "--budgets", default="1000000,100000", help="comma-separated (default 1000000,100000)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all six)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help=f"the same for every method (default {DEFAULT_LR:g})"
    )
    parser.add_argument(
        "--lr-for",
        action="append",
        default=[],
        metavar="METHOD=LR",
        help="this learning rate for one method instead of --lr (repeatable), e.g. vera=1e-2",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--max-train-samples", type=int, help="fewer training rows (stratified), for a quick run"
    )
    parser.add_argument("--note", default="", help="a line for the table, e.g. what else shared the machine")
    parser.add_argument(
        "--work", type=Path, help="scratch folder for the split and runs (default: a temp dir)"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where results go (default: %(default)s)"
    )
    parser.add_argument("--again", action="store_true", help="re-run results already there")
    parser.add_argument("--table", action="store_true", help="only rebuild the table")
    args = parser.parse_args()
    lr_for = _lr_for(parser, args.lr_for)
    out_md = args.results / f"methods_{model_label(args.model)}.md"
    if not args.table:
        root = args.work or Path(tempfile.mkdtemp(prefix="budgetlora-methods-"))
        print("+", shlex.join([sys.executable, *sys.argv]))
        print(f"hardware: {hardware()}\nwork folder: {root}", flush=True)
        for budget in (int(b) for b in args.budgets.split(",")):
            for method in args.methods.split(","):
                lr = lr_for.get(method, args.lr)
                path = result_path(args.results, args.model, budget, method, lr)
                if path.is_file() and not args.again:
                    continue
                result = run_one(method, budget, lr, args, root)
                result["hardware"] = hardware()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=2) + "\n")
                print(json.dumps({k: v for k, v in result.items() if k != "command"}), flush=True)
                out_md.write_text(table(args.results, args.model, args.note))
    out_md.write_text(table(args.results, args.model, args.note))
    print(out_md.read_text())


if __name__ == "__main__":
    main()
