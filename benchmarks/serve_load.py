"""`budgetlora serve` under overload, for all-MiniLM-L6-v2 exported to ONNX, on real AG News rows.

A short LoRA run (or ``--run DIR`` / ``--export DIR``), served by a real uvicorn process on
127.0.0.1 once per ``--queues`` value (``--max-queue``): ``--clients`` clients on kept-alive
connections each send ``--requests`` requests of 1 to 4 texts, one after another, as fast as
answers come. For each queue size: the answers (200) and refusals (503 busy), answered
requests/s and texts/s, p50/p99 latency of each, the server's memory before and after, and
whether every answer carries budgetlora's own labels for its texts.

    python benchmarks/serve_load.py > benchmarks/results/serve_load_cpu_minilm.md

Progress goes to stderr; stdout (markdown) is the command, the hardware and the table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy import _hardware, _log, _train_run, run_clients, served, served_model_arguments  # noqa: E402


def _overload(
    port: int, texts: list[str], expected: list[str], clients: int, requests: int
) -> dict[str, Any]:
    answered: list[float] = []
    refused: list[float] = []
    texts_answered = 0
    wrong = 0
    lock = threading.Lock()

    def client(k: int) -> None:
        nonlocal texts_answered, wrong
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for i in range(requests):
            rows = [(k * requests + i * 4 + j) % len(texts) for j in range(1 + (k + i) % 4)]
            body = json.dumps({"texts": [texts[r] for r in rows]})
            start = time.perf_counter()
            conn.request("POST", "/classify", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = json.loads(response.read())
            took = time.perf_counter() - start
            with lock:
                if response.status == 503:
                    refused.append(took)
                    continue
                if response.status != 200:
                    raise SystemExit(f"unexpected {response.status}: {payload}")
                answered.append(took)
                texts_answered += len(rows)
                wrong += sum(
                    p["label"] != expected[r] for p, r in zip(payload["predictions"], rows, strict=True)
                )
        conn.close()

    wall = run_clients(client, clients)
    if len(answered) + len(refused) != clients * requests:
        raise SystemExit(f"{clients * requests - len(answered) - len(refused)} requests got no answer")

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")

    return {
        "answered": len(answered),
        "refused": len(refused),
        "requests_per_s": len(answered) / wall,
        "texts_per_s": texts_answered / wall,
        "p50_ms": pct(answered, 50),
        "p99_ms": pct(answered, 99),
        "refused_p99_ms": pct(refused, 99),
        "agree": 1 - wrong / max(texts_answered, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    served_model_arguments(parser)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--requests", type=int, default=40, help="requests per client (default 40)")
    parser.add_argument("--queues", default="32,2048", help="--max-queue values served (default 32,2048)")
    args = parser.parse_args()

    from budgetlora.inference.backends import TorchClassifier
    from budgetlora.inference.export import export

    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]])
    print(f"command: `{command}`\n\nhardware: {_hardware()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run
        if run_dir is None:
            _log(f"training all-MiniLM-L6-v2 for {args.steps} steps")
            with contextlib.redirect_stdout(sys.stderr):
                run_dir = _train_run(Path(tmp) / "run", args.data, args.steps)
        export_dir = args.export
        if export_dir is None:
            export_dir = Path(tmp) / "export"
            with contextlib.redirect_stdout(sys.stderr):
                export(run_dir, export_dir, formats=("onnx",), overwrite=True)
        with open(args.data, encoding="utf-8", newline="") as fh:
            texts = [f"{row[1]} {row[2]}" for row in csv.reader(fh)][:256]
        reference = TorchClassifier(run_dir, mixed_precision="no")
        names = reference.label_names
        expected = [names[i] for i in reference.logits(texts).argmax(1)]
        del reference

        print(
            f"## `budgetlora serve` on the ONNX export: {args.clients} clients x {args.requests} requests "
            "of 1 to 4 texts (real HTTP on 127.0.0.1, kept-alive connections)\n"
        )
        print(
            "| --max-queue | answered | refused (503) | answered requests/s | texts/s | p50 ms | p99 ms | "
            "503 p99 ms | server memory before → after | labels as budgetlora fp32 |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for queue in (int(q) for q in args.queues.split(",")):
            _log(f"serving with --max-queue {queue}")
            with served(export_dir, "--max-queue", str(queue)) as (base, pid):
                port, memory = int(base.rsplit(":", 1)[1]), psutil.Process(pid)
                _overload(port, texts, expected, 2, 5)  # warm-up
                before = memory.memory_info().rss
                result = _overload(port, texts, expected, args.clients, args.requests)
                after = memory.memory_info().rss
            print(
                f"| {queue} | {result['answered']:,} | {result['refused']:,} | {result['requests_per_s']:.1f} | "
                f"{result['texts_per_s']:.1f} | {result['p50_ms']:.1f} | {result['p99_ms']:.1f} | "
                f"{result['refused_p99_ms']:.1f} | {before / 2**20:.0f} → {after / 2**20:.0f} MiB | "
                f"{result['agree']:.2%} |"
            )


if __name__ == "__main__":
    main()
