"""Human review of a generation run's worst rows, and what the marks turn into.

`write_review(run_dir, n)` reads the run's scored gold rows (`predictions.jsonl`, written by
`taskling eval`) and writes the `n` worst to `RUN_DIR/review.jsonl`, worst first: rows whose
output is invalid (fails the format, cut, does not run), then the lowest per-row metric
(execution match for SQL with a database, ROUGE-L otherwise), then rows where the output
disagrees with the pinned teacher baseline (`baseline.json`). Rows the model got exactly
right, in format and in agreement with the teacher, are never listed. Each row carries
`reasons`, and empty `mark` and `fixed` fields for the reviewer:

    {"id": 3, "text": ..., "gold": ..., "output": ..., "teacher": ..., "reasons": [...],
     "mark": "acceptable" | "wrong" | "fixed", "fixed": "the right text (with mark fixed)"}

`apply_review(run_dir, path)` turns the marks into rows (unmarked rows are counted, skipped):

- `review/gold.jsonl`: every marked row with its corrected reference (the model's output when
  acceptable, the old reference when wrong, the reviewer's text when fixed), as
  instruction/response rows: the material for the next gold version;
- `review/train.jsonl`: the same rows as training rows;
- `review/pairs.jsonl`: DPO pairs `{"text", "chosen", "rejected", "source"}` (the format
  `taskling dpo` reads): the fixed text (or the reference, when marked wrong) chosen, the
  model's output rejected.

The reviewed texts come from the gold set: training on them while that gold set is the bar
would score the model on its own training rows, so `AppliedReview.gold_file` names it and
the command says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskling.errors import DataError, RunError
from taskling.generate.metrics import normalise
from taskling.generate.spec import GenerationTask
from taskling.io import iter_jsonl, read_json, write_jsonl
from taskling.rundir import GENERATION, RunDir, read_manifest

log = logging.getLogger(__name__)

MARKS = ("acceptable", "wrong", "fixed")
_MARK_FIX = 'set "mark" to one of acceptable, wrong, fixed (or null to skip); with fixed, put the right text in "fixed"'


def _scored_rows(run: RunDir) -> list[dict[str, Any]]:
    if not run.predictions.is_file():
        raise RunError(
            f"{run.predictions} does not exist: the run has not been scored",
            fix=f"score it on the gold set first: taskling eval {run.root} GOLD.jsonl",
        )
    rows = [row for _, row in iter_jsonl(run.predictions)]
    if not all(isinstance(r, dict) and isinstance(r.get("scores"), dict) and "output" in r for r in rows):
        raise RunError(
            f"{run.predictions} holds no per-row generation scores",
            fix=f"score it again: taskling eval {run.root} GOLD",
        )
    return rows


def _metric(run: RunDir, rows: Sequence[dict[str, Any]], metric: str | None) -> str:
    if metric is None and run.metrics.is_file():
        metric = read_json(run.metrics).get("metric")
    metric = metric or ("execution" if rows and "execution" in rows[0]["scores"] else "rouge_l")
    if rows and metric not in rows[0]["scores"]:
        raise RunError(
            f"{run.predictions} has no per-row {metric!r} score",
            fix=f"pick one of {', '.join(sorted(rows[0]['scores']))}",
        )
    return metric


def _teacher(run: RunDir) -> dict[str, dict[str, Any]]:
    """The pinned teacher baseline's row for each gold text (none when no baseline is pinned)."""
    if not run.baseline.is_file():
        return {}
    pinned = read_json(run.baseline)
    if not isinstance(pinned, dict) or pinned.get("kind") != GENERATION:
        return {}
    return {str(r["text"]): r for r in pinned.get("rows", []) if isinstance(r, dict) and "text" in r}


def review_candidates(run_dir: str | Path, *, metric: str | None = None) -> list[dict[str, Any]]:
    """Every scored row that is not plainly right, worst first, with the reasons it is listed."""
    run = RunDir(run_dir)
    rows = _scored_rows(run)
    metric = _metric(run, rows, metric)
    teacher = _teacher(run)
    ranked = []
    for i, row in enumerate(rows):
        output, score, valid = str(row["output"]), float(row["scores"][metric]), bool(row.get("valid", True))
        theirs = teacher.get(str(row.get("text")))
        disagrees = theirs is not None and normalise(str(theirs["output"])) != normalise(output)
        reasons = [] if valid else [f"invalid: {row.get('problem') or 'fails the output format'}"]
        if score < 1.0:
            reasons.append(f"{metric} {score:.3f}")
        if disagrees and theirs is not None:
            teacher_score = theirs.get("scores", {}).get(metric)
            reasons.append(
                "disagrees with the teacher" + ("" if teacher_score is None else f" ({metric} {teacher_score:.3f})")
            )
        if not reasons and output == row.get("gold"):
            continue
        ranked.append(((valid, score, not disagrees, i), {
            "text": row.get("text"), "gold": row.get("gold"), "output": output,
            "teacher": None if theirs is None else theirs["output"], "slice": row.get("slice", ""),
            "metric": metric, "score": score, "valid": valid, "reasons": reasons or ["not an exact match"],
            "mark": None, "fixed": None,
        }))  # fmt: skip
    ranked.sort(key=lambda pair: pair[0])
    return [{"id": n, **row} for n, (_, row) in enumerate(ranked, 1)]


@dataclass
class ReviewFile:
    path: Path
    rows: int
    candidates: int  # rows that could have been listed (not plainly right)
    metric: str


def write_review(
    run_dir: str | Path, n: int = 20, *, metric: str | None = None, out: str | Path | None = None
) -> ReviewFile:
    """Write the `n` worst scored rows to `RUN_DIR/review.jsonl` (or `out`) for a reviewer to mark."""
    if n < 1:
        raise ValueError(f"--worst must be at least 1, not {n}")
    candidates = review_candidates(run_dir, metric=metric)
    path = Path(out) if out is not None else RunDir(run_dir).review
    write_jsonl(path, candidates[:n])
    chosen = candidates[0]["metric"] if candidates else (metric or "")
    log.info("wrote %d of %d rows to review to %s", min(n, len(candidates)), len(candidates), path)
    return ReviewFile(path, min(n, len(candidates)), len(candidates), chosen)


@dataclass
class AppliedReview:
    marks: dict[str, int]
    unmarked: int
    gold_path: Path
    train_path: Path
    pairs_path: Path
    rows: int
    pairs: int
    gold_file: str | None = None  # the gold set the reviewed rows came from
    skipped_pairs: int = 0  # marked rows whose chosen text equals the model's output


def _marked_row(row: Any, line: int, path: Path, task: GenerationTask | None) -> tuple[str, str] | None:
    """(mark, corrected answer) of a review row; None when unmarked; a DataError naming the line otherwise."""
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("text", "gold", "output")):
        raise DataError("not a review row (text, gold, output, mark, fixed)", path=path, line=line, fix=_MARK_FIX)
    mark = row.get("mark")
    if mark in (None, ""):
        return None
    if mark not in MARKS:
        raise DataError(f"unknown mark {mark!r}", path=path, line=line, fix=_MARK_FIX)
    if mark == "fixed":
        fixed = row.get("fixed")
        if not isinstance(fixed, str) or not fixed.strip():
            raise DataError('mark "fixed" without the fixed text', path=path, line=line, fix=_MARK_FIX)
        problem = None if task is None else task.format_problem(fixed)
        if problem is not None:
            raise DataError(
                f"the fixed text {fixed[:80]!r} fails the output format: {problem}",
                path=path,
                line=line,
                fix="correct the fixed text so it fits task.output",
            )
        return mark, fixed
    return mark, row["output"] if mark == "acceptable" else row["gold"]


def apply_review(run_dir: str | Path, review_file: str | Path | None = None) -> AppliedReview:
    """Turn a marked review file into gold rows, training rows and DPO pairs under `RUN_DIR/review/`."""
    run = RunDir(run_dir)
    path = Path(review_file) if review_file is not None else run.review
    if not path.is_file():
        raise DataError(
            "review file not found", path=path, fix=f"write one first: taskling review {run.root} --worst N"
        )
    task = None  # without a manifest, fixed texts are not checked against the format
    if run.manifest.is_file():
        task = GenerationTask.model_validate(read_manifest(run.root, kind=GENERATION)["task"])
    marks: Counter[str] = Counter()
    rows, pairs, unmarked, same = [], [], 0, 0
    for line, row in iter_jsonl(path):
        marked = _marked_row(row, line, path, task)
        if marked is None:
            unmarked += 1
            continue
        mark, answer = marked
        marks[mark] += 1
        rows.append({"instruction": row["text"], "response": answer, "slice": row.get("slice") or "", "mark": mark})
        if mark == "acceptable":
            continue
        if answer == row["output"]:
            same += 1
            continue
        pairs.append({"text": row["text"], "chosen": answer, "rejected": row["output"], "source": f"review_{mark}"})
    write_jsonl(run.reviewed_gold, ({k: v for k, v in r.items() if k != "mark" and v != ""} for r in rows))
    write_jsonl(run.reviewed_train, ({k: v for k, v in r.items() if v != ""} for r in rows))
    write_jsonl(run.reviewed_pairs, pairs)
    gold_file = read_json(run.metrics).get("gold_file") if run.metrics.is_file() else None
    return AppliedReview(
        {m: marks[m] for m in MARKS}, unmarked, run.reviewed_gold, run.reviewed_train, run.reviewed_pairs,
        len(rows), len(pairs), gold_file, same,
    )  # fmt: skip
