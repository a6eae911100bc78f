"""The HTTP server: constrained classification over HTTP, every answer logged.

`taskling serve RUN_DIR` loads the run's adapter (and, with `adapters_dir`, every run
directory inside it as a named adapter on the same base model) and answers:

- `POST /v1/classify`: `{"text": ...}` or `{"texts": [...]}`, optional `"adapter"`; returns
  label, probabilities, the cascade stage that decided (`stage`, null outside a cascade),
  model version, latency and a request id.
- `POST /v1/extract`: the same shape for extraction runs; one schema-valid record per text.
- `POST /v1/generate`: generation runs (`task.kind: generate`); one format-held answer per
  text, with `valid`, `n_tokens`, `ms` and an optional request `max_tokens` (`generation.py`).
- `POST /v1/chat/completions`: OpenAI-compatible; the last user message is answered by
  the adapter named in `model`: one label of its set, or (extraction) the record as JSON
  text. `usage`, `logprobs`, `n` and `stream` as `openai_compat.py` says.
- `GET /v1/models` and `GET /v1/models/{model}`: the served adapters, OpenAI's list shape.
- `GET /healthz` (no key needed) and `GET /metrics` (Prometheus; every answered status counted).

The batching engine (`engine.py`) answers a request only after its rows are committed to
the prediction log, so every acknowledged prediction survives a crash. A full queue answers
503 with Retry-After; oversized bodies and requests answer 413. Binding beyond loopback
requires an API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`). Every error has one
JSON shape (`http.py`). Names, exposure and runs are checked before the model loads, and
`on_ready` is called only once the model is loaded and the worker runs.

A run holding `cascade.json` is served as its cascade (every stage loaded, a teacher stage's
endpoint checked at start-up); with `settings.abstain` every classification run answers
`unknown` under its `abstain.json` threshold (a missing one is an error before any model loads).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from taskling.extras import needs

with needs("serve"):  # the server is the `serve` extra: a clear error without it
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

from pydantic import BaseModel, ConfigDict

from taskling.data.load import is_unicode
from taskling.errors import ConfigError, RunError
from taskling.extract.extractor import Extractor
from taskling.generate.generator import Generator
from taskling.rundir import CLASSIFICATION, EXTRACTION, GENERATION, RunDir, read_manifest
from taskling.serve.abstain import AbstainingClassifier, load_threshold
from taskling.serve.classifier import Classifier, load_adapters, set_threads
from taskling.serve.engine import Engine, Job, Outcome, Overloaded
from taskling.serve.generation import add_generate_route, chat_limits
from taskling.serve.http import ApiKey, BodyLimit, StatusCounter, error_body
from taskling.serve.openai_compat import (
    IGNORED_HEADER,
    ChatRequest,
    chat_completion,
    chat_stream,
    ignored_fields,
    last_user_text,
    model_card,
    model_list,
    system_prompt_of,
)
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
ENDPOINTS = (
    "/v1/classify",
    "/v1/extract",
    "/v1/generate",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/models/{model}",
    "/healthz",
    "/metrics",
)


def discover_runs(run_dir: Path, settings: ServeSettings) -> dict[str, Path]:
    """RUN_DIR under `settings.name`, plus every run directory directly inside `adapters_dir`.

    Each must be a finished classification or extraction run (checked here, before any model loads).
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
        kind = read_manifest(path, kind=None).get("kind", CLASSIFICATION)  # a RunError if unfinished
        if kind not in (CLASSIFICATION, EXTRACTION, GENERATION):
            raise RunError(
                f"{path} is a {kind} run; only classification, extraction and generation runs are served",
                fix=f"move {path} out of the served runs",
            )
    return runs


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    texts: list[str] | None = None
    adapter: str | None = None


class Api:
    """What the routes share: picking an adapter and classifying texts through the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings

    def pick(self, name: str | None) -> str:
        name = name or self.settings.name
        if not ADAPTER_NAME.match(name):
            raise HTTPException(400, f"adapter names are {ADAPTER_NAME_RULE}")
        if name not in self.engine.names:
            raise HTTPException(404, f"no adapter named {name!r}; serving: {', '.join(self.engine.names)}")
        return name

    def require(self, name: str, kind: str) -> None:
        """A 400 when the adapter is not of `kind` (a classifier asked to extract, or the reverse)."""
        found = EXTRACTION if name in self.engine.extractors else CLASSIFICATION
        found = GENERATION if name in self.engine.generators else found
        if found != kind:
            route = {EXTRACTION: "/v1/extract", GENERATION: "/v1/generate"}.get(found, "/v1/classify")
            kind_of = {EXTRACTION: "an extraction", GENERATION: "a generation"}.get(found, "a classification")
            raise HTTPException(400, f"adapter {name!r} is {kind_of} run: use {route} or /v1/chat/completions")

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

    async def answer(
        self, adapter: str, texts: list[str], count_tokens: bool = False, max_tokens: int | None = None
    ) -> tuple[Job, Outcome]:
        self.check_texts(texts)
        try:
            job = self.engine.submit(adapter, texts, count_tokens, max_tokens)
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
    add_generate_route(app, Api(engine))
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

    def texts_of(req: ClassifyRequest) -> list[str]:
        return ([req.text] if req.text is not None else []) + list(req.texts or [])

    def head(job: Job, adapter: str, out: Outcome) -> dict[str, Any]:
        return {
            "request_id": job.request_id,
            "adapter": adapter,
            "model_version": out.version,
            "latency_ms": round(out.latency_ms, 3),
        }

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> dict[str, Any]:
        adapter = api.pick(req.adapter)
        api.require(adapter, CLASSIFICATION)
        job, out = await api.answer(adapter, texts_of(req))
        results = [
            {"label": p.label, "probability": p.probability, "probabilities": p.probabilities, "stage": p.stage}
            for p in out.predictions
        ]
        return head(job, adapter, out) | {"results": results}

    @app.post("/v1/extract")
    async def extract(req: ClassifyRequest) -> dict[str, Any]:
        adapter = api.pick(req.adapter)
        api.require(adapter, EXTRACTION)
        job, out = await api.answer(adapter, texts_of(req))
        results = [{"record": e.record, "confidence": e.confidence, "valid": e.valid} for e in out.extractions]
        return head(job, adapter, out) | {"results": results}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Response:
        problem = req.problem()
        if problem is not None:
            raise HTTPException(400, problem)
        adapter = api.pick(req.model)
        text = last_user_text(req.messages)
        if text is None:
            raise HTTPException(400, "the messages hold no user message with text")
        max_tokens, used = chat_limits(engine, adapter, req)
        job, out = await api.answer(adapter, [text], count_tokens=True, max_tokens=max_tokens)
        ignored = [f for f in ignored_fields(req, system_prompt_of(engine, adapter)) if f not in used]
        headers = {IGNORED_HEADER: ", ".join(ignored)} if ignored else None
        if req.stream:
            events = chat_stream(job.request_id, adapter, out, req, ignored)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return JSONResponse(chat_completion(job.request_id, adapter, out, req, ignored), headers=headers)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return model_list(engine)

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        return model_card(engine, api.pick(model))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "queue": engine.queue.qsize()}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def build_engine(run_dir: str | Path, settings: ServeSettings) -> Engine:
    """Check the settings and runs, load every adapter on one base, and open the prediction log."""
    check_settings(settings)
    runs = discover_runs(Path(run_dir), settings)
    extracting = {name: path for name, path in runs.items() if RunDir(path).kind() == EXTRACTION}
    generating = {name: path for name, path in runs.items() if RunDir(path).kind() == GENERATION}
    classifying: dict[str, str | Path] = {
        name: path for name, path in runs.items() if name not in extracting and name not in generating
    }
    if (extracting or generating) and settings.quantize:
        raise ConfigError(
            f"--quantize {settings.quantize} applies to classification runs; "
            f"{', '.join([*extracting, *generating])} extract or generate",
            fix="serve the extraction runs without --quantize (or from a server of their own)",
        )
    set_threads(settings.threads)
    classifiers = load_predictors(classifying, settings)
    # Each extraction run loads its own merged copy of its base (they are not peft-switched).
    extractors = {name: Extractor.from_run(path, dtype=settings.dtype) for name, path in extracting.items()}
    generators = {name: Generator.from_run(path, dtype=settings.dtype) for name, path in generating.items()}
    url = settings.log_url or default_url(run_dir)
    plog = PredictionLog(url, retain_days=settings.retain_days)
    log.info("serving %s; logging predictions to %s", ", ".join(runs), redact(url))
    return Engine(classifiers, plog, settings, extractors, generators)


def load_predictors(runs: dict[str, str | Path], settings: ServeSettings) -> dict[str, Any]:
    """A predictor per classification run: plain runs share one base; a cascade run loads its stages.

    With `settings.abstain`, every run's abstain.json is read before any model loads.
    """
    thresholds = {name: load_threshold(path) for name, path in runs.items()} if settings.abstain else {}
    cascades = [name for name, path in runs.items() if RunDir(path).cascade.is_file()]
    plain = {name: path for name, path in runs.items() if name not in cascades}
    kwargs: dict[str, Any] = {"dtype": settings.dtype, "threads": settings.threads, "quantize": settings.quantize}
    loaded: dict[str, Any] = load_adapters(plain, **kwargs) if plain else {}
    for name in cascades:
        loaded[name] = Classifier.from_run(runs[name], **kwargs)
        check_stages(loaded[name])
    out = {}
    for name in runs:  # in the order the runs were found
        out[name] = AbstainingClassifier(loaded[name], thresholds[name]) if name in thresholds else loaded[name]
    return out


def check_stages(predictor: Any) -> None:
    """Every stage that can check itself (a teacher's endpoint) does, now rather than on the first request."""
    for stage in getattr(predictor, "stages", []):
        model = stage[1] if isinstance(stage, tuple) else stage
        check = getattr(model, "check", None)
        if callable(check):
            check()


def serve(run_dir: str | Path, settings: ServeSettings, on_ready: Callable[[], None] | None = None) -> None:
    """Run the server until interrupted; `on_ready` is called once the model is loaded and serving starts."""
    import uvicorn

    check_settings(settings)  # before the slow model load
    engine = build_engine(run_dir, settings)
    app = create_app(engine, on_ready)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
