"""`budgetlora serve` under overload, as a real uvicorn process on 127.0.0.1: many concurrent
clients against a small queue (every answer right or a clear 503, memory bounded), slow
clients, bodies over the limit or not UTF-8, and SIGTERM while requests are in flight."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections import Counter
from typing import Any

import psutil
import pytest

from commands import post, request, serving
from conftest import SERVE_POOL as POOL
from test_serve import assert_same

pytestmark = pytest.mark.slow


def _post(conn: http.client.HTTPConnection, texts: list[str]) -> tuple[int, dict[str, Any], str | None]:
    """(status, JSON body, Retry-After) of one /classify request on a kept-alive connection."""
    conn.request("POST", "/classify", json.dumps({"texts": texts}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read()), response.getheader("Retry-After")


def test_many_clients_against_a_small_queue_get_answers_or_503(run_and_export, expected) -> None:  # type: ignore[no-untyped-def]
    """64 clients, 2,560 requests of 1 to 4 texts, a queue of 16 texts: each answer is the right
    one or a 503 that says busy; the server's memory does not grow with the load."""
    clients, per_client = 64, 40
    options = ("--max-queue", "16", "--batch-size", "8", "--max-texts", "8")
    with serving(run_and_export[1], *options) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        server_memory = psutil.Process(proc.pid)
        post(base, {"texts": POOL[:4]})  # warm: the first forward pass allocates its buffers
        rss_before = server_memory.memory_info().rss
        answers: list[tuple[list[str], int, dict[str, Any], str | None, float]] = []
        failures: list[BaseException] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                for i in range(per_client):
                    texts = [POOL[(k * 5 + i * 3 + j) % len(POOL)] for j in range(1 + (k + i) % 4)]
                    start = time.perf_counter()
                    status, body, retry = _post(conn, texts)
                    with lock:
                        answers.append((texts, status, body, retry, time.perf_counter() - start))
            except BaseException as err:  # reported below
                failures.append(err)
            finally:
                conn.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        rss_after = server_memory.memory_info().rss
        info = request(f"{base}/info")[1]
    assert not failures, failures[:3]
    assert len(answers) == clients * per_client
    statuses = Counter(status for _, status, _, _, _ in answers)
    assert set(statuses) == {200, 503}, statuses  # the small queue refused some, and served the others
    for texts, status, body, retry, _ in answers:
        if status == 503:
            assert body["detail"].startswith("busy: ") and retry == "1", body
            continue
        assert len(body["predictions"]) == len(texts)
        for text, got in zip(texts, body["predictions"], strict=True):
            assert_same(got, expected[text])
    assert info["refused_busy"] == statuses[503] and info["max_queue"] == 16
    assert rss_after - rss_before < 200 * 2**20, (rss_before, rss_after)  # bounded, not one copy per request


def _raw_request(port: int, body: bytes, *, headers: str = "") -> socket.socket:
    """A socket that has sent a /classify request line and headers, and no body yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
    sock.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode())
    return sock


def _response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    head, payload = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(payload)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_slow_clients_big_bodies_and_bad_bytes(run_and_export, expected) -> None:  # type: ignore[no-untyped-def]
    with serving(run_and_export[1], "--max-body-bytes", "4096") as (base, _):
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"texts": POOL[:2]}).encode()
        slow = _raw_request(port, body)
        slow.sendall(body[:10])  # a client that sends its body slowly holds no one else up
        start = time.perf_counter()
        status, answer = post(base, {"texts": POOL[2:3]})
        assert status == 200 and time.perf_counter() - start < 30
        assert_same(answer["predictions"][0], expected[POOL[2]])
        time.sleep(1.0)
        slow.sendall(body[10:])
        status, answer = _response(slow)
        assert status == 200 and [p["label"] for p in answer["predictions"]] == [
            expected[t]["label"] for t in POOL[:2]
        ]

        # A chunked body declares no length: it is read up to the limit, then refused.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/classify", body=iter([b'{"texts": ["' + b"x" * 3000, b"y" * 3000 + b'"]}']))
        response = conn.getresponse()
        detail = json.loads(response.read())["detail"]
        assert response.status == 413 and "over 4096 bytes" in detail
        conn.close()
        status, answer = request(f"{base}/classify", b'{"texts": ["caf\xe9 \xff"]}')  # not UTF-8
        assert status == 400 and "not JSON" in answer["detail"]
        assert post(base, {"texts": POOL[:1]})[0] == 200  # and the server serves on


def test_sigterm_answers_the_requests_in_flight_then_stops(run_and_export, expected) -> None:  # type: ignore[no-untyped-def]
    with serving(run_and_export[1]) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        bodies = [json.dumps({"texts": [text]}).encode() for text in POOL[:8]]
        in_flight = [_raw_request(port, body) for body in bodies]
        for sock, body in zip(in_flight, bodies, strict=True):
            sock.sendall(body[:5])
        time.sleep(0.5)  # the server has read their headers: these requests are in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(OSError):  # no new connection is taken
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        for sock, body in zip(in_flight, bodies, strict=True):
            sock.sendall(body[5:])
        answers = [_response(sock) for sock in in_flight]
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    for text, (status, answer) in zip(POOL[:8], answers, strict=True):
        assert status == 200, answer
        assert_same(answer["predictions"][0], expected[text])


def test_the_batcher_refuses_past_its_queue() -> None:
    """The queue bound on its own: texts held while the model works count until answered."""
    import numpy as np

    from budgetlora.inference.serve import Batcher, Busy, Limits

    release = threading.Event()

    class Slow:
        label_names = ("a", "b")

        def logits(self, texts: list[str]) -> np.ndarray:
            release.wait(timeout=30)
            return np.zeros((len(texts), 2), dtype=np.float32)

    batcher = Batcher(Slow(), Limits(batch_size=4, max_wait_ms=0, max_queue=5))  # type: ignore[arg-type]
    first = batcher.submit(["a", "b", "c"])
    second = batcher.submit(["d", "e"])
    with pytest.raises(Busy, match="5 texts are waiting"):
        batcher.submit(["f"])
    release.set()
    assert first.result(timeout=30).shape == (3, 2) and second.result(timeout=30).shape == (2, 2)
    assert batcher.submit(["f"]).result(timeout=30).shape == (1, 2)  # room again once answered
    assert batcher.refused == 1
    batcher.close()
