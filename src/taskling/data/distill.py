"""Learn from a bigger model: distill its logged answers into a clean training set.

`distill` reads logged teacher calls and sends every row to exactly one place:

    OUT/train.jsonl     training candidates (text, label)
    OUT/review.jsonl    for a person: low teacher confidence, conflicting labels, likely label errors
    OUT/rejected.jsonl  not used, with the reason: malformed, invented label, duplicate, gold leak
    OUT/report.json     the data report (see `taskling.data.clean.build_report`)

Log rows may be flat JSON (`text`/`input`/`prompt` + `label`/`output`/`answer`, optional
`confidence` or `logprob`, `timestamp`, `metadata`), chat rows (`messages` with the
assistant's answer last), or OpenAI chat-completions logs (`request` + `response`, with
the answer's token logprobs giving the confidence).

The live teacher client (`label_texts`, `synthesize`) is in `taskling.data.teacher`; its output
is a log `distill` reads.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from taskling.data.clean import CleanConfig, build_report, clean_examples
from taskling.data.load import Example, is_unicode
from taskling.errors import ConfigError, DataError
from taskling.io import scan_jsonl, write_json, write_jsonl
from taskling.task import Task

log = logging.getLogger(__name__)

TEXT_KEYS = ("text", "input", "prompt", "query", "message")
LABEL_KEYS = ("label", "output", "answer", "response", "completion", "prediction")
CONFIDENCE_KEYS = ("confidence", "probability", "score")
LOGPROB_KEYS = ("logprob", "label_logprob")
KEPT_KEYS = ("timestamp", "metadata", "id")


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Answers the teacher was less sure of than this go to the review queue.
    min_confidence: float = Field(0.7, ge=0.0, le=1.0)
    # Accept "Book Flight" for book_flight (counted in the report); off: only exact labels.
    loose_label_match: bool = True
    gold_manifest: Path | None = None
    clean: CleanConfig = Field(default_factory=CleanConfig)


@dataclass
class LogRow:
    text: str
    label: str
    source: str
    line: int
    confidence: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self, **extra: Any) -> dict[str, Any]:
        row = {"text": self.text, "label": self.label, **extra, "source": self.source, "line": self.line}
        if self.confidence is not None:
            row["confidence"] = round(self.confidence, 4)
        return {**row, **self.meta}


@dataclass
class DistillResult:
    out_dir: Path
    rows_read: int
    train: int
    review: int
    rejected: int
    report: dict[str, Any]


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _first(row: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    return None


def _content(value: Any) -> str:
    if isinstance(value, list):  # content parts
        return "".join(p.get("text", "") for p in value if isinstance(p, dict))
    return "" if value is None else str(value)


def confidence_from_logprobs(logprobs: Any) -> float | None:
    """P(answer) = exp(sum of the answer tokens' logprobs), from an OpenAI `logprobs` object."""
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not tokens:
        return None
    return math.exp(sum(float(t["logprob"]) for t in tokens))


def _parse_openai(row: dict[str, Any]) -> tuple[str, str, float | None]:
    request, response = row.get("request") or {}, row.get("response") or {}
    users = [m for m in request.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    choices = response.get("choices") or []
    if not users or not choices:
        raise _Skip("missing_field", "an OpenAI log needs request.messages with a user turn and response.choices")
    choice = choices[0]
    return (
        _content(users[-1].get("content")),
        _content((choice.get("message") or {}).get("content")),
        (confidence_from_logprobs(choice.get("logprobs"))),
    )


def _parse_chat(row: dict[str, Any]) -> tuple[str, str]:
    turns = [m for m in row["messages"] if isinstance(m, dict)]
    users = [m for m in turns if m.get("role") == "user"]
    answers = [m for m in turns if m.get("role") == "assistant"]
    if not users or not answers:
        raise _Skip("missing_field", "a chat row needs a user turn and an assistant turn")
    return _content(users[-1].get("content")), _content(answers[-1].get("content"))


def parse_log_row(row: Any) -> tuple[str, str, float | None, dict[str, Any]]:
    """(text, raw teacher answer, confidence or None, kept metadata) from one log row."""
    if not isinstance(row, dict):
        raise _Skip("malformed", f"expected a JSON object, got {type(row).__name__}")
    confidence: float | None = None
    if "request" in row and "response" in row:
        text, label, confidence = _parse_openai(row)
    elif isinstance(row.get("messages"), list):
        text, label = _parse_chat(row)
    else:
        raw_text, raw_label = _first(row, TEXT_KEYS), _first(row, LABEL_KEYS)
        if raw_text is None or raw_label is None:
            raise _Skip("missing_field", f"keys {sorted(row)}: need one of {TEXT_KEYS} and one of {LABEL_KEYS}")
        text, label = _content(raw_text), _content(raw_label)
    given = _first(row, CONFIDENCE_KEYS)
    logprob = _first(row, LOGPROB_KEYS)
    try:
        if given is not None:
            confidence = float(given)
        elif logprob is not None:
            confidence = math.exp(float(logprob))
    except (TypeError, ValueError):
        raise _Skip(
            "bad_confidence", f"confidence {given if given is not None else logprob!r} is not a number"
        ) from None
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise _Skip("bad_confidence", f"confidence {confidence} is outside [0, 1]")
    if not text.strip():
        raise _Skip("empty_text", "the input text is empty")
    if not label.strip():
        raise _Skip("empty_label", "the teacher's answer is empty")
    return text.strip(), label.strip(), confidence, {k: row[k] for k in KEPT_KEYS if k in row}


def read_logs(paths: Iterable[str | Path]) -> tuple[list[LogRow], list[dict[str, Any]]]:
    """Parse log files: usable rows, and bad rows as records with a reason, file and line."""
    rows: list[LogRow] = []
    bad: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError("log file does not exist", path=path, fix="check the LOGS paths")
        for parsed in scan_jsonl(path):
            try:
                if parsed.reason:
                    raise _Skip(parsed.reason, parsed.detail)
                if not is_unicode(json.dumps(parsed.value, ensure_ascii=False)):
                    raise _Skip("malformed", "an unpaired surrogate escape (not valid Unicode)")
                text, label, confidence, meta = parse_log_row(parsed.value)
            except _Skip as skip:
                record = {"raw": parsed.raw.rstrip("\r\n")[:500], "reason": skip.reason, "detail": skip.detail}
                bad.append({**record, "source": str(path), "line": parsed.line})
                continue
            rows.append(LogRow(text, label, str(path), parsed.line, confidence, meta))
    return rows, bad


def _label_key(label: str) -> str:
    return re.sub(r"[\s_\-]+", "_", label.strip().strip(".'\"`").casefold())


def distill(
    logs: Iterable[str | Path],
    task: Task,
    out_dir: str | Path,
    config: DistillConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> DistillResult:
    """Turn teacher logs into train / review / rejected files and a report (see module doc).

    `progress(done, 3)` follows the cleaning stages (`clean.clean_examples`)."""
    config = config or DistillConfig()
    out = Path(out_dir)
    rows, bad = read_logs(logs)
    loose = {_label_key(label): label for label in task.labels}
    train: list[dict[str, Any]] = []
    review: list[dict[str, Any]] = []
    rejected = list(bad)
    invented: Counter[str] = Counter()
    normalised = 0
    candidates: list[LogRow] = []
    for row in rows:
        if row.label not in task.label_index:
            match = loose.get(_label_key(row.label)) if config.loose_label_match else None
            if match is None:
                invented[row.label] += 1
                rejected.append(row.record(reason="invented_label", detail=f"{row.label!r} is not in the label set"))
                continue
            row.label, normalised = match, normalised + 1
        if row.confidence is not None and row.confidence < config.min_confidence:
            detail = f"teacher confidence {row.confidence:.2f} < {config.min_confidence}"
            review.append(row.record(reason="low_confidence", detail=detail))
            continue
        candidates.append(row)

    gold = None
    if config.gold_manifest is not None:
        from taskling.data.split import load_gold

        gold, _ = load_gold(config.gold_manifest)
    examples = [Example(r.text, r.label, r.source, r.line) for r in candidates]
    result = clean_examples(examples, task.labels, config.clean, gold=gold, progress=progress)
    for row, decision in zip(candidates, result.decisions, strict=True):
        if decision.destination == "train":
            train.append({"text": row.text, "label": row.label})
        else:
            target = review if decision.destination == "review" else rejected
            target.append(row.record(reason=decision.reason, detail=decision.detail))

    rows_read = len(rows) + len(bad)
    if len(train) + len(review) + len(rejected) != rows_read:  # pragma: no cover - an accounting bug
        raise AssertionError(f"distill lost rows: {rows_read} read, {len(train) + len(review) + len(rejected)} written")
    report = build_report(
        examples,
        result,
        task.labels,
        rows_read=rows_read,
        extra_review=Counter(r["reason"] for r in review if r["reason"] == "low_confidence"),
        extra_rejected=Counter(r["reason"] for r in rejected[: len(bad)])
        + Counter({"invented_label": sum(invented.values())} if invented else {}),
        invented_labels=dict(invented),
    )
    report["labels_normalised"] = normalised
    report["files"] = {"train": "train.jsonl", "review": "review.jsonl", "rejected": "rejected.jsonl"}
    # The review queue is ranked: label-error candidates by suspicion first, then the rest.
    review.sort(key=_review_order)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "review.jsonl", review)
    write_jsonl(out / "rejected.jsonl", rejected)
    write_json(out / "report.json", report)
    log.info("distilled %d rows: %d train, %d review, %d rejected", rows_read, len(train), len(review), len(rejected))
    return DistillResult(out, rows_read, len(train), len(review), len(rejected), report)


def _review_order(row: dict[str, Any]) -> tuple[int, int, str]:
    order = {"likely_label_error": 0, "conflicting_labels": 1, "low_confidence": 2}
    rank = 0
    if row["reason"] == "likely_label_error":
        rank = int(row["detail"].split(":")[0].split()[1])
    return order.get(row["reason"], 3), rank, row["text"]


def load_task_file(path: str | Path) -> Task:
    """A Task from YAML: a task file (`labels` or `labels_file`), or a project config's `task:`."""
    import yaml

    from taskling.config import resolve_paths

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist", fix="give --task task.yaml or a project config")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text", fix="re-save the task file as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}", fix="fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with `labels` (or a `task:` section)")
    section = raw["task"] if isinstance(raw.get("task"), dict) else raw
    section = resolve_paths({"task": section}, path.parent.resolve())["task"]
    try:
        return Task.model_validate(section)
    except ValueError as err:
        raise ConfigError(f"{path}: not a valid task: {err}", fix="list the labels under `labels:`") from None
