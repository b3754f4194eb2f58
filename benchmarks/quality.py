"""Which way of spending 1,000,000 trainable parameters classifies AG News best: every course preset,
the flagship default and better recipes, trained on one split, scored once on held-out rows.

    python benchmarks/fetch_mpnet.py                            # once: all-mpnet-base-v2 into the cache
    python benchmarks/quality.py --model mpnet --epochs 2       # every arm, one after the other
    python benchmarks/quality.py --model mpnet --epochs 2 --arm linear-all-auto --seed 7
    python benchmarks/quality.py --model mpnet --epochs 2 --table   # the table of the results so far
    python benchmarks/quality.py --list

One split of ../shared/data/ag_news/sample.csv (5,600 rows of the official AG News test split) serves
every arm: stratified with seed 42 into 3,920 train / 560 validation / 1,120 test rows, written as the
original release's lines into train.csv / validation.csv / test.csv (+ classes.txt). Each arm is one
real `budgetlora train` (or `budgetlora distill`) process with its command recorded: the same epochs,
validation four times per run plus at each epoch's end, the best validation checkpoint kept and scored
once on the test rows. "Best" is by validation accuracy, as when the benchmark first ran (accuracy was
budgetlora's default then; commands recorded before the arms passed --best-metric ran with it); the
`-loss` and `+loss` arms keep the lowest validation loss instead, today's default. Presets keep
everything of their recipe except the epochs (and max_steps), the data and the model, so that all
arms see the same rows for as long.

Each arm's result goes to benchmarks/results/quality_<model>/<arm>-seed<seed>.json as soon as it
finishes, so a long benchmark can run one arm at a time, be split up and resumed (an arm already
there is skipped unless --again). The table (Markdown and JSON, benchmarks/results/quality_<model>.md)
is rebuilt from every result there after each arm: the arms ranked by mean test accuracy, with the
standard error of each accuracy (binomial, on the 1,120 test rows) and, where an arm ran with several
seeds, the seeds' spread. Each result also keeps the arm's label for every test row (`budgetlora
predict` on the kept run), so that two arms can be compared on the same rows: the table gives each
arm's difference from the best course preset with the exact McNemar p-value over the rows where
exactly one of the two is right (a paired test, sharper than two binomial SEs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_mpnet import FOLDER_NAME, default_cache  # noqa: E402
from speed import REPO, SHARED, hardware, minilm_dir  # noqa: E402

SAMPLE = SHARED / "data" / "ag_news" / "sample.csv"
CLASSES = SHARED / "data" / "ag_news" / "classes.txt"
PRESETS = REPO / "configs" / "presets"
FLAGSHIP = REPO / "configs" / "agnews-roberta-base.yaml"
RESULTS = REPO / "benchmarks" / "results"
SPLIT = {"train": 980, "validation": 140, "test": 280}  # rows per class (of 1,400)
EVALS_PER_RUN = 2


@dataclass(frozen=True)
class Arm:
    """One way to train: a config file (or the built-in defaults) and flags on top."""

    name: str
    about: str
    config: Path | None = None
    flags: tuple[str, ...] = ()
    teacher: str | None = None
    """Distillation: the arm whose run (same seed) teaches this one."""
    alpha_per_rank: float | None = None
    """Set lora.alpha to this times the rank that `--lora-r auto` resolves to (scale alpha/r stays fixed)."""
    head_lr_factor: float | None = None
    """Train the head at this times the learning rate of LoRA (train.head_lr)."""
    top_rank: bool = False
    """Give the top half of the layers more rank (rank_pattern, worked out for the model)."""
    best_metric: str = "accuracy"
    """The validation metric that picks the kept checkpoint: accuracy, as when the first arms ran."""


def course_arms() -> list[Arm]:
    arms = []
    for path in sorted(PRESETS.glob("*.yaml")):
        name = "preset:" + path.stem
        teacher = "preset:targeted-layers-r12-teacher" if path.stem.endswith("distill-student") else None
        about = path.read_text().splitlines()[0].lstrip("# ").split(" (issue")[0].strip()
        arms.append(Arm(name, about, config=path, teacher=teacher))
    return arms


LINEAR = ("--head", "linear")
ARMS: tuple[Arm, ...] = (
    *course_arms(),
    Arm(
        "preset:adam-r4-lora-only+loss",
        "adam-r4-lora-only, the kept checkpoint picked by the lowest validation loss instead of accuracy",
        PRESETS / "adam-r4-lora-only.yaml",
        best_metric="loss",
    ),
    Arm(
        "flagship",
        "configs/agnews-roberta-base.yaml as it was: r=8 query+value, the model's head, lr 4e-4",
        FLAGSHIP,
        flags=("--lr", "4e-4"),
    ),
    Arm(
        "defaults",
        "budgetlora's defaults as they were: r=8 query+value, the model's head, lr 2e-3, "
        "the checkpoint of the best validation accuracy",
    ),
    Arm(
        "defaults-loss",
        "budgetlora's defaults: the same, the checkpoint of the lowest validation loss",
        best_metric="loss",
    ),
    Arm(
        "linear-all-auto",
        "linear head, LoRA on all projections at the largest rank that fits, alpha = 2r",
        flags=(*LINEAR, "--target-modules", "all", "--lora-r", "auto"),
        alpha_per_rank=2,
    ),
    Arm(
        "linear-attention-auto",
        "linear head, LoRA on the attention projections at the largest rank that fits, alpha = 2r",
        flags=(*LINEAR, "--target-modules", "attention", "--lora-r", "auto"),
        alpha_per_rank=2,
    ),
    Arm(
        "linear-attention-top",
        "linear head, attention LoRA with 1.6x the uniform rank on the top half of the layers, the rest filling the budget",
        flags=(*LINEAR, "--target-modules", "attention", "--lora-r", "auto"),
        top_rank=True,
    ),
    Arm(
        "linear-attention-dora",
        "linear head, DoRA on the attention projections at the largest rank that fits",
        flags=(*LINEAR, "--target-modules", "attention", "--lora-r", "auto", "--dora"),
    ),
    Arm(
        "linear-qv-rslora",
        "linear head, rsLoRA (alpha/sqrt(r)) on query+value at the largest rank that fits",
        flags=(*LINEAR, "--target-modules", "query,value", "--lora-r", "auto", "--rslora"),
    ),
    Arm(
        "linear-all-auto-headlr",
        "linear-all-auto with the head at 5x the learning rate of LoRA",
        flags=(*LINEAR, "--target-modules", "all", "--lora-r", "auto"),
        alpha_per_rank=2,
        head_lr_factor=5,
    ),
)
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}


def model_folder(model: str) -> Path:
    if model == "minilm":
        return minilm_dir()
    if model == "mpnet":
        folder = default_cache() / FOLDER_NAME
        if not (folder / "model.safetensors").is_file():
            sys.exit(f"{folder} is missing: run python benchmarks/fetch_mpnet.py first")
        return folder
    return Path(model)


def model_label(model: str) -> str:
    return {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}.get(model, Path(model).name)


def class_orders() -> tuple[list[str], list[np.ndarray]]:
    """The release's lines and each class's line numbers in one seeded order (seed 42, the classes
    in index order): every split of the sample (this benchmark's, heldout.py's folds) cuts these."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    labels = np.array([label_of(line) for line in lines])
    rng = np.random.RandomState(42)
    return lines, [rng.permutation(np.flatnonzero(labels == label)) for label in sorted(set(labels.tolist()))]


def split_rows() -> tuple[list[str], dict[str, list[int]]]:
    """The release's lines and, for each part of the split, its line numbers in file order
    (stratified, seed 42: the same every time)."""
    lines, orders = class_orders()
    parts: dict[str, list[int]] = {split: [] for split in SPLIT}
    for rows in orders:
        start = 0
        for split, n in SPLIT.items():
            parts[split].extend(rows[start : start + n].tolist())
            start += n
    return lines, {split: sorted(rows) for split, rows in parts.items()}


def label_of(line: str) -> int:
    """The class index (0-3) of one line of the release (labelled 1-4)."""
    return int(line.split(",", 1)[0].strip('"')) - 1


def test_labels() -> list[int]:
    """The class index of every test row, in the order of test.csv."""
    lines, parts = split_rows()
    return [label_of(lines[i]) for i in parts["test"]]


def make_split(root: Path) -> Path:
    """The benchmark's split, as the release's own lines, in root/split."""
    folder = root / "split"
    if (folder / "test.csv").is_file():
        return folder
    return write_release_folder(folder, *split_rows())


def write_release_folder(folder: Path, lines: list[str], parts: dict[str, list[int]]) -> Path:
    """Each part as <part>.csv of the release's own lines, and classes.txt, in folder: all of them
    or, if interrupted, none."""
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for part, rows in parts.items():
        (scratch / f"{part}.csv").write_text("".join(lines[i] for i in rows), encoding="utf-8")
    shutil.copy(CLASSES, scratch / "classes.txt")
    scratch.rename(folder)
    return folder


def layer_count(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def resolved(command: list[str]) -> dict[str, Any]:
    """The config a command would train with (budgetlora's own --print-config)."""
    import yaml

    out = subprocess.run([*command, "--print-config"], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(
            out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "print-config failed"
        )
    return yaml.safe_load(out.stdout)


def auto_rank(command: list[str]) -> int:
    """The rank `--lora-r auto` resolves to for this command's targets and head (skeleton count)."""
    from budgetlora.config import config_from_dict
    from budgetlora.model.budget import resolve_rank

    cfg = config_from_dict(resolved(command))
    return resolve_rank(cfg.model, ["World", "Sports", "Business", "Sci/Tech"], cfg.budget)


def arm_command(
    arm: Arm, folder: Path, split: Path, run_dir: Path, epochs: float, seed: int, root: Path
) -> list[str]:
    verb = "distill" if arm.teacher else "train"
    command = [sys.executable, "-m", "budgetlora", verb]
    if arm.config is not None:
        command += ["--config", str(arm.config.relative_to(REPO))]
    command += ["--model", str(folder), "--data", str(split), "--output", str(run_dir)]
    command += ["--epochs", f"{epochs:g}", "--seed", str(seed), "--no-progress"]
    if resolved(command)["train"]["max_steps"] is not None:  # the starter's 1,200 steps: epochs decide here
        command += ["--set", "train.max_steps=null"]
    command += [*arm.flags, "--best-metric", arm.best_metric]
    if arm.alpha_per_rank is not None:
        command += ["--lora-alpha", f"{arm.alpha_per_rank * auto_rank(command):g}"]
    if arm.head_lr_factor is not None:
        command += ["--set", f"train.head_lr={arm.head_lr_factor * resolved(command)['train']['lr']:g}"]
    if arm.top_rank:
        uniform = auto_rank(command)
        n_layers = layer_count(folder)
        top = "|".join(str(i) for i in range(n_layers // 2, n_layers))
        command += [
            "--set",
            f'model.lora.rank_pattern={{"layer\\\\.({top})\\\\..*": {round(1.6 * uniform)}}}',
        ]
    if arm.teacher:
        command += ["--teacher", str(root / "runs" / f"{arm.teacher.replace(':', '-')}-seed{seed}")]
    config = resolved(command)
    steps_per_epoch = math.ceil(
        SPLIT["train"] * 4 / (config["train"]["batch_size"] * config["train"]["grad_accum"])
    )
    command += ["--eval-every", str(max(1, math.ceil(steps_per_epoch * epochs / EVALS_PER_RUN)))]
    return command


def shown(command: list[str], folder: Path, split: Path, root: Path) -> str:
    """The command as a user would type it (paths shortened to MODEL, DATA, RUNS)."""
    text = shlex.join(["budgetlora", *command[3:]])
    return text.replace(str(folder), "MODEL").replace(str(split), "DATA").replace(str(root / "runs"), "RUNS")


def result_path(results: Path, model: str, arm: str, seed: int) -> Path:
    return results / f"quality_{model_label(model)}" / f"{arm.replace(':', '-')}-seed{seed}.json"


def run_arm(arm: Arm, model: str, epochs: float, seed: int, root: Path) -> dict[str, Any]:
    folder = model_folder(model)
    split = make_split(root)
    run_dir = root / "runs" / f"{arm.name.replace(':', '-')}-seed{seed}"
    if (
        arm.teacher
        and not (root / "runs" / f"{arm.teacher.replace(':', '-')}-seed{seed}" / "metrics.json").is_file()
    ):
        print(f"{arm.name}: training its teacher {arm.teacher} first", flush=True)
        run_arm(ARMS_BY_NAME[arm.teacher], model, epochs, seed, root)
    out: dict[str, Any] = {
        "arm": arm.name,
        "about": arm.about,
        "seed": seed,
        "epochs": epochs,
        "model": model_label(model),
    }
    try:
        command = arm_command(arm, folder, split, run_dir, epochs, seed, root)
    except RuntimeError as err:  # the config itself is refused (over budget, for one)
        out.update(status="refused", message=str(err))
        return out
    out["command"] = shown(command, folder, split, root)
    print("+", out["command"], flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    (root / "logs").mkdir(exist_ok=True)
    log = root / "logs" / f"{run_dir.name}.log"
    start = time.perf_counter()
    loads = []  # the 1-minute load average while the arm ran: about 2 on an otherwise idle 2-core machine
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        while proc.poll() is None:
            loads.append(os.getloadavg()[0])
            time.sleep(5)
    out["process_seconds"] = round(time.perf_counter() - start, 1)
    out["load_average"] = round(float(np.mean(loads)), 2) if loads else None
    if proc.returncode != 0:
        output = log.read_text().splitlines()
        lines = [line for line in output if "error" in line.lower()] or output[-1:]
        out.update(status="refused" if proc.returncode == 2 else "failed", message=" ".join(lines)[:600])
        return out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = resolved_run_config(run_dir)
    out["test_predictions"] = test_predictions(
        run_dir, folder, split / "test.csv", test_labels(), metrics["test"]["accuracy"]
    )
    out.update(
        status="ok",
        trainable=metrics["budget"]["trainable"],
        groups=metrics["budget"]["groups"],
        rank=config["model"]["lora"]["r"],
        rank_pattern=config["model"]["lora"]["rank_pattern"],
        test_accuracy=metrics["test"]["accuracy"],
        test_macro_f1=metrics["test"]["macro_f1"],
        test_rows=metrics["test"]["n"],
        validation_accuracy=metrics["validation"]["accuracy"],
        best_step=metrics["best_step"],
        steps=metrics["steps"],
        train_seconds=metrics["timing"]["train_seconds"],
        train_samples_per_second=metrics["timing"]["train_samples_per_second"],
        config=config,
    )
    return out


def test_predictions(run_dir: Path, folder: Path, test_csv: Path, labels: list[int], accuracy: float) -> str:
    """The run's label for every row of test_csv, one digit per row (from `budgetlora predict`);
    checked against the rows' labels and the test accuracy that training recorded."""
    out = run_dir / "test-predictions.csv"
    command = [sys.executable, "-m", "budgetlora", "predict", str(run_dir), str(test_csv)]
    command += ["--model", str(folder), "--output", str(out)]
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    lines = out.read_text().splitlines()[1:]
    predictions = [int(line.rsplit(",", 1)[1]) for line in lines]
    right = sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)
    if abs(right - accuracy) > 1e-9:
        raise RuntimeError(f"{run_dir.name}: predict scores {right:.4f}, training recorded {accuracy:.4f}")
    return "".join(str(p) for p in predictions)


def mcnemar(a: str, b: str, labels: list[int]) -> tuple[int, int, float]:
    """Rows only arm a gets right, rows only arm b gets right, and the exact two-sided p-value
    that both are equally often right (a sign test over those rows)."""
    only_a = sum(x == str(y) != z for x, z, y in zip(a, b, labels, strict=True))
    only_b = sum(z == str(y) != x for x, z, y in zip(a, b, labels, strict=True))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n if n else 1.0
    return only_a, only_b, min(1.0, 2 * tail)


def resolved_run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def standard_error(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / n)


def table(results_dir: Path, model: str) -> tuple[str, list[dict[str, Any]]]:
    folder = results_dir / f"quality_{model_label(model)}"
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_arm.setdefault(result["arm"], []).append(result)
    rows = []
    for arm, runs in by_arm.items():
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            rows.append(
                {"arm": arm, "status": runs[0]["status"], "message": runs[0].get("message", ""), "runs": runs}
            )
            continue
        accuracies = [r["test_accuracy"] for r in ok]
        rows.append(
            {
                "arm": arm,
                "status": "ok",
                "seeds": [r["seed"] for r in ok],
                "trainable": ok[0]["trainable"],
                "rank": ok[0]["rank"],
                "rank_pattern": ok[0].get("rank_pattern") or {},
                "test_accuracy": float(np.mean(accuracies)),
                "se": standard_error(float(np.mean(accuracies)), ok[0]["test_rows"]),
                "seed_spread": (max(accuracies) - min(accuracies)) if len(ok) > 1 else None,
                "test_macro_f1": float(np.mean([r["test_macro_f1"] for r in ok])),
                "validation_accuracy": float(np.mean([r["validation_accuracy"] for r in ok])),
                "train_seconds": float(np.mean([r["train_seconds"] for r in ok])),
                "samples_per_second": float(np.mean([r["train_samples_per_second"] for r in ok])),
                "load_average": max((r.get("load_average") or 0.0 for r in ok), default=0.0) or None,
                "command": ok[0]["command"],
                "about": ok[0]["about"],
                "runs": runs,
            }
        )
    rows.sort(key=lambda r: (r["status"] != "ok", -r.get("test_accuracy", 0.0)))
    add_paired(rows)
    epochs = sorted({r["epochs"] for r in results})
    lines = [
        f"# Quality: {model_label(model)} on AG News under a budget of 1,000,000 trainable parameters",
        "",
        f"Split of `sample.csv` (stratified, seed 42): {SPLIT['train'] * 4:,} train / {SPLIT['validation'] * 4} validation"
        f" / {SPLIT['test'] * 4:,} test rows; epochs: {', '.join(f'{e:g}' for e in epochs)};"
        f" the best of {EVALS_PER_RUN}+ validations kept (by accuracy; by loss in the -loss and +loss arms),"
        " scored once on test. SE: the binomial standard error of the"
        " test accuracy; spread: max - min over seeds; rank a / b: rank a, b on the top half of the layers;"
        " vs best preset: the test accuracy minus the best course preset's on the same seed and rows, the rows only"
        " this arm / only the preset gets right, and the exact McNemar p-value (paired, two-sided);"
        " load: the mean 1-minute load average during the run (about 2 when nothing else ran on the 2 cores;"
        " more: other work shared the CPU and slowed the run; -: not recorded).",
        "",
        "| arm | trainable | rank | test acc. | SE | seeds (spread) | vs best preset | test macro-F1 | val. acc. | train s | samples/s | load |",
        "|---|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['arm']} | {row['status']}: {row['message'][:160]} | | | | | | | | | | |")
            continue
        spread = f" ({row['seed_spread'] * 100:.2f})" if row["seed_spread"] is not None else ""
        rank = " / ".join([str(row["rank"]), *(str(r) for r in row["rank_pattern"].values())])
        load = "-" if row["load_average"] is None else f"{row['load_average']:.1f}"
        lines.append(
            f"| {row['arm']} | {row['trainable']:,} | {rank} | {row['test_accuracy'] * 100:.2f}% |"
            f" {row['se'] * 100:.2f} | {len(row['seeds'])}{spread} | {row.get('paired', '')} |"
            f" {row['test_macro_f1'] * 100:.2f}% |"
            f" {row['validation_accuracy'] * 100:.2f}% | {row['train_seconds']:.0f} | {row['samples_per_second']:.1f} |"
            f" {load} |"
        )
    lines += ["", "## The arms and their commands", ""]
    for row in rows:
        about = row.get("about") or row["runs"][0].get("about", "")
        command = row.get("command") or row["runs"][0].get("command", "(refused before a command ran)")
        lines.append(f"- **{row['arm']}**: {about}  \n  `{command}`")
    hosts = sorted({r.get("hardware", "") for r in results} - {""})
    lines += ["", f"Hardware: {'; '.join(hosts)}."]
    return "\n".join(lines) + "\n", rows


def add_paired(rows: list[dict[str, Any]]) -> None:
    """Give each row a `paired` cell: its difference from the best course preset on one seed's test rows."""
    labels = test_labels()

    def predictions(row: dict[str, Any]) -> dict[int, str]:
        runs = row["runs"] if row["status"] == "ok" else []
        return {
            r["seed"]: r["test_predictions"] for r in runs if r["status"] == "ok" and "test_predictions" in r
        }

    presets = [r for r in rows if r["arm"].startswith("preset:") and predictions(r)]
    if not presets:
        return
    best = presets[0]  # rows are ranked
    for row in rows:
        common = sorted(set(predictions(row)) & set(predictions(best)), reverse=True)
        if row is best or not common:
            continue
        cells, row["paired_vs"] = [], []
        for seed in common:  # each seed the two arms share: paired on the same rows
            mine, theirs = predictions(row)[seed], predictions(best)[seed]
            only_mine, only_theirs, p = mcnemar(mine, theirs, labels)
            delta = (only_mine - only_theirs) / len(labels) * 100
            cells.append(
                f"{delta:+.2f} ({only_mine}/{only_theirs}, p={p:.2f})"
                + (f" seed {seed}" if len(common) > 1 else "")
            )
            row["paired_vs"].append(
                {"arm": best["arm"], "seed": seed, "only_this": only_mine, "only_preset": only_theirs, "p": p}
            )
        row["paired"] = "; ".join(cells)
    best["paired"] = "(best preset)"


def add_predictions(
    path: Path, model: str, run_dir: Path, test_set: Callable[[], tuple[Path, list[int]]]
) -> None:
    """Give a result from before the benchmark kept test predictions its run's, if the run is still
    there: test_set() gives the test.csv the run was scored on and that file's labels."""
    result = json.loads(path.read_text())
    if result["status"] != "ok" or "test_predictions" in result or not (run_dir / "metrics.json").is_file():
        return
    test_csv, labels = test_set()
    result["test_predictions"] = test_predictions(
        run_dir, model_folder(model), test_csv, labels, result["test_accuracy"]
    )
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"  + its test predictions, from {run_dir}", flush=True)


def write_table(results: Path, model: str) -> str:
    text, rows = table(results, model)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"quality_{model_label(model)}.md").write_text(text)
    (results / f"quality_{model_label(model)}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="minilm", help="minilm, mpnet (see fetch_mpnet.py) or a model folder"
    )
    parser.add_argument("--arm", action="append", help="run only these arms (repeatable; default: all)")
    parser.add_argument("--seed", type=int, action="append", help="training seeds (repeatable; default 42)")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs of every arm (default %(default)s)")
    parser.add_argument("--workdir", type=Path, help="split, runs and logs (default: a folder in the cache)")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where results go (default: %(default)s)"
    )
    parser.add_argument("--again", action="store_true", help="rerun arms that already have a result")
    parser.add_argument(
        "--table", action="store_true", help="only print and write the table of the results so far"
    )
    parser.add_argument("--list", action="store_true", help="list the arms")
    args = parser.parse_args()
    if args.list:
        for arm in ARMS:
            print(f"{arm.name:32} {arm.about}")
        return
    print("+", shlex.join([sys.executable, *sys.argv]))
    print("hardware:", hardware(), flush=True)
    if not args.table:
        root = args.workdir or default_cache() / f"quality-{model_label(args.model)}"
        unknown = sorted(set(args.arm or ()) - set(ARMS_BY_NAME))
        if unknown:
            sys.exit(f"unknown arm(s) {', '.join(unknown)}; --list shows them")
        for seed in args.seed or [42]:
            for arm in [ARMS_BY_NAME[name] for name in args.arm] if args.arm else ARMS:
                path = result_path(args.results, args.model, arm.name, seed)
                if path.is_file() and not args.again:
                    print(f"{arm.name} seed {seed}: already in {path}", flush=True)
                    add_predictions(
                        path,
                        args.model,
                        root / "runs" / path.stem,
                        lambda: (make_split(root) / "test.csv", test_labels()),
                    )
                    continue
                result = run_arm(arm, args.model, args.epochs, seed, root)
                result["hardware"] = hardware()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=1) + "\n")
                print(
                    f"{arm.name} seed {seed}: {result['status']}"
                    + (
                        f", test accuracy {result['test_accuracy']:.4f}"
                        if result["status"] == "ok"
                        else f": {result.get('message', '')}"
                    ),
                    flush=True,
                )
                write_table(args.results, args.model)
    print(write_table(args.results, args.model))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
