"""The batching engine behind the server: a bounded queue, one worker thread, the prediction log.

Requests go into a bounded queue; one worker thread takes up to `max_batch` texts (or what
arrives within `max_wait_ms` of the first), classifies them in one batch per adapter, and
hands the rows to the prediction log. A request's future resolves with an `Outcome` whose
`logged` future resolves once its rows are committed. A full queue raises `Overloaded`.

Classification adapters are any predictor with `predict(texts, *, batch_size)`, `version`
and `task`: a `Classifier`, an `AbstainingClassifier` or a cascade. They answer
`Prediction`s, each with the cascade stage that decided it (None outside a cascade), logged
and counted per stage in `/metrics`. Extraction runs (`extractors`) answer
`Extraction`s, one schema-valid record per text, logged with the record's JSON as the label.
Generation runs (`generators`) answer `Generation`s in batches (grouped by the request's
`max_tokens`), logged as `serve/generation.py` says.
With `count_tokens`, the outcome also carries each text's prompt and answer token counts
(the OpenAI `usage` field); they are counted on the worker thread, which owns the tokenizer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from taskling.extract.extractor import Extraction, Extractor
from taskling.generate.generator import Generation, Generator
from taskling.serve.classifier import Prediction, set_threads
from taskling.serve.generation import generate_groups, log_row, token_usage
from taskling.serve.predlog import LogRow, PredictionLog
from taskling.serve.settings import ServeSettings

log = logging.getLogger(__name__)


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
    count_tokens: bool = False
    max_tokens: int | None = None  # a generation request's answer budget (None: the task's)


@dataclass
class Outcome:
    predictions: list[Prediction]
    version: str
    latency_ms: float
    logged: Future[int]
    extractions: list[Extraction] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)  # per text, with count_tokens
    generations: list[Generation] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)  # the answer's tokens, end-of-turn included


LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
NO_STAGE = "none"  # the `stage` label of answers from a plain (non-cascade) run


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
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "taskling_batch_texts",
            "Texts per worker batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.stages = Counter(
            "taskling_stage_answers", "Answers by adapter and deciding cascade stage", ["adapter", "stage"],
            registry=self.registry,
        )  # fmt: skip
        self.stage_latency = Histogram(
            "taskling_stage_latency_seconds",
            "Queue + inference time of each answer, by the cascade stage that decided it",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Gauge("taskling_queue_depth", "Requests waiting", registry=self.registry)
        self.rejected = Counter("taskling_rejected", "Requests refused", ["reason"], registry=self.registry)


class Engine:
    """The bounded queue, the batching worker thread and the prediction log."""

    def __init__(
        self,
        classifiers: dict[str, Any],  # name -> predictor (Classifier, AbstainingClassifier, Cascade)
        plog: PredictionLog,
        settings: ServeSettings,
        extractors: dict[str, Extractor] | None = None,
        generators: dict[str, Generator] | None = None,
    ) -> None:
        self.classifiers = classifiers
        self.extractors = extractors or {}
        self.generators = generators or {}
        self.loaded_at = int(time.time())
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

    @property
    def names(self) -> list[str]:
        """Every served adapter name, classification runs first."""
        return [*self.classifiers, *self.extractors, *self.generators]

    def submit(self, adapter: str, texts: list[str], count_tokens: bool = False, max_tokens: int | None = None) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(adapter, texts, loop.create_future(), loop, count_tokens=count_tokens, max_tokens=max_tokens)
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
                        job.loop.call_soon_threadsafe(settle, job.future, None, err)

    def _run(self, adapter: str, jobs: list[Job]) -> None:
        if adapter in self.extractors:
            self._run_extraction(adapter, jobs)
            return
        if adapter in self.generators:
            self._run_generation(adapter, jobs)
            return
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
                    job.request_id,
                    adapter,
                    clf.version,
                    p.text,
                    p.label,
                    p.probability,
                    p.probabilities,
                    latency_ms,
                    stage=p.stage,
                )
                for p in mine
            ]
            self._count(adapter, mine, latency_ms)
            outcome = Outcome(mine, clf.version, latency_ms, self.plog.submit(rows))
            if job.count_tokens:
                outcome.prompt_tokens, outcome.completion_tokens = token_counts(clf, mine)
            job.loop.call_soon_threadsafe(settle, job.future, outcome, None)

    def _count(self, adapter: str, predictions: list[Prediction], latency_ms: float) -> None:
        for p in predictions:
            stage = p.stage or NO_STAGE
            self.metrics.predictions.labels(adapter, p.label).inc()
            self.metrics.stages.labels(adapter, stage).inc()
            self.metrics.stage_latency.labels(stage).observe(latency_ms / 1000)
        self.metrics.latency.observe(latency_ms / 1000)

    def _run_extraction(self, adapter: str, jobs: list[Job]) -> None:
        ext = self.extractors[adapter]
        self.metrics.batch.observe(sum(len(job.texts) for job in jobs))
        for job in jobs:  # the constrained decoder takes one text at a time
            found = ext.extract(job.texts)
            latency_ms = (time.perf_counter() - job.enqueued) * 1000
            rows = []
            for e in found:
                joint = math.prod(e.confidence.values())
                answer = ext.task.render(e.record)
                rows.append(
                    LogRow(job.request_id, adapter, ext.version, e.text, answer, joint, e.confidence, latency_ms)
                )
                self.metrics.predictions.labels(adapter, "valid" if e.valid else "invalid").inc()
            self.metrics.latency.observe(latency_ms / 1000)
            outcome = Outcome([], ext.version, latency_ms, self.plog.submit(rows), extractions=found)
            if job.count_tokens:
                outcome.prompt_tokens = [len(ext.fmt.prompt_ids(e.text)) for e in found]
                outcome.completion_tokens = [len(ext.fmt.answer_ids(e.record)) for e in found]
            job.loop.call_soon_threadsafe(settle, job.future, outcome, None)

    def _run_generation(self, adapter: str, jobs: list[Job]) -> None:
        gen = self.generators[adapter]
        self.metrics.batch.observe(sum(len(job.texts) for job in jobs))
        answers = generate_groups(gen, [(job.texts, job.max_tokens) for job in jobs], self.settings.max_batch)
        done = time.perf_counter()
        for job, mine in zip(jobs, answers, strict=True):
            latency_ms = (done - job.enqueued) * 1000
            rows = [log_row(job.request_id, adapter, gen.version, g, latency_ms) for g in mine]
            for g in mine:
                self.metrics.predictions.labels(adapter, "valid" if g.valid else "invalid").inc()
            self.metrics.latency.observe(latency_ms / 1000)
            outcome = Outcome([], gen.version, latency_ms, self.plog.submit(rows), generations=mine)
            if job.count_tokens:
                outcome.prompt_tokens, outcome.completion_tokens = token_usage(gen, mine)
            job.loop.call_soon_threadsafe(settle, job.future, outcome, None)


def token_counts(clf: Any, predictions: list[Prediction]) -> tuple[list[int], list[int]]:
    """Prompt and answer tokens per text (OpenAI `usage`); zeros for a predictor without a chat format
    (a cascade whose answer came from a stage that reads no prompt)."""
    fmt = getattr(clf, "fmt", None)
    if fmt is None:
        return [0] * len(predictions), [0] * len(predictions)
    return [len(fmt.prompt_ids(p.text)) for p in predictions], [len(fmt.answer_ids(p.label)) for p in predictions]


def settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the client went away; its prediction is still logged
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
