"""budgetlora's default recipe as a user runs it, scored on rows it never trained on: K-fold
cross-validation over all of ../shared/data/ag_news/sample.csv.

    python benchmarks/heldout.py --model minilm                 # 5 folds, one after the other
    python benchmarks/heldout.py --model minilm --fold 0        # one fold (the rest resume later)
    python benchmarks/heldout.py --model minilm --name epochs1 --flag=--epochs --flag=1   # a variant
    python benchmarks/heldout.py --model minilm --folds 2 --name defaults-2folds   # train on half the rows
    python benchmarks/heldout.py --model minilm --table         # the table of the folds so far

The 5,600 rows (1,400 per class) are cut into K stratified folds (seed 42). Fold i's run is
`budgetlora train --model MODEL --data FOLD_i --output RUNS/<name>-fold<i> --no-progress` and nothing
else (plus any --flag): budgetlora's defaults decide the epochs, learning rate, adapter, head, the validation
rows it holds out of train (data.validation_size) and the checkpoint it keeps. FOLD_i is a folder in
the release's own format: train.csv (the other K-1 folds), test.csv (fold i) and classes.txt. The
kept checkpoint is scored once on fold i. Every row is held out exactly once, so the pooled accuracy
is over all 5,600 rows (binomial SE about 0.37 points at 92%), and each run trains on
(K-1)/K of them: 4,256 training rows at K = 5, after the defaults hold 5% out for validation.
At K = 5 the last fold is exactly the 1,120 test rows of benchmarks/quality.py (the same seeded
permutation of each class), so the two benchmarks meet on those rows.

Each fold's result goes to benchmarks/results/heldout_<model>/<name>-fold<i>.json as soon as it
finishes (a fold already there is skipped unless --again); the table (benchmarks/results/
heldout_<model>.md) is rebuilt from every result there. Each result keeps the run's label for every
held-out row (`budgetlora predict` on the kept run; a result from before that gets them when its fold
is asked for again and the run is still in the workdir), so that the table compares each variant
with the defaults on the same rows, and the defaults with another encoder's (every other
heldout_<model> folder) on the folds both ran: the difference, the rows only one of the two gets
right, and the exact McNemar p-value over them. The defaults are compared so with a bag of words
too (TF-IDF + logistic regression, trained in seconds on the same folds). Once three variants within
the budget have held out every row, the table adds their majority vote on each row: an ensemble at
several times the budget, a bound on what choosing among these recipes can reach.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_mpnet import default_cache  # noqa: E402
from quality import (  # noqa: E402
    RESULTS,
    SAMPLE,
    add_predictions,
    class_orders,
    label_of,
    mcnemar,
    model_folder,
    model_label,
    resolved_run_config,
    standard_error,
    test_predictions,
    write_release_folder,
)
from speed import REPO, hardware  # noqa: E402


def folds(k: int) -> tuple[list[str], list[list[int]]]:
    """The release's lines and, for each of k stratified folds, its line numbers in file order."""
    lines, orders = class_orders()
    parts: list[list[int]] = [[] for _ in range(k)]
    for rows in orders:
        for i, chunk in enumerate(np.array_split(rows, k)):
            parts[i].extend(chunk.tolist())
    return lines, [sorted(part) for part in parts]


def make_fold(root: Path, k: int, i: int) -> Path:
    """Fold i of k as a data folder: train.csv (the other folds), test.csv (fold i), classes.txt."""
    folder = root / f"folds{k}" / f"fold{i}"
    if (folder / "test.csv").is_file():
        return folder
    lines, parts = folds(k)
    train = sorted(row for j, part in enumerate(parts) if j != i for row in part)
    return write_release_folder(folder, lines, {"train": train, "test": parts[i]})


def fold_labels(k: int, i: int) -> list[int]:
    """The class index of every row of fold i's test.csv, in its order."""
    lines, parts = folds(k)
    return [label_of(lines[row]) for row in parts[i]]


def fold_test_set(root: Path, k: int, i: int) -> tuple[Path, list[int]]:
    """Fold i's test.csv (made if need be) and its labels."""
    return make_fold(root, k, i) / "test.csv", fold_labels(k, i)


def result_path(results: Path, model: str, name: str, i: int) -> Path:
    return results / f"heldout_{model_label(model)}" / f"{name}-fold{i}.json"


def run_fold(model: str, k: int, i: int, name: str, flags: list[str], root: Path) -> dict[str, Any]:
    folder, data = model_folder(model), make_fold(root, k, i)
    run_dir = root / "runs" / f"{name}-fold{i}"
    command = [sys.executable, "-m", "budgetlora", "train", "--model", str(folder), "--data", str(data)]
    command += ["--output", str(run_dir), "--no-progress", *flags]
    shown = shlex.join(["budgetlora", *command[3:]])
    shown = (
        shown.replace(str(folder), "MODEL").replace(str(data), f"FOLD{i}").replace(str(root / "runs"), "RUNS")
    )
    print("+", shown, flush=True)
    out: dict[str, Any] = {"name": name, "fold": i, "folds": k, "model": model_label(model), "command": shown}
    shutil.rmtree(run_dir, ignore_errors=True)
    (root / "logs").mkdir(exist_ok=True)
    log = root / "logs" / f"{run_dir.name}.log"
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    out["process_seconds"] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-3:]
        out.update(status="failed", message=" ".join(tail)[:600])
        return out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = metrics["test"]
    out["test_predictions"] = test_predictions(
        run_dir, folder, data / "test.csv", fold_labels(k, i), test["accuracy"]
    )
    out.update(
        status="ok",
        test_rows=test["n"],
        test_correct=round(test["accuracy"] * test["n"]),
        test_accuracy=test["accuracy"],
        test_macro_f1=test["macro_f1"],
        train_rows=metrics["data"]["train"],
        trainable=metrics["budget"]["trainable"],
        best_step=metrics["best_step"],
        steps=metrics["steps"],
        train_seconds=metrics["timing"]["train_seconds"],
        train_samples_per_second=metrics["timing"]["train_samples_per_second"],
        config=resolved_run_config(run_dir),
    )
    return out


def by_name(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The results in one model's folder, by name, in file order."""
    named: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(path.read_text())
        named.setdefault(record["name"], []).append(record)
    return named


def paired(mine: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> str:
    """Mine against theirs on the rows both held out (the folds both ran, at the same K, with test
    predictions): the accuracy difference, the rows only mine / only theirs gets right, and the exact
    McNemar p-value; "-" where they share no fold."""

    def predicted(runs: list[dict[str, Any]]) -> dict[tuple[int, int], str]:
        return {(r["folds"], r["fold"]): r["test_predictions"] for r in runs if "test_predictions" in r}

    a, b = predicted(mine), predicted(theirs)
    common = sorted(a.keys() & b.keys())
    if not common:
        return "-"
    labels = [y for k, i in common for y in fold_labels(k, i)]
    only_mine, only_theirs, p = mcnemar(
        "".join(a[key] for key in common), "".join(b[key] for key in common), labels
    )
    cell = f"{(only_mine - only_theirs) / len(labels) * 100:+.2f} ({only_mine}/{only_theirs}, p={p:.2g})"
    if len(common) < common[0][0]:  # not every fold: say which
        cell += f" on fold{'s' if len(common) > 1 else ''} {', '.join(str(i) for _, i in common)}"
    return cell


def bag_of_words(k: int) -> list[dict[str, Any]]:
    """A baseline without an encoder, on the same folds: TF-IDF (sublinear tf) + logistic regression,
    scikit-learn's defaults otherwise, on each row's title and description, trained on all the rows
    of the other K-1 folds. One record per fold with its label for every held-out row, as a run's."""
    lines, parts = folds(k)
    texts = [f"{title} {description}" for _, title, description in csv.reader(lines)]
    records = []
    for i, part in enumerate(parts):
        train = [row for j, other in enumerate(parts) if j != i for row in other]
        model = make_pipeline(TfidfVectorizer(sublinear_tf=True), LogisticRegression(max_iter=1000))
        model.fit([texts[row] for row in train], [label_of(lines[row]) for row in train])
        predicted = model.predict([texts[row] for row in part])
        records.append({"folds": k, "fold": i, "test_predictions": "".join(str(p) for p in predicted)})
    return records


def together(named: dict[str, list[dict[str, Any]]]) -> tuple[list[str], float, float] | None:
    """The variants that held out every row at the defaults' K within the defaults' budget, most
    accurate first; the accuracy of their majority vote on each row (a tie goes to the more accurate
    variant); and the share of rows at least one of them gets right. None with fewer than three."""
    if not named.get("defaults"):
        return None
    k, budget = named["defaults"][0]["folds"], named["defaults"][0]["config"]["budget"]
    complete: dict[str, dict[int, str]] = {}
    for name, runs in named.items():
        done = {
            r["fold"]: r["test_predictions"]
            for r in runs
            if r["folds"] == k
            and r["status"] == "ok"
            and "test_predictions" in r
            and r["trainable"] <= budget
        }
        if len(done) == k:
            complete[name] = done
    if len(complete) < 3:
        return None
    labels = {i: fold_labels(k, i) for i in range(k)}

    def right(predictions: dict[int, str]) -> int:
        return sum(int(p) == y for i in range(k) for p, y in zip(predictions[i], labels[i], strict=True))

    names = sorted(complete, key=lambda name: -right(complete[name]))  # stable: file order on a tie
    voted = correct = anyone = 0
    for i in range(k):
        for j, y in enumerate(labels[i]):
            votes = [complete[name][i][j] for name in names]
            voted += int(Counter(votes).most_common(1)[0][0]) == y  # equal counts: first seen wins
            anyone += str(y) in votes
            correct += 1
    return names, voted / correct, anyone / correct


def table(results: Path, model: str) -> str:
    named = by_name(results / f"heldout_{model_label(model)}")
    records = [record for runs in named.values() for record in runs]
    lines = [
        f"# Held-out accuracy: {model_label(model)}, budgetlora's defaults, K-fold cross-validation",
        "",
        f"All of `{SAMPLE.name}` (5,600 rows of the official AG News test split) in K stratified"
        f" folds (seed 42); each fold's run trains on the other folds with nothing but --model,"
        " --data, --output and --no-progress (and the variant's flags), and is scored once on its own fold. Pooled: the"
        " rows right over every row held out; SE: its binomial standard error; vs defaults: the"
        " difference from the defaults on the same held-out rows, the rows only this / only the defaults"
        " gets right, and the exact McNemar p-value (paired, two-sided).",
        "",
        "| name | folds done | held-out rows | pooled accuracy | SE | vs defaults | each fold | mean macro-F1 | trainable | train rows | train s (mean) | samples/s |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in named.items():
        ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["fold"])
        if not ok:
            lines.append(f"| {name} | failed: {runs[0].get('message', '')[:160]} | | | | | | | | | | |")
            continue
        rows = sum(r["test_rows"] for r in ok)
        accuracy = sum(r["test_correct"] for r in ok) / rows
        each = " / ".join(f"{r['test_accuracy'] * 100:.2f}" for r in ok)
        lines.append(
            f"| {name} | {len(ok)} of {ok[0]['folds']} | {rows:,} | **{accuracy * 100:.2f}%** |"
            f" {standard_error(accuracy, rows) * 100:.2f} |"
            f" {'(reference)' if name == 'defaults' else paired(ok, named.get('defaults', []))} | {each} |"
            f" {np.mean([r['test_macro_f1'] for r in ok]) * 100:.2f}% | {ok[0]['trainable']:,} |"
            f" {np.mean([r['train_rows'] for r in ok]):,.0f} |"
            f" {np.mean([r['train_seconds'] for r in ok]):.0f} |"
            f" {np.mean([r['train_samples_per_second'] for r in ok]):.1f} |"
        )
    others = {
        folder.name.removeprefix("heldout_"): by_name(folder).get("defaults", [])
        for folder in sorted(results.glob("heldout_*"))
        if folder.is_dir() and folder.name != f"heldout_{model_label(model)}"
    }
    pairs = {other: paired(named.get("defaults", []), runs) for other, runs in others.items()}
    if any(cell != "-" for cell in pairs.values()):
        lines += [
            "",
            "## The defaults against another encoder's, on the same held-out rows",
            "",
            "| other encoder | this one's defaults minus the other's (rows only this / only the other right, p) |",
            "|---|---|",
        ]
        lines += [f"| {other} | {cell} |" for other, cell in pairs.items() if cell != "-"]
    if named.get("defaults"):
        k = named["defaults"][0]["folds"]
        baseline = bag_of_words(k)
        labels = [y for r in baseline for y in fold_labels(k, r["fold"])]
        right = sum(
            int(p) == y for p, y in zip("".join(r["test_predictions"] for r in baseline), labels, strict=True)
        )
        lines += [
            "",
            "## A bag of words on the same rows",
            "",
            f"TF-IDF (sublinear tf) + logistic regression, scikit-learn's defaults otherwise, trained on all"
            f" the rows of the other folds (K = {k}): **{right / len(labels) * 100:.2f}%** held out over all"
            f" {len(labels):,} rows. The defaults minus it: {paired(named['defaults'], baseline)}.",
        ]
    combined = together(named)
    if combined is not None:
        names, voted, anyone = combined
        lines += [
            "",
            "## The variants together",
            "",
            f"The {len(names)} variants that held out every row within the defaults' budget"
            f" ({', '.join(names)}), as one majority vote on each row (a tie goes to the more accurate"
            f" variant): **{voted * 100:.2f}%**. This is an ensemble at {len(names)} times the budget, not a"
            f" recipe. At least one of them is right on {anyone * 100:.2f}% of the rows.",
        ]
    lines += ["", "## Commands", ""]
    for name, runs in named.items():
        lines.append(f"- **{name}**: `{runs[0]['command']}`")
    hosts = sorted({r.get("hardware", "") for r in records} - {""})
    lines += ["", f"Hardware: {'; '.join(hosts)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="minilm", help="minilm, mpnet (see fetch_mpnet.py) or a model folder"
    )
    parser.add_argument("--folds", type=int, default=5, help="K (default %(default)s)")
    parser.add_argument("--fold", type=int, action="append", help="run only these folds (repeatable)")
    parser.add_argument("--name", default="defaults", help="the results' name (default %(default)s)")
    parser.add_argument(
        "--flag",
        action="append",
        default=[],
        help="an option for budgetlora train (repeatable: --flag=--epochs --flag=1)",
    )
    parser.add_argument("--workdir", type=Path, help="folds, runs and logs (default: a folder in the cache)")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where results go (default: %(default)s)"
    )
    parser.add_argument("--again", action="store_true", help="rerun folds that already have a result")
    parser.add_argument(
        "--table", action="store_true", help="only print and write the table of the results so far"
    )
    args = parser.parse_args()
    if args.folds < 2:
        parser.error(f"--folds {args.folds}: at least 2")
    bad = [i for i in args.fold or () if not 0 <= i < args.folds]
    if bad:
        parser.error(f"--fold {bad[0]}: folds are 0..{args.folds - 1}")
    print("+", shlex.join([sys.executable, *sys.argv]))
    print("hardware:", hardware(), flush=True)
    if not args.table:
        root = args.workdir or default_cache() / f"heldout-{model_label(args.model)}"
        for i in args.fold or range(args.folds):
            path = result_path(args.results, args.model, args.name, i)
            if path.is_file() and not args.again:
                print(f"{args.name} fold {i}: already in {path}", flush=True)
                add_predictions(
                    path,
                    args.model,
                    root / "runs" / path.stem,
                    partial(fold_test_set, root, args.folds, i),
                )
                continue
            result = run_fold(args.model, args.folds, i, args.name, args.flag, root)
            result["hardware"] = hardware()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
            shown = (
                f"held-out accuracy {result['test_accuracy']:.4f}"
                if result["status"] == "ok"
                else result["message"]
            )
            print(f"{args.name} fold {i}: {result['status']}, {shown}", flush=True)
            write_table(args.results, args.model)
    print(write_table(args.results, args.model))


def write_table(results: Path, model: str) -> str:
    text = table(results, model)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"heldout_{model_label(model)}.md").write_text(text)
    return text


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
