"""The HTTP server: constrained classification over HTTP, every answer logged.

`taskling serve RUN_DIR` loads the run's adapter (and, with `adapters_dir`, every run
directory inside it as a named adapter on the same base model) and answers:

- `POST /v1/classify`: `{"text": ...}` or `{"texts": [...]}`, optional `"adapter"`; returns
  label, probabilities, model version, latency and a request id.
- `POST /v1/chat/completions`: OpenAI-compatible; the last user message is classified by
  the adapter named in `model`, and the assistant's answer is always one label of its set.
- `GET /healthz` (no key needed) and `GET /metrics` (Prometheus).

Requests go into a bounded queue; one worker thread takes up to `max_batch` texts (or what
arrives within `max_wait_ms` of the first), classifies them in one batch per adapter, and
hands the rows to the prediction log (`predlog.py`). A request is answered only after its
rows are committed, so every acknowledged prediction survives a crash. A full queue
answers 503 with Retry-After; oversized bodies and requests answer 413. Binding beyond
loopback requires an API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from taskling.data.load import is_unicode
from taskling.errors import ConfigError, RunError
from taskling.serve.classifier import Classifier, Prediction, load_adapters, set_threads
from taskling.serve.predlog import LogRow, PredictionLog, default_url, redact

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ServeSettings(BaseModel):
    """Server settings; every limit has a default that suits one CPU box."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None  # a SecretStr never prints its value
    name: str = "default"  # the adapter name of RUN_DIR itself
    adapters_dir: Path | None = None  # each sub-directory: a run on the same base, served by its name
    log_url: str | None = None  # SQLAlchemy URL; default sqlite RUN_DIR/predictions.db
    max_batch: int = Field(32, ge=1)  # texts per forward pass
    max_wait_ms: float = Field(2.0, ge=0)  # how long the worker waits to fill a batch
    max_queue: int = Field(256, ge=1)  # requests waiting; beyond: 503
    max_texts: int = Field(64, ge=1)  # texts per request; beyond: 413
    max_text_chars: int = Field(20_000, ge=1)  # characters per text; beyond: 413
    max_body_bytes: int = Field(1_000_000, ge=1024)  # request body; beyond: 413
    retry_after_s: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)
    dtype: str = "auto"
    quantize: Literal["int8"] | None = None  # dynamic int8 on the CPU (predict.quantize_int8)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def check_exposure(settings: ServeSettings) -> None:
    """Refuse to bind beyond loopback without an API key."""
    if not is_loopback(settings.host) and settings.api_key is None:
        raise ConfigError(
            f"refusing to listen on {settings.host} without an API key",
            fix="set TASKLING_API_KEY (or --api-key-file), or bind to 127.0.0.1",
        )


def discover_runs(run_dir: Path, settings: ServeSettings) -> dict[str, Path]:
    """RUN_DIR under `settings.name`, plus every run directory directly inside `adapters_dir`."""
    runs = {settings.name: run_dir}
    if settings.adapters_dir is None:
        return runs
    root = settings.adapters_dir.resolve()
    if not root.is_dir():
        raise RunError(f"adapters directory {root} does not exist")
    for child in sorted(root.iterdir()):
        if not (child / "run.json").is_file():
            continue
        if not ADAPTER_NAME.match(child.name) or not child.resolve().is_relative_to(root):
            log.warning("skipping adapter %r: its name or its target lies outside %s", child.name, root)
            continue
        if child.name in runs:
            raise RunError(f"adapter name {child.name!r} is used twice", fix=f"rename {child}")
        runs[child.name] = child
    return runs


class Overloaded(Exception):
    pass


@dataclass
class Job:
    adapter: str
    texts: list[str]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Outcome:
    predictions: list[Prediction]
    version: str
    latency_ms: float
    logged: Future[int]


class Metrics:
    """Prometheus metrics in a registry of their own (one per server)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "taskling_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.predictions = Counter(
            "taskling_predictions", "Predictions by adapter and label", ["adapter", "label"], registry=self.registry
        )
        self.latency = Histogram(
            "taskling_request_latency_seconds",
            "Queue + inference time per request",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.batch = Histogram(
            "taskling_batch_texts",
            "Texts per worker batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.queue = Gauge("taskling_queue_depth", "Requests waiting", registry=self.registry)
        self.rejected = Counter("taskling_rejected", "Requests refused", ["reason"], registry=self.registry)


class Engine:
    """The bounded queue, the batching worker thread and the prediction log."""

    def __init__(self, classifiers: dict[str, Classifier], plog: PredictionLog, settings: ServeSettings) -> None:
        self.classifiers = classifiers
        self.plog = plog
        self.settings = settings
        self.metrics = Metrics()
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="taskling-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.plog.close()

    def submit(self, adapter: str, texts: list[str]) -> Job:
        job = Job(adapter, texts, asyncio.get_running_loop().create_future(), asyncio.get_running_loop())
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded from None
        self.metrics.queue.set(self.queue.qsize())
        return job

    def _take_batch(self) -> list[Job]:
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs, n = [first], len(first.texts)
        deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
        while n < self.settings.max_batch:
            try:
                job = self.queue.get(timeout=max(deadline - time.perf_counter(), 0.0))
            except queue.Empty:
                break
            jobs.append(job)
            n += len(job.texts)
        return jobs

    def _work(self) -> None:
        set_threads(self.settings.threads)  # OpenMP thread counts are per calling thread
        while not self._stop.is_set():
            jobs = self._take_batch()
            self.metrics.queue.set(self.queue.qsize())
            by_adapter: dict[str, list[Job]] = {}
            for job in jobs:
                by_adapter.setdefault(job.adapter, []).append(job)
            for adapter, group in by_adapter.items():
                try:
                    self._run(adapter, group)
                except Exception as err:  # answer 500 rather than leave requests hanging
                    log.exception("batch for adapter %s failed", adapter)
                    for job in group:
                        job.loop.call_soon_threadsafe(_settle, job.future, None, err)

    def _run(self, adapter: str, jobs: list[Job]) -> None:
        clf = self.classifiers[adapter]
        texts = [t for job in jobs for t in job.texts]
        self.metrics.batch.observe(len(texts))
        preds = clf.predict(texts, batch_size=self.settings.max_batch)
        done = time.perf_counter()
        start = 0
        for job in jobs:
            mine = preds[start : start + len(job.texts)]
            start += len(job.texts)
            latency_ms = (done - job.enqueued) * 1000
            rows = [
                LogRow(
                    job.request_id, adapter, clf.version, p.text, p.label, p.probability, p.probabilities, latency_ms
                )
                for p in mine
            ]
            for p in mine:
                self.metrics.predictions.labels(adapter, p.label).inc()
            self.metrics.latency.observe(latency_ms / 1000)
            outcome = Outcome(mine, clf.version, latency_ms, self.plog.submit(rows))
            job.loop.call_soon_threadsafe(_settle, job.future, outcome, None)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the client went away; its prediction is still logged
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


# ------------------------------------------------------------------ HTTP


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    texts: list[str] | None = None
    adapter: str | None = None


class ChatRequest(BaseModel):
    # OpenAI clients send many optional fields; unknown ones are accepted and ignored.
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict[str, Any]]
    stream: bool = False
    n: int = 1


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes answers 413 before any parsing."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _send_json(send, 413, f"request body over {self.limit} bytes")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _send_json(send, 413, f"request body over {self.limit} bytes")
                return
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKey:
    """ASGI middleware: every path but /healthz needs `Authorization: Bearer KEY` or `X-API-Key: KEY`."""

    def __init__(self, app: Any, key: bytes, on_reject: Callable[[], None]) -> None:
        self.app = app
        self.key = key
        self.on_reject = on_reject

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if not hmac.compare_digest(given, self.key):  # constant time
            self.on_reject()
            await _send_json(send, 401, "missing or wrong API key", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


async def _send_json(send: Any, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    import json

    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(engine: Engine) -> Any:
    """The FastAPI app over a started-or-not engine (started and stopped by the app's lifespan)."""
    settings = engine.settings
    key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="taskling", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if key is not None:  # outermost: a request without the key is refused before its body is read
        app.add_middleware(ApiKey, key=key, on_reject=engine.metrics.rejected.labels("auth").inc)

    @app.exception_handler(HTTPException)
    async def _error(request: Request, exc: HTTPException) -> JSONResponse:
        endpoint = request.url.path
        engine.metrics.requests.labels(endpoint, str(exc.status_code)).inc()
        body = {"error": {"message": exc.detail, "code": exc.status_code}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the input, which fails to render for Infinity/NaN (a 500).
        engine.metrics.requests.labels(request.url.path, "422").inc()
        details = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        return JSONResponse({"error": {"message": "invalid request body", "code": 422, "details": details}}, 422)

    def pick(name: str | None) -> str:
        name = name or settings.name
        if not ADAPTER_NAME.match(name):
            raise HTTPException(400, "adapter names are letters, digits, '_', '.', '-' (at most 64)")
        if name not in engine.classifiers:
            raise HTTPException(404, f"no adapter named {name!r}; serving: {', '.join(engine.classifiers)}")
        return name

    async def classify_texts(adapter: str, texts: list[str]) -> tuple[Job, Outcome]:
        if not texts:
            raise HTTPException(422, "give `text` or a non-empty `texts`")
        if not all(is_unicode(t) for t in texts):  # would fail the whole log commit it joins
            raise HTTPException(422, "a text holds an unpaired surrogate escape (not valid Unicode)")
        if len(texts) > settings.max_texts:
            engine.metrics.rejected.labels("too_large").inc()
            raise HTTPException(413, f"at most {settings.max_texts} texts per request")
        if any(len(t) > settings.max_text_chars for t in texts):
            engine.metrics.rejected.labels("too_large").inc()
            raise HTTPException(413, f"a text is over {settings.max_text_chars} characters")
        try:
            job = engine.submit(adapter, texts)
        except Overloaded:
            raise HTTPException(
                503, "the queue is full; retry shortly", headers={"Retry-After": str(settings.retry_after_s)}
            ) from None
        outcome: Outcome = await job.future
        await asyncio.wrap_future(outcome.logged)  # acknowledged only once committed
        return job, outcome

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> dict[str, Any]:
        adapter = pick(req.adapter)
        texts = ([req.text] if req.text is not None else []) + list(req.texts or [])
        job, out = await classify_texts(adapter, texts)
        engine.metrics.requests.labels("/v1/classify", "200").inc()
        return {
            "request_id": job.request_id,
            "adapter": adapter,
            "model_version": out.version,
            "latency_ms": round(out.latency_ms, 3),
            "results": [
                {"label": p.label, "probability": p.probability, "probabilities": p.probabilities}
                for p in out.predictions
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> dict[str, Any]:
        if req.stream or req.n != 1:
            raise HTTPException(400, "stream and n>1 are not supported: the answer is a single label")
        adapter = pick(req.model)
        text = last_user_text(req.messages)
        if text is None:
            raise HTTPException(400, "the messages hold no user message with text")
        job, out = await classify_texts(adapter, [text])
        pred = out.predictions[0]
        engine.metrics.requests.labels("/v1/chat/completions", "200").inc()
        return {
            "id": f"chatcmpl-{job.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": adapter,
            "system_fingerprint": out.version,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": pred.label},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "taskling": {
                "probabilities": pred.probabilities,
                "model_version": out.version,
                "latency_ms": round(out.latency_ms, 3),
            },
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "queue": engine.queue.qsize()}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def last_user_text(messages: list[dict[str, Any]]) -> str | None:
    """The last user turn's text; OpenAI content parts of type text are joined."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = [
                p["text"]
                for p in content
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            ]
            return "\n".join(parts)
    return None


def build_engine(run_dir: str | Path, settings: ServeSettings) -> Engine:
    """Load every adapter on one base and open the prediction log."""
    check_exposure(settings)
    runs = discover_runs(Path(run_dir), settings)
    classifiers = load_adapters(
        dict(runs),
        dtype=settings.dtype,
        threads=settings.threads,
        quantize=settings.quantize,
    )
    url = settings.log_url or default_url(run_dir)
    plog = PredictionLog(url)
    log.info("serving %s; logging predictions to %s", ", ".join(classifiers), redact(url))
    return Engine(classifiers, plog, settings)


def serve(run_dir: str | Path, settings: ServeSettings) -> None:
    """Run the server until interrupted."""
    import uvicorn

    check_exposure(settings)  # before the slow model load
    engine = build_engine(run_dir, settings)
    app = create_app(engine)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
