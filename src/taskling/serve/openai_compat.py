"""The OpenAI-compatible surface: the chat request, chat completions (plain and streamed), the model list.

A served adapter answers exactly one label (classification) or one schema-valid JSON record
(extraction), never free text, so some of a client's fields cannot mean what they mean to
a generative model. What each one does, so that clients work unchanged and nothing is
silently different:

- `model` names the adapter; the **last user message** is the input.
- System (and `developer`) messages and every other turn are **ignored**: the adapter was
  trained with its own instruction, which is always used. A system message equal to that
  instruction is not reported; anything else ignored is named in the response header
  `X-Taskling-Ignored` and in `taskling.ignored` (as are `temperature`, `top_p`, `seed`,
  `max_tokens` and any other field the server does not use).
- `temperature` and the other sampling fields change nothing: the answer is the argmax over
  the label set (or the greedy constrained record), the same on every call.
- `n` > 1 returns `n` identical choices (the answer is deterministic).
- An abstaining server (`--abstain`) or a cascade ending in `unknown` answers the content
  `unknown` when it is not sure; `taskling.stage` names the cascade stage that decided.
- `logprobs: true` fills OpenAI's `logprobs.content` with one entry for the whole answer:
  `token` = the label, `logprob` = the log of its probability, and with `top_logprobs: k`
  the k most probable labels. For an extraction run the entry's `logprob` is the summed
  log-probability of the decoder's choices and no alternatives are listed.
- `stream: true` answers a valid server-sent-event stream: one `chat.completion.chunk`
  holding every choice's whole answer, a usage chunk when `stream_options.include_usage`
  is set, then `data: [DONE]`.
- A generation run (`task.kind: generate`) answers its format-held output as the content;
  `max_tokens` / `max_completion_tokens` (at most the task's) are honoured, not ignored, and
  `logprobs` is refused (a 400: no probability is computed for free text).
- `usage`: `prompt_tokens` is the prompt the model really read (template and instruction
  included, after truncation), `completion_tokens` the answer's tokens (end-of-turn
  included) times `n`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from taskling.serve.engine import Engine, Outcome
from taskling.serve.generation import model_info

IGNORED_HEADER = "X-Taskling-Ignored"
MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a probability that underflows to zero


class ChatRequest(BaseModel):
    # OpenAI clients send many optional fields; unknown ones are accepted and reported as ignored.
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict[str, Any]]
    stream: bool | None = False
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream_options: dict[str, Any] | None = None

    @property
    def choices(self) -> int:
        return self.n or 1

    def problem(self) -> str | None:
        """Why the request cannot be answered as asked (a 400), or None."""
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs: true"
        if self.stream_options is not None and not self.stream:
            return "stream_options is only allowed with stream: true"
        return None


@dataclass
class Answer:
    """One text's answer as the chat endpoint shows it."""

    content: str
    logprob: float
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # (label, logprob), best first
    extras: dict[str, Any] = field(default_factory=dict)  # under `taskling`


def log_of(p: float) -> float:
    return math.log(p) if p > 0 else LOGPROB_FLOOR


def answer_of(out: Outcome) -> Answer:
    """The first text's answer: a label, or an extraction run's record as JSON text."""
    extras: dict[str, Any] = {"model_version": out.version, "latency_ms": round(out.latency_ms, 3)}
    if out.extractions:
        e = out.extractions[0]
        logprob = max(sum(log_of(c) for c in e.confidence.values()), LOGPROB_FLOOR)
        extras |= {"record": e.record, "confidence": e.confidence, "valid": e.valid}
        return Answer(json.dumps(e.record, ensure_ascii=False), logprob, [], extras)
    if out.generations:  # a generation run: the format-held output is the content
        g = out.generations[0]
        extras |= {"valid": g.valid, "n_tokens": g.n_tokens, "problem": g.problem}
        return Answer(g.output, 0.0, [], extras)
    pred = out.predictions[0]
    ranked = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])
    extras["probabilities"] = pred.probabilities
    extras["stage"] = pred.stage  # the cascade stage that decided; None outside a cascade
    return Answer(pred.label, log_of(pred.probability), [(label, log_of(p)) for label, p in ranked], extras)


def token_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def logprobs_of(answer: Answer, top: int) -> dict[str, Any]:
    """OpenAI's `choices[].logprobs`: one content entry for the whole answer."""
    entry = token_logprob(answer.content, answer.logprob)
    entry["top_logprobs"] = [token_logprob(label, lp) for label, lp in answer.alternatives[:top]]
    return {"content": [entry], "refusal": None}


def usage_of(out: Outcome, n: int) -> dict[str, int]:
    prompt = out.prompt_tokens[0] if out.prompt_tokens else 0
    completion = (out.completion_tokens[0] if out.completion_tokens else 0) * n
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def text_of(content: Any) -> str | None:
    """A message's text; OpenAI content parts of type text are joined."""
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


def last_user_index(messages: list[dict[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user" and text_of(messages[i].get("content")) is not None:
            return i
    return None


def last_user_text(messages: list[dict[str, Any]]) -> str | None:
    """The last user turn's text: what the adapter answers."""
    i = last_user_index(messages)
    return None if i is None else text_of(messages[i].get("content"))


def ignored_fields(req: ChatRequest, system_prompt: str) -> list[str]:
    """What the request holds that does not change the answer: `system`, `other_messages`, extra fields."""
    ignored: list[str] = []
    user = last_user_index(req.messages)
    for i, message in enumerate(req.messages):
        if message.get("role") in ("system", "developer"):
            if text_of(message.get("content")) != system_prompt and "system" not in ignored:
                ignored.append("system")
        elif i != user and "other_messages" not in ignored:
            ignored.append("other_messages")
    return ignored + sorted(k for k, v in (req.model_extra or {}).items() if v is not None)


def system_prompt_of(engine: Engine, name: str) -> str:
    """The instruction the adapter was trained with (a client's system message never replaces it)."""
    if name in engine.extractors:
        return engine.extractors[name].task.instruction
    if name in engine.generators:
        return str(engine.generators[name].task.instruction)
    return engine.classifiers[name].task.system_prompt()


def choice(index: int, answer: Answer, req: ChatRequest, delta: bool) -> dict[str, Any]:
    message = {"role": "assistant", "content": answer.content}
    logprobs = logprobs_of(answer, req.top_logprobs or 0) if req.logprobs else None
    return {"index": index, "delta" if delta else "message": message, "logprobs": logprobs, "finish_reason": "stop"}


def chat_completion(
    request_id: str, adapter: str, out: Outcome, req: ChatRequest, ignored: list[str]
) -> dict[str, Any]:
    """An OpenAI chat.completion whose assistant message is the label (or the record as JSON)."""
    answer = answer_of(out)
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": adapter,
        "system_fingerprint": out.version,
        "choices": [choice(i, answer, req, delta=False) for i in range(req.choices)],
        "usage": usage_of(out, req.choices),
        "taskling": answer.extras | {"ignored": ignored},
    }


def chat_stream(request_id: str, adapter: str, out: Outcome, req: ChatRequest, ignored: list[str]) -> Iterator[str]:
    """Server-sent events: one chunk with every choice's whole answer, usage if asked, `[DONE]`."""
    answer = answer_of(out)
    head = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": adapter,
        "system_fingerprint": out.version,
    }
    chunk = head | {
        "choices": [choice(i, answer, req, delta=True) for i in range(req.choices)],
        "taskling": answer.extras | {"ignored": ignored},
    }
    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    if (req.stream_options or {}).get("include_usage"):
        yield f"data: {json.dumps(head | {'choices': [], 'usage': usage_of(out, req.choices)})}\n\n"
    yield "data: [DONE]\n\n"


def model_card(engine: Engine, name: str) -> dict[str, Any]:
    """One served adapter in OpenAI's model shape, with what it answers under `taskling`."""
    info: dict[str, Any]
    if name in engine.extractors:
        ext = engine.extractors[name]
        info = {"kind": "extraction", "model_version": ext.version, "schema": ext.task.json_schema()}
    elif name in engine.generators:
        info = model_info(engine.generators[name])
    else:
        clf = engine.classifiers[name]
        info = {"kind": "classification", "model_version": clf.version, "labels": list(clf.task.labels)}
        if getattr(clf, "stage_names", None):
            info["stages"] = list(clf.stage_names)
        if getattr(clf, "threshold", None) is not None:  # served with --abstain: it may answer `unknown`
            info["abstain"] = True
    info["system_prompt"] = system_prompt_of(engine, name)
    return {"id": name, "object": "model", "created": engine.loaded_at, "owned_by": "taskling", "taskling": info}


def model_list(engine: Engine) -> dict[str, Any]:
    """`GET /v1/models`: every served adapter."""
    return {"object": "list", "data": [model_card(engine, name) for name in engine.names]}
