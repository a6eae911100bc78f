"""Ask a bigger model: label texts and write synthetic examples via any OpenAI-compatible API.

The endpoint comes from the environment: `TASKLING_TEACHER_BASE_URL` (else `OPENAI_BASE_URL`),
`TASKLING_TEACHER_API_KEY` (else `OPENAI_API_KEY`), `TASKLING_TEACHER_MODEL` (else
`gpt-4o-mini`). The key is sent as a bearer token and never logged or cached.

Every response is cached on disk under a hash of the request, so a rerun costs nothing;
`Usage` counts requests, cache hits, retries and prompt/completion tokens (as the endpoint reports).

Requests run concurrently (`concurrency`, default 8, bounded by a thread pool sharing one
HTTP connection pool); answers come back in input order whatever order they finish in.
Rate limits, server errors and timeouts are retried with backoff (`retry.py`), honouring
`Retry-After`; after the last retry the error names the status and what to do.

- `label_texts` writes teacher-log rows (text, label, confidence from the answer's token
  logprobs when the endpoint gives them) that `taskling distill` then cleans.
- `synthesize` asks for diverse examples per category; each must have a label in the set,
  be new (not a duplicate of another synthetic row) and not copy the frozen gold set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskling.data.clean import CleanConfig
from taskling.data.dedupe import find_leaks, normalize
from taskling.data.distill import confidence_from_logprobs
from taskling.data.load import Example, is_unicode
from taskling.data.retry import RETRY_STATUSES, RetryPolicy
from taskling.errors import DataError, TasklingError
from taskling.io import read_json, scan_jsonl, write_json
from taskling.task import Task

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_CONCURRENCY = 8
Progress = Callable[[int, int], None]  # (done, total)


class TeacherError(TasklingError):
    """The teacher endpoint is not configured or did not answer usefully."""

    status: int | None = None  # the last HTTP status, when the teacher answered one


@dataclass
class Usage:
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def default_cache_dir() -> Path:
    root = os.environ.get("TASKLING_CACHE") or Path.home() / ".cache" / "taskling"
    return Path(root) / "teacher"


class TeacherClient:
    """A chat-completions client with an on-disk response cache, retries and bounded concurrency.

    Thread-safe: `chat_many` calls `chat` from a pool of `concurrency` threads.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        *,
        cache_dir: str | Path | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        sleep: Callable[[float], None] | None = None,
        seed: int | None = None,
    ) -> None:
        env = os.environ.get
        self.base_url = (base_url or env("TASKLING_TEACHER_BASE_URL") or env("OPENAI_BASE_URL") or "").rstrip("/")
        self._api_key = api_key or env("TASKLING_TEACHER_API_KEY") or env("OPENAI_API_KEY") or ""
        self.model = model or env("TASKLING_TEACHER_MODEL") or DEFAULT_MODEL
        if not self.base_url:
            raise TeacherError(
                "no teacher endpoint configured",
                fix="export TASKLING_TEACHER_BASE_URL=https://host/v1 (and TASKLING_TEACHER_API_KEY)",
            )
        if concurrency < 1:
            raise TeacherError(f"concurrency must be at least 1, got {concurrency}", fix="use --concurrency 1 or more")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.concurrency = concurrency
        self.usage = Usage()
        self._sleep = sleep  # tests record the waits instead of sleeping through them
        self._abort = threading.Event()  # set when one request of a batch failed: the others stop retrying
        self._rng = random.Random(seed)  # jitter
        self._lock = threading.Lock()
        self._http: Any = None  # one httpx.Client (a connection pool), shared by the threads

    def __repr__(self) -> str:  # never show the key
        return f"TeacherClient(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def chat(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        """One chat completion (the response JSON), from the cache when this exact request was made before."""
        body = {"model": self.model, "messages": messages, **params}
        key = hashlib.sha256(json.dumps([self.base_url, body], sort_keys=True).encode("utf-8")).hexdigest()
        path = self.cache_dir / key[:2] / f"{key}.json"
        if path.is_file():
            with self._lock:
                self.usage.cache_hits += 1
            cached: dict[str, Any] = read_json(path)
            return cached
        response = self._post(body)
        usage = response.get("usage") or {}
        with self._lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += _count(usage, "prompt_tokens")
            self.usage.completion_tokens += _count(usage, "completion_tokens")
        write_json(path, response)
        return response

    def chat_many(
        self, requests: Sequence[list[dict[str, str]]], *, progress: Progress | None = None, **params: Any
    ) -> list[dict[str, Any]]:
        """`chat` for each message list, at most `concurrency` at a time; answers in input order.
        A repeated request is sent once (the copies count as cache hits). The first request that
        fails for good stops the rest and raises its error."""
        total = len(requests)
        first: list[int] = []  # index of the first identical request
        seen: dict[str, int] = {}
        for i, messages in enumerate(requests):
            first.append(seen.setdefault(json.dumps(messages, sort_keys=True), i))
        copies = Counter(first)
        with self._lock:
            self.usage.cache_hits += total - len(copies)
        answers = self._run_unique(requests, sorted(copies), lambda i: copies[i], progress, params)
        return [answers[i] for i in first]

    def _run_unique(
        self,
        requests: Sequence[list[dict[str, str]]],
        unique: list[int],
        weight: Callable[[int], int],
        progress: Progress | None,
        params: dict[str, Any],
    ) -> dict[int, dict[str, Any]]:
        total = len(requests)
        answers: dict[int, dict[str, Any]] = {}
        if progress:
            progress(0, total)
        if not unique:
            return answers
        self._abort.clear()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(unique)), thread_name_prefix="teacher")
        try:
            futures = {pool.submit(self.chat, requests[i], **params): i for i in unique}
            pending, done = set(futures), 0
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=futures.__getitem__):
                    answers[futures[future]] = future.result()  # raises the request's error
                    done += weight(futures[future])
                if progress:
                    progress(done, total)
        except BaseException:  # a failed request or Ctrl-C: queued requests never start, running ones stop retrying
            self._abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return answers

    def _client(self) -> Any:
        import httpx

        with self._lock:
            if self._http is None:
                limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
                self._http = httpx.Client(timeout=self.timeout, limits=limits)
            return self._http

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/chat/completions"
        attempts = self.retry.max_retries + 1
        tried = 0
        for attempt in range(attempts):
            tried += 1
            reply, failure, status, retry_after = self._attempt(url, body)
            if reply is not None:
                return _parse_reply(url, reply)
            if attempt + 1 == attempts or self._abort.is_set():
                break
            delay = self.retry.delay(attempt, retry_after, self._rng)
            log.warning("teacher %s; retry %d/%d in %.1f s", failure, attempt + 1, self.retry.max_retries, delay)
            with self._lock:
                self.usage.retries += 1
            if self._sleep is not None:
                self._sleep(delay)
            elif self._abort.wait(delay):
                break
        error = TeacherError(
            f"the teacher at {url} {failure} (gave up after {tried} attempts)",
            fix="rate-limited: lower --concurrency or wait, then rerun (answers so far are cached)"
            if status == 429
            else "the endpoint is failing or overloaded: check its status and rerun later (answers so far are cached)",
        )
        error.status = status
        raise error

    def _attempt(self, url: str, body: dict[str, Any]) -> tuple[Any, str, int | None, str | None]:
        """One POST: (the 200 reply, "", ...) or (None, what failed, its HTTP status, Retry-After) when it
        is worth retrying; a TeacherError when retrying cannot help."""
        import httpx

        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            reply = self._client().post(url, json=body, headers=headers)
        except httpx.TimeoutException:
            return None, f"did not answer within {self.timeout:g} s (timeout)", None, None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
            return None, f"dropped the connection ({type(err).__name__})", None, None
        except httpx.HTTPError as err:
            raise TeacherError(
                f"cannot reach the teacher at {url}: {err}", fix="check TASKLING_TEACHER_BASE_URL"
            ) from None
        status = reply.status_code
        if status in RETRY_STATUSES:
            return None, f"answered HTTP {status}: {reply.text[:200]}", status, reply.headers.get("retry-after")
        if status != 200:
            error = TeacherError(
                f"the teacher at {url} answered HTTP {status}: {reply.text[:200]}",
                fix="check the API key, the model name (TASKLING_TEACHER_MODEL) and the endpoint",
            )
            error.status = status
            raise error
        return reply, "", status, None


def _parse_reply(url: str, reply: Any) -> dict[str, Any]:
    try:
        data = reply.json()
    except ValueError:  # an HTML error page or a proxy's login form, served with HTTP 200
        kind = reply.headers.get("content-type", "no content type")
        raise TeacherError(
            f"the teacher at {url} answered HTTP 200 with {kind}, not JSON: {reply.text[:200]!r}",
            fix="TASKLING_TEACHER_BASE_URL must be an OpenAI-compatible API root (usually ending in /v1)",
        ) from None
    if not isinstance(data, dict):
        raise TeacherError(
            f"the teacher at {url} answered a JSON {type(data).__name__}, not a chat completion object",
            fix="point TASKLING_TEACHER_BASE_URL at an OpenAI-compatible chat-completions API",
        )
    return data


def _count(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return int(value) if isinstance(value, int | float) else 0


def _answer(response: dict[str, Any]) -> tuple[str, Any]:
    choices = response.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(first, dict) or not isinstance(first.get("message"), dict):
        raise TeacherError(
            f"the teacher's response has no choices[0].message: {str(response)[:200]}",
            fix="point TASKLING_TEACHER_BASE_URL at an OpenAI-compatible chat-completions API",
        )
    return str(first["message"].get("content") or ""), first.get("logprobs")


def label_messages(task: Task, text: str) -> list[dict[str, str]]:
    # The teacher knows nothing of our adapter: it needs the label set in the prompt.
    system = (
        f"{task.instruction}\nCategories: {', '.join(task.labels)}\n"
        "Answer with the category name only, exactly as written."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def label_texts(
    texts: Sequence[str], task: Task, client: TeacherClient, *, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Teacher-log rows {text, label, confidence?, model}, one per text in input order: feed
    them to `distill`, which rejects invented labels and queues low confidences for review.
    Requests run `client.concurrency` at a time; `progress(done, total)` follows them."""
    for i, text in enumerate(texts):  # every text is checked before the first request is paid for
        if not isinstance(text, str) or not is_unicode(text):
            raise TeacherError(
                f"text {i + 1} is not valid Unicode text: {text!r:.80}", fix="pass str texts without lone surrogates"
            )
    requests = [label_messages(task, text) for text in texts]
    responses = client.chat_many(requests, progress=progress, temperature=0, max_tokens=16, logprobs=True)
    rows = []
    for text, response in zip(texts, responses, strict=True):
        answer, logprobs = _answer(response)
        row: dict[str, Any] = {"text": text, "label": answer.strip(), "metadata": {"model": client.model}}
        confidence = confidence_from_logprobs(logprobs)
        if confidence is not None:
            row["confidence"] = round(confidence, 4)
        rows.append(row)
    return rows


@dataclass
class SynthResult:
    accepted: list[Example] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    def rejected_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rejected:
            counts[row["reason"]] = counts.get(row["reason"], 0) + 1
        return counts


def synth_messages(task: Task, label: str, n: int) -> list[dict[str, str]]:
    prompt = (
        f"Task: {task.instruction}\nCategories: {', '.join(task.labels)}\n\n"
        f"Write {n} diverse, realistic user messages that belong to the category {label!r}. "
        "Vary length, wording, tone and detail; do not number them.\n"
        'Reply with JSON only: {"examples": [{"text": "...", "label": "' + label + '"}, ...]}'
    )
    return [{"role": "user", "content": prompt}]


def _parse_examples(answer: str, label: str) -> list[tuple[str, str]]:
    start, end = answer.find("{"), answer.rfind("}")
    try:
        data = json.loads(answer[start : end + 1]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("examples"), list):
        out = []
        for item in data["examples"]:
            if isinstance(item, dict):
                out.append((str(item.get("text", "")), str(item.get("label", label))))
            elif isinstance(item, str):
                out.append((item, label))
        return out
    # Not JSON: one message a line.
    return [(line.strip(" -*\t"), label) for line in answer.splitlines() if line.strip(" -*\t")]


def synthesize(
    task: Task,
    client: TeacherClient,
    *,
    per_label: int,
    labels: Sequence[str] | None = None,
    gold: Sequence[Example] | None = None,
    clean_config: CleanConfig | None = None,
    temperature: float = 0.9,
    progress: Progress | None = None,
) -> SynthResult:
    """Synthetic examples per category, validated before they may enter training. One request
    per category, `client.concurrency` at a time; `progress(done, total)` counts categories."""
    result = SynthResult()
    seen: set[str] = set()
    asked = list(labels or task.labels)
    for label in asked:
        if label not in task.label_index:
            raise TeacherError(f"{label!r} is not in the task's label set", fix=f"use one of {', '.join(task.labels)}")
    requests = [synth_messages(task, label, per_label) for label in asked]
    responses = client.chat_many(requests, progress=progress, temperature=temperature)
    for label, response in zip(asked, responses, strict=True):  # input order: the same rows win every run
        answer, _ = _answer(response)
        for text, given in _parse_examples(answer, label):
            text = text.strip()
            reason = None
            if not text:
                reason = "empty_text"
            elif given not in task.label_index:
                reason = "label_not_in_set"
            elif given != label:
                reason = "wrong_label"
            elif normalize(text) in seen:
                reason = "duplicate"
            if reason:
                result.rejected.append({"text": text, "label": given, "requested": label, "reason": reason})
                continue
            seen.add(normalize(text))
            result.accepted.append(Example(text, label, "synth", len(result.accepted) + 1))
    if gold:
        leaks = find_leaks(result.accepted, gold, clean_config)
        drop = {leak["index"] for leak in leaks}
        for leak in leaks:
            ex = result.accepted[leak["index"]]
            result.rejected.append({"text": ex.text, "label": ex.label, "requested": ex.label, "reason": "gold_leak"})
        result.accepted = [ex for i, ex in enumerate(result.accepted) if i not in drop]
    result.usage = client.usage
    return result


def usage_dict(usage: Usage) -> dict[str, int]:
    return {**asdict(usage), "total_tokens": usage.total_tokens}


def read_texts(path: str | Path) -> list[str]:
    """Unlabeled texts for `label_texts`: one a line, or JSONL rows with a `text` field.

    A line that starts with `{` is a JSON row. A bad line (not UTF-8, not JSON, no `text`,
    an unpaired surrogate escape) is a DataError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file does not exist", path=path, fix="give the file of texts to label")
    texts = []
    for parsed in scan_jsonl(path):
        raw = parsed.raw.rstrip("\r\n")
        if parsed.reason == "not_utf8":
            raise DataError(parsed.detail, path=path, line=parsed.line, fix="re-save the file as UTF-8")
        if not raw.lstrip().startswith("{"):
            texts.append(raw.strip())
            continue
        if parsed.reason:
            raise DataError(parsed.detail, path=path, line=parsed.line, fix='write the row as {"text": "..."}')
        text = parsed.value.get("text") if isinstance(parsed.value, dict) else None
        if not isinstance(text, str):
            keys = sorted(parsed.value) if isinstance(parsed.value, dict) else []
            raise DataError(
                f"a JSON row needs a string `text` field (keys: {keys})",
                path=path,
                line=parsed.line,
                fix='write the row as {"text": "..."}, or give plain text one message a line',
            )
        if not is_unicode(text):
            raise DataError(
                "an unpaired surrogate escape (not valid Unicode)",
                path=path,
                line=parsed.line,
                fix="fix the \\udXXX escape",
            )
        texts.append(text)
    return texts
