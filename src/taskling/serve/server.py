"""The HTTP server: constrained classification over HTTP, every answer logged.

`taskling serve RUN_DIR` loads the run's adapter (and, with `adapters_dir`, every run
directory inside it as a named adapter on the same base model) and answers:

- `POST /v1/classify`: `{"text": ...}` or `{"texts": [...]}`, optional `"adapter"`; returns
  label, probabilities, model version, latency and a request id.
- `POST /v1/chat/completions`: OpenAI-compatible; the last user message is classified by
  the adapter named in `model`, and the assistant's answer is always one label of its set.
- `GET /healthz` (no key needed) and `GET /metrics` (Prometheus; every answered status counted).

The batching engine (`engine.py`) answers a request only after its rows are committed to
the prediction log, so every acknowledged prediction survives a crash. A full queue answers
503 with Retry-After; oversized bodies and requests answer 413. Binding beyond loopback
requires an API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`). Every error has one
JSON shape (`http.py`). Names, exposure and runs are checked before the model loads, and
`on_ready` is called only once the model is loaded and the worker runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskling.data.load import is_unicode
from taskling.errors import RunError
from taskling.rundir import RunDir, read_manifest
from taskling.serve.classifier import load_adapters
from taskling.serve.engine import Engine, Job, Outcome, Overloaded
from taskling.serve.http import ApiKey, BodyLimit, StatusCounter, error_body
from taskling.serve.predlog import PredictionLog, default_url, redact
from taskling.serve.settings import (
    ADAPTER_NAME,
    ADAPTER_NAME_RULE,
    ServeSettings,
    check_exposure,
    check_name,
    check_settings,
)

log = logging.getLogger(__name__)

__all__ = ["ADAPTER_NAME", "ServeSettings", "build_engine", "check_exposure", "create_app", "discover_runs", "serve"]
ENDPOINTS = ("/v1/classify", "/v1/chat/completions", "/healthz", "/metrics")


def discover_runs(run_dir: Path, settings: ServeSettings) -> dict[str, Path]:
    """RUN_DIR under `settings.name`, plus every run directory directly inside `adapters_dir`.

    Each must be a finished classification run (checked here, before any model loads).
    """
    check_name(settings.name)
    runs = {settings.name: run_dir}
    if settings.adapters_dir is not None:
        root = settings.adapters_dir.resolve()
        if not root.is_dir():
            raise RunError(f"adapters directory {root} does not exist", fix="check --adapters-dir")
        for child in sorted(root.iterdir()):
            if not RunDir(child).manifest.is_file():
                continue
            if not ADAPTER_NAME.match(child.name) or not child.resolve().is_relative_to(root):
                log.warning("skipping adapter %r: its name or its target lies outside %s", child.name, root)
                continue
            if child.name in runs:
                raise RunError(f"adapter name {child.name!r} is used twice", fix=f"rename {child}")
            runs[child.name] = child
    for path in runs.values():
        read_manifest(path)  # a RunError naming the run if it is unfinished or not a classifier
    return runs


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


class Api:
    """What the routes share: picking an adapter and classifying texts through the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings

    def pick(self, name: str | None) -> str:
        name = name or self.settings.name
        if not ADAPTER_NAME.match(name):
            raise HTTPException(400, f"adapter names are {ADAPTER_NAME_RULE}")
        if name not in self.engine.classifiers:
            raise HTTPException(404, f"no adapter named {name!r}; serving: {', '.join(self.engine.classifiers)}")
        return name

    def check_texts(self, texts: list[str]) -> None:
        limits = self.settings
        if not texts:
            raise HTTPException(422, "give `text` or a non-empty `texts`")
        if not all(is_unicode(t) for t in texts):  # would fail the whole log commit it joins
            raise HTTPException(422, "a text holds an unpaired surrogate escape (not valid Unicode)")
        if len(texts) > limits.max_texts:
            self.engine.metrics.rejected.labels("too_large").inc()
            raise HTTPException(413, f"at most {limits.max_texts} texts per request")
        if any(len(t) > limits.max_text_chars for t in texts):
            self.engine.metrics.rejected.labels("too_large").inc()
            raise HTTPException(413, f"a text is over {limits.max_text_chars} characters")

    async def classify(self, adapter: str, texts: list[str]) -> tuple[Job, Outcome]:
        self.check_texts(texts)
        try:
            job = self.engine.submit(adapter, texts)
        except Overloaded:
            retry = {"Retry-After": str(self.settings.retry_after_s)}
            raise HTTPException(503, "the queue is full; retry shortly", headers=retry) from None
        outcome: Outcome = await job.future
        await asyncio.wrap_future(outcome.logged)  # acknowledged only once committed
        return job, outcome


def create_app(engine: Engine, on_ready: Callable[[], None] | None = None) -> Any:
    """The FastAPI app over a started-or-not engine (started and stopped by the app's lifespan).

    `on_ready` is called once the engine runs, i.e. after the model is loaded.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        engine.start()
        if on_ready is not None:
            on_ready()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="taskling", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_middleware(app, engine)
    add_error_handlers(app)
    add_routes(app, Api(engine))
    return app


def add_middleware(app: FastAPI, engine: Engine) -> None:
    """Body limit inside, API key around it, the status counter outermost (it sees 401 and 413 too)."""
    settings, metrics = engine.settings, engine.metrics
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_reject=metrics.rejected.labels("too_large").inc)
    if settings.api_key is not None:  # a request without the key is refused before its body is read
        key = settings.api_key.get_secret_value().encode()
        app.add_middleware(ApiKey, key=key, on_reject=metrics.rejected.labels("auth").inc)

    def count(endpoint: str, status: int) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()

    app.add_middleware(StatusCounter, count=count, endpoints=ENDPOINTS)


def add_error_handlers(app: FastAPI) -> None:
    """Route errors, unknown paths and invalid bodies all answer the one error shape."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the input, which fails to render for Infinity/NaN (a 500).
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        message = "invalid request body" + (f": {where}: {first.get('msg', '')}" if where else "")
        return JSONResponse(error_body(422, message, param=where), 422)


def add_routes(app: FastAPI, api: Api) -> None:
    engine = api.engine

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> dict[str, Any]:
        adapter = api.pick(req.adapter)
        texts = ([req.text] if req.text is not None else []) + list(req.texts or [])
        job, out = await api.classify(adapter, texts)
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
        adapter = api.pick(req.model)
        text = last_user_text(req.messages)
        if text is None:
            raise HTTPException(400, "the messages hold no user message with text")
        job, out = await api.classify(adapter, [text])
        return chat_completion(job, out, adapter)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "queue": engine.queue.qsize()}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def chat_completion(job: Job, out: Outcome, adapter: str) -> dict[str, Any]:
    """An OpenAI chat.completion whose assistant message is the predicted label."""
    pred = out.predictions[0]
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
    """Check the settings and runs, load every adapter on one base, and open the prediction log."""
    check_settings(settings)
    runs = discover_runs(Path(run_dir), settings)
    classifiers = load_adapters(
        dict(runs),
        dtype=settings.dtype,
        threads=settings.threads,
        quantize=settings.quantize,
    )
    url = settings.log_url or default_url(run_dir)
    plog = PredictionLog(url, retain_days=settings.retain_days)
    log.info("serving %s; logging predictions to %s", ", ".join(classifiers), redact(url))
    return Engine(classifiers, plog, settings)


def serve(run_dir: str | Path, settings: ServeSettings, on_ready: Callable[[], None] | None = None) -> None:
    """Run the server until interrupted; `on_ready` is called once the model is loaded and serving starts."""
    import uvicorn

    check_settings(settings)  # before the slow model load
    engine = build_engine(run_dir, settings)
    app = create_app(engine, on_ready)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
