"""`budgetlora serve`: an HTTP classifier (FastAPI on uvicorn) over a run or an ONNX export.

One worker thread owns the model. A batch takes the first waiting request and whatever
arrives within ``max_wait_ms`` (and whatever queued up while the last batch ran), up to
``batch_size`` texts, and scores them in one length-sorted forward pass; no two forward
passes compete for the cores.

    GET  /health    {"status": "ok"}
    GET  /info      model, labels, budget, metrics, backend and the serving limits
    POST /classify  {"texts": ["...", ...]} -> {"predictions": [{"label", "label_id", "probabilities"}]}

Under overload a request is refused rather than queued without end: 503 (with Retry-After) when
``max_queue`` texts are waiting already or ``max_connections`` connections are open; 413 for a
body over ``max_body_bytes``; 400 for a body that is not JSON (invalid UTF-8 included).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from budgetlora.errors import BudgetloraError, option, setting
from budgetlora.inference.backends import Classifier, load_classifier
from budgetlora.reporting.metrics import softmax

__all__ = ["Limits", "Batcher", "Busy", "RequestError", "create_app", "parse_texts", "serve", "check_port"]

_Job = tuple[list[str], "Future[np.ndarray]"]


@dataclass(frozen=True)
class Limits:
    """How much one server takes on at once, checked where it is built.

    Attributes:
        max_texts: most texts one request may send
        batch_size: most texts of waiting requests scored in one forward pass
        max_wait_ms: how long a batch waits for more requests after the first, in milliseconds
        max_body_bytes: largest request body, in bytes
        max_queue: most texts waiting to be scored; a request past it gets 503 with Retry-After
        max_connections: most open connections; past it new ones get 503 at once
    """

    max_texts: int = 256
    batch_size: int = 32
    max_wait_ms: float = 5.0
    max_body_bytes: int = 1_000_000
    max_queue: int = 2048
    max_connections: int = 512

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name != "max_wait_ms" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BudgetloraError(f"invalid value for {option(name)}: {value!r} (a positive integer)")
        if not (isinstance(self.max_wait_ms, int | float) and 0 <= self.max_wait_ms <= 10_000):
            raise BudgetloraError(
                f"invalid value for {option('max_wait_ms')}: {self.max_wait_ms!r} (0 to 10000)"
            )


class Busy(Exception):
    """The batcher holds as many texts as it may: the request is refused (503), not queued."""


class Batcher:
    """Scores the texts of many requests in shared batches, on one thread. At most ``max_queue``
    texts wait or are being scored at a time: past that, :meth:`submit` refuses (memory stays
    bounded under any load, and a refused client can come back)."""

    def __init__(self, classifier: Classifier, limits: Limits) -> None:
        self.classifier = classifier
        self.batch_size = limits.batch_size
        self.max_wait_s = limits.max_wait_ms / 1000
        self.max_queue = limits.max_queue
        self.batches = 0  # forward passes run, for /info
        self.refused = 0  # requests refused as busy, for /info
        self._held = 0  # texts submitted and not yet answered
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="budgetlora-batcher", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str]) -> Future[np.ndarray]:
        """A future of the (len(texts), num_labels) class probabilities; :class:`Busy` when
        the texts would take the batcher past ``max_queue``."""
        with self._lock:
            if self._held + len(texts) > self.max_queue:
                self.refused += 1
                raise Busy(
                    f"{self._held} texts are waiting to be scored (at most {self.max_queue}): try again shortly"
                )
            self._held += len(texts)
        future: Future[np.ndarray] = Future()
        self._queue.put((texts, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            count = len(job[0])
            stop = False
            deadline = time.monotonic() + self.max_wait_s
            while count < self.batch_size:
                left = deadline - time.monotonic()
                try:
                    waiting = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stop = True
                    break
                jobs.append(waiting)
                count += len(waiting[0])
            self._score(jobs)
            if stop:
                return

    def _score(self, jobs: list[_Job]) -> None:
        texts = [text for job_texts, _ in jobs for text in job_texts]
        self.batches += 1
        try:
            probs = softmax(self.classifier.logits(texts))  # (len(texts), labels)
        except Exception as err:  # handed to each waiting request: a 500, not a dead worker
            for _, future in jobs:
                future.set_exception(err)
            return
        finally:
            with self._lock:
                self._held -= len(texts)
        start = 0
        for job_texts, future in jobs:
            future.set_result(probs[start : start + len(job_texts)])
            start += len(job_texts)


class RequestError(ValueError):
    """A /classify request that cannot be served: 400 if it is not JSON, else 422."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def parse_texts(body: bytes, max_texts: int) -> list[str]:
    """The texts of a /classify request body; :class:`RequestError` with a message naming the field."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the request body is not JSON: {err}", 400) from None
    if not isinstance(payload, dict) or "texts" not in payload:
        raise RequestError('the request body must be a JSON object with "texts": a list of strings')
    unknown = sorted(set(payload) - {"texts"})
    if unknown:
        raise RequestError(f'unknown field(s) {", ".join(map(repr, unknown))}: only "texts" is read')
    texts = payload["texts"]
    if not isinstance(texts, list) or not texts:
        raise RequestError('"texts" must be a non-empty list of strings')
    if len(texts) > max_texts:
        raise RequestError(f'"texts" holds {len(texts)} texts; at most {max_texts} a request')
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(f'"texts"[{i}] is {type(text).__name__}, not a string')
        if not text.strip():
            raise RequestError(f'"texts"[{i}] is empty or whitespace only: nothing to classify')
    return texts


def _predictions(texts: Sequence[str], probs: np.ndarray, label_names: Sequence[str]) -> list[dict[str, Any]]:
    # The same objects as `budgetlora classify --json`, without the echoed text.
    return [
        {
            "label": label_names[int(p.argmax())],
            "label_id": int(p.argmax()),
            "probabilities": {name: float(x) for name, x in zip(label_names, p, strict=True)},
        }
        for _, p in zip(texts, probs, strict=True)
    ]


def create_app(classifier: Classifier, limits: Limits) -> FastAPI:
    """The FastAPI app; its batcher thread starts now and stops when the app shuts down."""
    batcher = Batcher(classifier, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()
        print("budgetlora serve: stopped", flush=True)

    app = FastAPI(
        title="budgetlora",
        description=f"{classifier.backend} classifier: {', '.join(classifier.label_names)}",
        lifespan=lifespan,
    )
    info = {
        **classifier.details,
        "labels": list(classifier.label_names),
        "backend": classifier.backend,
        "max_length": classifier.max_length,
        **asdict(limits),
    }

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def describe() -> dict[str, Any]:
        return {**info, "forward_passes": batcher.batches, "refused_busy": batcher.refused}

    @app.post("/classify")
    async def classify(request: Request) -> JSONResponse:
        return await _classify(request, batcher, limits, classifier.label_names)

    return app


async def _classify(
    request: Request, batcher: Batcher, limits: Limits, label_names: Sequence[str]
) -> JSONResponse:
    """One /classify request: its texts scored in the batcher's next batch, or the status that says why not."""
    try:
        texts = parse_texts(await _read_body(request, limits.max_body_bytes), limits.max_texts)
    except RequestError as err:
        return JSONResponse({"detail": str(err)}, status_code=err.status_code)
    try:
        probs = await asyncio.wrap_future(batcher.submit(texts))
    except Busy as err:
        return JSONResponse({"detail": f"busy: {err}"}, status_code=503, headers={"Retry-After": "1"})
    except Exception as err:
        return JSONResponse({"detail": f"inference failed: {type(err).__name__}: {err}"}, status_code=500)
    return JSONResponse({"predictions": _predictions(texts, probs, label_names)})


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, read no further than ``limit`` bytes (a chunked body declares no length)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body ({declared} bytes) is over {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body (more than {limit} bytes) is over {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def check_port(host: str, port: int) -> None:
    """Refuse, before any model loads, a port out of range or one that cannot be bound."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BudgetloraError(f"{option('port')} {port!r}: allowed: 1..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise BudgetloraError(f"{option('host')} {host!r}: cannot be resolved ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            why = (
                "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
            )
            raise BudgetloraError(f"{setting('port', port)} on {setting('host', host)} {why}") from None


def serve(
    path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None
) -> None:
    """Serve ``path`` until stopped. SIGTERM or Ctrl-C stops taking new connections and answers
    the requests in flight first.

    Args:
        path: an export folder (budgetlora export) on onnxruntime, or a run folder on torch
        host: address to listen on
        port: port
        limits: how much the server takes on at once (default: :class:`Limits`' defaults)
    """
    import uvicorn

    limits = limits or Limits()
    check_port(host, port)
    classifier = load_classifier(path, batch_size=limits.batch_size)
    app = create_app(classifier, limits)
    print(
        f"budgetlora serve: {path} on {classifier.backend} ({', '.join(classifier.label_names)}) "
        f"at http://{host}:{port}",
        flush=True,
    )
    # Past max_connections open connections uvicorn answers 503 at once rather than hold them.
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=limits.max_connections)
