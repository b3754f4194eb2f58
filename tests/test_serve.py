"""`budgetlora serve` as a real uvicorn process on 127.0.0.1, spoken to over real HTTP: answers
that agree with budgetlora's own, bad requests refused with a message, a concurrent load
answered completely and correctly, bad options refused before the model loads."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from budgetlora.inference.serve import parse_texts
from commands import main_exit, post, request, server
from conftest import SERVE_POOL as POOL  # the texts that the fixtures run_and_export and expected know


@pytest.fixture(scope="module")
def onnx_server(run_and_export: tuple[Path, Path]) -> Iterator[str]:
    with server(run_and_export[1], "--max-texts", "8", "--max-body-bytes", "4096") as base:
        yield base


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["label"] == want["label"] and got["label_id"] == want["label_id"]
    assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)


def test_health_info_and_answers_that_agree_with_budgetlora(  # type: ignore[no-untyped-def]
    onnx_server: str, expected, run_and_export: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    assert request(f"{onnx_server}/health") == (200, {"status": "ok"})
    status, info = request(f"{onnx_server}/info")
    assert status == 200
    passes = info.pop("forward_passes")
    assert info == {
        "model": str(tiny_model_dir),
        "budget": json.loads((run_and_export[0] / "budget.json").read_text()),
        "metrics": json.loads((run_and_export[1] / "export.json").read_text())["metrics"],
        "labels": ["label_0", "label_1", "label_2", "label_3"],
        "backend": "onnx",
        "max_length": 32,
        "max_texts": 8,
        "batch_size": 32,
        "max_wait_ms": 5.0,
        "max_body_bytes": 4096,
        "max_queue": 2048,
        "max_connections": 512,
        "refused_busy": 0,
    }
    assert info["metrics"]["test"]["n"] == 96
    status, body = post(onnx_server, {"texts": POOL[:8]})
    assert status == 200 and len(body["predictions"]) == 8
    for text, got in zip(POOL[:8], body["predictions"], strict=True):
        assert_same(got, expected[text])
    assert request(f"{onnx_server}/info")[1]["forward_passes"] == passes + 1  # 8 texts, one pass


def test_bad_requests_get_a_status_and_a_message(onnx_server: str) -> None:
    url = f"{onnx_server}/classify"
    cases: list[tuple[bytes, int, str]] = [
        (b"{not json", 400, "the request body is not JSON"),
        (b"", 400, "the request body is not JSON"),
        (b'["a"]', 422, 'a JSON object with "texts"'),
        (b'{"text": "a"}', 422, 'a JSON object with "texts"'),
        (b'{"texts": "a"}', 422, '"texts" must be a non-empty list of strings'),
        (b'{"texts": []}', 422, '"texts" must be a non-empty list of strings'),
        (b'{"texts": ["a", 3]}', 422, '"texts"[1] is int, not a string'),
        (b'{"texts": ["a", " \\n "]}', 422, '"texts"[1] is empty or whitespace only'),
        (json.dumps({"texts": ["a"] * 9}).encode(), 422, '"texts" holds 9 texts; at most 8 a request'),
        (b'{"texts": ["a"], "top_k": 2}', 422, "unknown field(s) 'top_k'"),
        ("\xff".encode("latin-1"), 400, "the request body is not JSON"),
        (
            json.dumps({"texts": ["x" * 5000]}).encode(),
            413,
            "the request body (5015 bytes) is over 4096 bytes",
        ),
    ]
    for body, status, message in cases:
        got_status, got = request(url, body)
        assert (got_status, message in got["detail"]) == (status, True), (body, got_status, got)
    assert request(url, method="GET")[0] == 405
    assert request(f"{onnx_server}/nowhere")[0] == 404
    assert post(onnx_server, {"texts": ["team wins the match"]})[0] == 200  # still serving


def test_concurrent_load_is_answered_completely_and_correctly(onnx_server: str, expected) -> None:  # type: ignore[no-untyped-def]
    threads, per_thread = 8, 50
    answers: list[tuple[list[str], int, Any]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        try:
            for i in range(per_thread):
                # 1 to 3 texts a request, a different mix in every thread
                texts = [POOL[(k * 7 + i * 3 + j) % len(POOL)] for j in range(1 + (k + i) % 3)]
                status, body = post(onnx_server, {"texts": texts})
                with lock:
                    answers.append((texts, status, body))
        except BaseException as err:  # reported below, with the thread's answers counted
            failures.append(err)

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    assert not failures, failures
    assert len(answers) == threads * per_thread
    for texts, status, body in answers:
        assert status == 200, body
        assert len(body["predictions"]) == len(texts)
        for text, got in zip(texts, body["predictions"], strict=True):
            assert_same(got, expected[text])  # each request got its own texts' answers


def test_a_run_folder_is_served_on_torch(run_and_export: tuple[Path, Path], expected) -> None:  # type: ignore[no-untyped-def]
    with server(run_and_export[0]) as base:
        status, info = request(f"{base}/info")
        assert status == 200 and info["backend"] == "torch" and info["max_texts"] == 256
        assert info["metrics"]["test"]["n"] == 96 and info["budget"]["fits"] is True
        status, body = post(base, {"texts": POOL[:4]})
        assert status == 200
        for text, got in zip(POOL[:4], body["predictions"], strict=True):
            assert_same(got, expected[text])


def test_bad_options_exit_2_before_the_model_loads(run_and_export: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, out = run_and_export
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    onnx_less = tmp_path / "onnx-less"
    onnx_less.mkdir()
    (onnx_less / "export.json").write_text((out / "export.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "export.json").write_text("{")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = str(busy.getsockname()[1])
        cases = [
            ((str(tmp_path / "missing"),), "PATH " + str(tmp_path / "missing") + ": no such folder"),
            ((str(nothing),), "is neither a run folder (config.yaml) nor an export folder (export.json)"),
            ((str(onnx_less),), "the export has no model.onnx; re-export it with --format onnx"),
            ((str(broken),), f"{broken / 'export.json'} cannot be read"),
            ((str(out), "--port", "70000"), "--port 70000: allowed: 1..65535"),
            ((str(out), "--port", busy_port), f"--port {busy_port} on --host 127.0.0.1 is already in use"),
            (
                (str(out), "--host", "no-such-host.invalid"),
                "--host 'no-such-host.invalid': cannot be resolved",
            ),
            ((str(out), "--max-texts", "0"), "invalid value for --max-texts: 0"),
            ((str(out), "--max-wait-ms", "-1"), "invalid value for --max-wait-ms: -1.0 (0 to 10000)"),
            ((str(out), "--max-body-bytes", "0"), "invalid value for --max-body-bytes: 0"),
            ((str(run_dir), "--batch-size", "0"), "invalid value for --batch-size: 0"),
        ]
        for args, message in cases:
            code, stderr = main_exit("serve", *args)
            assert code == 2, (args, stderr)
            assert message in stderr, (args, stderr)
            assert "Traceback" not in stderr


def test_parse_texts() -> None:
    assert parse_texts(b'{"texts": ["a", "b c"]}', 2) == ["a", "b c"]
    with pytest.raises(ValueError, match="at most 1 a request"):
        parse_texts(b'{"texts": ["a", "b"]}', 1)


class _ByLength:
    """A stand-in model for the batcher's own tests: logits from each text's length; records
    how many texts each forward pass got."""

    backend = "stub"
    label_names = ("even", "odd")
    max_length = 8

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def logits(self, texts: list[str]) -> Any:
        import numpy as np

        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=60)
        if any(t == "boom" for t in texts):
            raise RuntimeError("boom")
        self.calls.append(len(texts))
        return np.array([[0.0, 5.0] if len(t) % 2 else [5.0, 0.0] for t in texts], dtype=np.float32)


def test_batcher_shares_forward_passes_and_routes_every_answer() -> None:
    from budgetlora.inference.serve import Batcher, Limits

    gate = threading.Event()
    model = _ByLength(gate)
    batcher = Batcher(model, Limits(batch_size=6, max_wait_ms=0))  # type: ignore[arg-type]
    try:
        first = batcher.submit(["a"])
        assert model.entered.wait(timeout=60)  # the worker scores it alone and waits at the gate
        waiting = [batcher.submit(["bb", "c"]), batcher.submit(["ddd"]), batcher.submit(["ee", "f", "gggg"])]
        gate.set()
        assert first.result(timeout=60).argmax(1).tolist() == [1]
        assert [f.result(timeout=60).argmax(1).tolist() for f in waiting] == [[0, 1], [1], [0, 1, 0]]
        # 1 text alone, then the three waiting requests (6 texts) in one forward pass
        assert model.calls == [1, 6]
        failed = batcher.submit(["boom"])
        with pytest.raises(RuntimeError, match="boom"):
            failed.result(timeout=60)
        assert batcher.submit(["ok"]).result(timeout=60).shape == (1, 2)  # the worker lives on
    finally:
        batcher.close()


def test_a_batch_waits_for_requests_that_arrive_together() -> None:
    from budgetlora.inference.serve import Batcher, Limits

    model = _ByLength()
    batcher = Batcher(model, Limits(batch_size=3, max_wait_ms=5000))  # type: ignore[arg-type]
    try:
        start = time.monotonic()
        futures = [batcher.submit(["a"]), batcher.submit(["bb", "ccc"]), batcher.submit(["dd"])]
        assert [f.result(timeout=60).argmax(1).tolist() for f in futures] == [[1], [0, 1], [0]]
        # the first two fill the batch (3 texts): no waiting out the 5 s; the third waits alone
        assert model.calls == [3, 1]
        assert time.monotonic() - start >= 5 and batcher.batches == 2
    finally:
        batcher.close()
