"""Serving generation runs (`task.kind: generate`): the request, the answers, the log rows, batch files.

A generation run is served next to classification and extraction runs. `POST /v1/generate`
takes `{"text": ...}` or `{"texts": [...]}`, an optional `"adapter"` and an optional
`"max_tokens"` (at most the task's `output.max_tokens`), and answers one result per text:
`output`, `valid`, `n_tokens`, `ms` and `problem` (why it is invalid, "" when valid). The
texts go through the server's batching engine (`engine.py`), so auth, limits, the queue and
the error shape are those of `/v1/classify`. `/v1/chat/completions` answers the output as
the assistant's content and honours `max_tokens` / `max_completion_tokens` the same way.

Every answer is logged to the prediction log with the existing columns (`log_row`):

    text           the input           label          the output text
    probability    1.0 valid, 0.0 not   probabilities  {"valid": 1.0|0.0, "n_tokens": N, "ms": decode ms}

`generate_batch(run_dir, input, output)` is `taskling predict-batch` on a generation run:
the input columns plus `output`, `valid`, `n_tokens` and `problem`, one output row per input
row, in order. A row without text is flagged (`valid` false, `problem` "no text"), never dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from taskling.errors import DataError, TasklingError
from taskling.generate.generator import Generation, Generator
from taskling.rundir import GENERATION

if TYPE_CHECKING:
    from taskling.serve.predlog import LogRow

log = logging.getLogger(__name__)

GENERATE_ROUTE = "/v1/generate"
RESULT_COLUMNS = ("output", "valid", "n_tokens", "problem")
NO_TEXT = "no text"
# The chat fields a generation run honours (everywhere else they are reported as ignored).
CHAT_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    texts: list[str] | None = None
    adapter: str | None = None
    max_tokens: int | None = Field(None, ge=1)


def limit_problem(gen: Generator, max_tokens: int | None) -> str | None:
    """Why a request's `max_tokens` cannot be honoured (a 422), or None."""
    limit = gen.task.output.max_tokens
    if max_tokens is not None and max_tokens > limit:
        return f"max_tokens {max_tokens} is over this run's task.output.max_tokens ({limit})"
    return None


def chat_max_tokens(gen: Generator, fields: dict[str, Any]) -> tuple[int | None, str | None]:
    """(`max_tokens`, problem) from a chat request's extra fields; `max_completion_tokens` wins."""
    value = fields.get("max_completion_tokens", fields.get("max_tokens"))
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None, "max_tokens must be a positive integer"
    return value, limit_problem(gen, value)


def chat_limits(engine: Any, adapter: str, req: Any) -> tuple[int | None, set[str]]:
    """(`max_tokens` to decode with, the chat fields that honoured) for a chat request; 400/422 as HTTP errors.

    Only generation runs honour `max_tokens`; for the others nothing is used (they stay reported as ignored).
    """
    from fastapi import HTTPException

    gen = engine.generators.get(adapter)
    if gen is None:
        return None, set()
    if req.logprobs:
        raise HTTPException(400, "logprobs are not computed for generation runs; drop `logprobs`")
    fields = req.model_extra or {}
    max_tokens, problem = chat_max_tokens(gen, fields)
    if problem is not None:
        raise HTTPException(422, problem)
    return max_tokens, {f for f in CHAT_LIMIT_FIELDS if fields.get(f) is not None}


def add_generate_route(app: Any, api: Any) -> None:
    """`POST /v1/generate` on the app, through the server's `Api` (adapter choice, limits, the engine)."""
    from fastapi import HTTPException

    @app.post(GENERATE_ROUTE)
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        adapter = api.pick(req.adapter)
        api.require(adapter, GENERATION)
        problem = limit_problem(api.engine.generators[adapter], req.max_tokens)
        if problem is not None:
            raise HTTPException(422, problem)
        texts = ([req.text] if req.text is not None else []) + list(req.texts or [])
        job, out = await api.answer(adapter, texts, max_tokens=req.max_tokens)
        return {
            "request_id": job.request_id,
            "adapter": adapter,
            "model_version": out.version,
            "latency_ms": round(out.latency_ms, 3),
            "results": [result_of(g) for g in out.generations],
        }


def result_of(g: Generation) -> dict[str, Any]:
    """One text's answer as `/v1/generate` shows it."""
    return {"output": g.output, "valid": g.valid, "n_tokens": g.n_tokens, "ms": round(g.ms, 3), "problem": g.problem}


def log_row(request_id: str, adapter: str, version: str, g: Generation, latency_ms: float) -> LogRow:
    """The prediction-log row of one answer (the column mapping is in the module docstring)."""
    from taskling.serve.predlog import LogRow

    details = {"valid": float(g.valid), "n_tokens": float(g.n_tokens), "ms": round(g.ms, 3)}
    return LogRow(request_id, adapter, version, g.text, g.output, float(g.valid), details, latency_ms)


def generate_groups(
    gen: Generator, groups: Sequence[tuple[list[str], int | None]], batch_size: int
) -> list[list[Generation]]:
    """Answers per group of texts; groups with the same `max_tokens` are decoded in one batched call."""
    out: list[list[Generation]] = [[] for _ in groups]
    by_limit: dict[int | None, list[int]] = {}
    for i, (_, limit) in enumerate(groups):
        by_limit.setdefault(limit, []).append(i)
    for limit, members in by_limit.items():
        texts = [t for i in members for t in groups[i][0]]
        answers = gen.generate(texts, batch_size=batch_size, max_tokens=limit)
        start = 0
        for i in members:
            out[i] = answers[start : start + len(groups[i][0])]
            start += len(groups[i][0])
    return out


def token_usage(gen: Generator, answers: Sequence[Generation]) -> tuple[list[int], list[int]]:
    """Prompt tokens and answer tokens (end-of-turn included unless the answer was cut) per answer."""
    end = len(gen.fmt.end_ids)
    return [len(gen.fmt.prompt_ids(g.text)) for g in answers], [g.n_tokens + (0 if g.cut else end) for g in answers]


def model_info(gen: Generator) -> dict[str, Any]:
    """What `/v1/models` says about a generation run."""
    spec = gen.task.output
    return {
        "kind": "generation",
        "model_version": gen.version,
        "output": {"format": spec.format, "pattern": spec.pattern, "max_tokens": spec.max_tokens},
    }


# ---------------------------------------------------------------- batch files


def texts_or_flags(frame: Any, text_field: str, path: Path) -> list[str | None]:
    """The text column; None where a row has no text (null or blank): flagged, not dropped."""
    import pandas as pd

    if text_field not in frame.columns:
        raise DataError(
            f"no column {text_field!r} (columns: {', '.join(map(str, frame.columns))})",
            path=path,
            fix="name the text column with --text-field",
        )
    out: list[str | None] = []
    for value in frame[text_field].tolist():
        missing = value is None or (isinstance(value, float) and pd.isna(value))
        text = None if missing else (value if isinstance(value, str) else str(value))
        out.append(text if text is not None and text.strip() else None)
    return out


def add_generations(
    gen: Generator,
    frame: Any,
    texts: Sequence[str | None],
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """`frame` (a copy) with `output`, `valid`, `n_tokens`, `problem`; rows without text flagged."""
    present = [i for i, t in enumerate(texts) if t is not None]
    answers = gen.generate([str(texts[i]) for i in present], batch_size=batch_size, progress=progress)
    by_row = dict(zip(present, answers, strict=True))
    out = frame.drop(columns=[c for c in RESULT_COLUMNS if c in frame.columns])
    rows = [by_row.get(i) for i in range(len(texts))]
    out["output"] = [g.output if g else "" for g in rows]
    out["valid"] = [bool(g.valid) if g else False for g in rows]
    out["n_tokens"] = [g.n_tokens if g else 0 for g in rows]
    out["problem"] = [g.problem if g else NO_TEXT for g in rows]
    return out


def generate_batch(
    run_dir: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    *,
    text_field: str = "text",
    batch_size: int = 8,
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Generate an answer for every row of `input_path` and write `output_path` (a `batch.BatchResult`).

    Reads and writes Parquet, JSONL or CSV by suffix, with the same readers and atomic writer
    as `batch.predict_batch`. Returns the result with `flagged` (rows without text) logged.
    """
    from taskling.serve.batch import BatchResult, TableWriter, read_table, table_format

    input_path, output_path = Path(input_path), Path(output_path)
    table_format(input_path)
    table_format(output_path)
    started = time.perf_counter()
    frame = read_table(input_path)
    texts = texts_or_flags(frame, text_field, input_path)
    gen = Generator.from_run(run_dir, dtype=dtype)
    result = add_generations(gen, frame, texts, batch_size, progress)
    writer = TableWriter(output_path)
    try:
        writer.write(result)
    except BaseException as err:
        writer.abort(err)
        raise
    writer.close()
    flagged = sum(t is None for t in texts)
    invalid = int((~result["valid"]).sum()) if len(result) else 0
    if flagged:
        log.warning(
            "%s: %d rows have no text; flagged (valid false, problem %r), not dropped", input_path, flagged, NO_TEXT
        )
    log.info("%s: %d rows, %d invalid answers", output_path, writer.rows, invalid)
    return BatchResult(output_path, writer.rows, time.perf_counter() - started, "local")


def refuse_ray_for_generation(engine: str) -> None:
    if engine != "local":
        raise TasklingError(
            "a generation run is batched by the local engine only", fix="drop --engine ray (or use --engine local)"
        )
