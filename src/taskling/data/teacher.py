"""Ask a bigger model: label texts and write synthetic examples via any OpenAI-compatible API.

The endpoint comes from the environment: `TASKLING_TEACHER_BASE_URL` (else `OPENAI_BASE_URL`),
`TASKLING_TEACHER_API_KEY` (else `OPENAI_API_KEY`), `TASKLING_TEACHER_MODEL` (else
`gpt-4o-mini`). The key is sent as a bearer token and never logged or cached.

Every response is cached on disk under a hash of the request, so a rerun costs nothing;
`Usage` counts requests, cache hits and prompt/completion tokens (as the endpoint reports).

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskling.data.clean import CleanConfig
from taskling.data.dedupe import find_leaks, normalize
from taskling.data.distill import confidence_from_logprobs
from taskling.data.load import Example, is_unicode, parse_jsonl_lines
from taskling.errors import DataError, TasklingError
from taskling.io import read_json, write_json
from taskling.task import Task

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o-mini"


class TeacherError(TasklingError):
    """The teacher endpoint is not configured or did not answer usefully."""


@dataclass
class Usage:
    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def default_cache_dir() -> Path:
    root = os.environ.get("TASKLING_CACHE") or Path.home() / ".cache" / "taskling"
    return Path(root) / "teacher"


class TeacherClient:
    """A minimal chat-completions client with an on-disk response cache."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        *,
        cache_dir: str | Path | None = None,
        timeout: float = 60.0,
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
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.timeout = timeout
        self.usage = Usage()

    def __repr__(self) -> str:  # never show the key
        return f"TeacherClient(base_url={self.base_url!r}, model={self.model!r})"

    def chat(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        """One chat completion (the response JSON), from the cache when this exact request was made before."""
        body = {"model": self.model, "messages": messages, **params}
        key = hashlib.sha256(json.dumps([self.base_url, body], sort_keys=True).encode("utf-8")).hexdigest()
        path = self.cache_dir / key[:2] / f"{key}.json"
        if path.is_file():
            self.usage.cache_hits += 1
            cached: dict[str, Any] = read_json(path)
            return cached
        response = self._post(body)
        usage = response.get("usage") or {}
        self.usage.requests += 1
        self.usage.prompt_tokens += _count(usage, "prompt_tokens")
        self.usage.completion_tokens += _count(usage, "completion_tokens")
        write_json(path, response)
        return response

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        url = f"{self.base_url}/chat/completions"
        try:
            reply = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise TeacherError(
                f"cannot reach the teacher at {url}: {err}", fix="check TASKLING_TEACHER_BASE_URL"
            ) from None
        if reply.status_code != 200:
            raise TeacherError(
                f"the teacher at {url} answered HTTP {reply.status_code}: {reply.text[:200]}",
                fix="check the API key, the model name (TASKLING_TEACHER_MODEL) and the endpoint",
            )
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
    texts: Sequence[str], task: Task, client: TeacherClient, *, progress: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Teacher-log rows {text, label, confidence?, model}: feed them to `distill`, which
    rejects invented labels and queues low confidences for review."""
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not is_unicode(text):
            raise TeacherError(
                f"text {i + 1} is not valid Unicode text: {text!r:.80}", fix="pass str texts without lone surrogates"
            )
        response = client.chat(label_messages(task, text), temperature=0, max_tokens=16, logprobs=True)
        answer, logprobs = _answer(response)
        row: dict[str, Any] = {"text": text, "label": answer.strip(), "metadata": {"model": client.model}}
        confidence = confidence_from_logprobs(logprobs)
        if confidence is not None:
            row["confidence"] = round(confidence, 4)
        rows.append(row)
        if progress:
            progress(i + 1)
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
) -> SynthResult:
    """Synthetic examples per category, validated before they may enter training."""
    result = SynthResult()
    seen: set[str] = set()
    for label in labels or task.labels:
        if label not in task.label_index:
            raise TeacherError(f"{label!r} is not in the task's label set", fix=f"use one of {', '.join(task.labels)}")
        response = client.chat(synth_messages(task, label, per_label), temperature=temperature)
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
    for parsed in parse_jsonl_lines(path):
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
