"""Metrics for generation runs on a frozen gold set: per row, averaged, per slice.

`score_generations` scores every generated answer against its reference with
`generate.metrics.score_rows` (exact, normalised, ROUGE-L, chrF, MiniLM similarity), adds
`valid` (the output fits the format, was not cut by `max_tokens`, and runs when the task
has a database) and, for SQL tasks with a database, `execution` (the same result rows as
the gold query, read-only, with a timeout). The averages, the format validity rate, the
per-slice scores (rows with a `slice` or `category` field) and the worst slice on the
primary metric (`primary_metric`: execution for SQL with a database, ROUGE-L otherwise)
go to `metrics.json`; every row with its scores goes to `predictions.jsonl`, which the
generation gate (`evaluate.generation_gate`) reads.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskling.config import DataConfig
from taskling.evaluate.metrics import timing, write_scores
from taskling.generate.generator import Generation, Generator
from taskling.generate.metrics import aggregate, score_rows
from taskling.generate.spec import GenerationTask, GenExample, generation_hash, load_generation_rows
from taskling.rundir import RunDir

NO_SLICE = "(none)"


def primary_metric(task: GenerationTask) -> str:
    """The per-row metric the gate and the worst slice use: execution match for SQL with a database, else ROUGE-L."""
    return "execution" if task.sql is not None else "rouge_l"


def load_gold_rows(path: str | Path, task: GenerationTask) -> list[GenExample]:
    """Gold rows of `path`; a reference that fails its own format is a DataError naming file and line."""
    path = Path(path)
    return load_generation_rows([path], task, DataConfig(train=[path]), gold=True).examples


def row_scores(
    gold: Sequence[GenExample],
    outputs: Sequence[str],
    valid: Sequence[bool],
    task: GenerationTask,
    *,
    embed: bool = True,
    database: Any = None,
) -> list[dict[str, float]]:
    """Per-row metrics (score_rows), `valid`, and `execution` when `database` is given."""
    rows = score_rows([ex.answer for ex in gold], list(outputs), embed=embed)
    for row, ok in zip(rows, valid, strict=True):
        row["valid"] = float(ok)
    if database is not None:
        for row, ex, out, ok in zip(rows, gold, outputs, valid, strict=True):
            row["execution"] = float(ok and database.execution_match(ex.answer, out))
    return rows


def summarise(gold: Sequence[GenExample], rows: Sequence[dict[str, float]], metric: str) -> dict[str, Any]:
    """Averages, validity rate, per-slice averages and the worst slice on `metric`."""
    if not rows:
        raise ValueError("nothing to score: the gold set is empty")
    means = aggregate(rows)
    by_slice: dict[str, list[dict[str, float]]] = defaultdict(list)
    for ex, row in zip(gold, rows, strict=True):
        by_slice[ex.slice or NO_SLICE].append(row)
    per_slice = {name: aggregate(members) for name, members in sorted(by_slice.items())}
    worst = min(per_slice, key=lambda name: (per_slice[name][metric], name))
    return {
        "n": len(rows),
        "metric": metric,
        "score": means[metric],
        "means": {k: v for k, v in means.items() if k != "n"},
        "validity_rate": means["valid"],
        "invalid_rate": 1 - means["valid"],
        "per_slice": per_slice,
        "worst_slice": worst,
        "worst_slice_score": per_slice[worst][metric],
    }


@dataclass
class GenerationEval:
    metrics: dict[str, Any]
    metrics_path: Path
    predictions_path: Path
    seconds: float


def evaluate_generation(
    run_dir: str | Path,
    data: str | Path,
    *,
    out_dir: str | Path | None = None,
    generator: Generator | None = None,
    embed: bool = True,
    batch_size: int = 8,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GenerationEval:
    """Generate an answer for every gold row of `data`, score it, write metrics.json and predictions.jsonl."""
    run_dir = Path(run_dir)
    gen = generator or Generator.from_run(run_dir)
    gold = load_gold_rows(data, gen.task)[:limit]
    started = time.perf_counter()
    results = gen.generate([ex.text for ex in gold], batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - started
    metric = primary_metric(gen.task)
    outputs, valid = [r.output for r in results], [r.valid for r in results]
    rows = row_scores(gold, outputs, valid, gen.task, embed=embed, database=gen.database)
    summary = summarise(gold, rows, metric)
    summary["cut_by_max_tokens"] = sum(r.problem.startswith("cut at") for r in results)
    payload: dict[str, Any] = {
        "kind": "generation",
        "gold_file": str(data),
        "gold_hash": generation_hash(gold),
        "output_format": gen.task.output.format,
        "constrained": gen.constrained,
        **timing(seconds, len(gold)),
        **summary,
    }
    if gen.database is not None:
        stats = gen.database.stats
        payload["sql"] = {k: getattr(stats, k) for k in ("queries", "errors", "refused", "timed_out")}
    out = RunDir(out_dir if out_dir is not None else run_dir)
    metrics_path, predictions_path = write_scores(out, payload, prediction_rows(gold, results, rows))
    return GenerationEval(payload, metrics_path, predictions_path, seconds)


def prediction_rows(
    gold: Sequence[GenExample], results: Sequence[Generation], rows: Sequence[dict[str, float]]
) -> list[dict[str, Any]]:
    """predictions.jsonl rows: text, gold, output (also as `label`), validity, slice, tokens, scores."""
    return [
        {
            "text": ex.text,
            "gold": ex.answer,
            "label": r.output,
            "output": r.output,
            "valid": r.valid,
            "problem": r.problem,
            "slice": ex.slice,
            "n_tokens": r.n_tokens,
            "ms": r.ms,
            "scores": scores,
        }
        for ex, r, scores in zip(gold, results, rows, strict=True)
    ]
