"""The ship gate for generation runs: a frozen teacher baseline and a paired bootstrap per row.

`pin_generation_baseline` scores the teacher's outputs on the gold rows once (the same
per-row metrics as `taskling eval`) and writes `baseline.json` with the gold set's content
hash; it is never recomputed silently (`repin=True` to replace it on purpose), and a gold
file whose content changed is refused (`GoldChangedError`).

`gate_generation` holds the candidate's `predictions.jsonl` to it, row by row, on one
per-row metric (default: execution match for SQL with a database, ROUGE-L otherwise). It
passes only if

  (a) the mean of the metric is not lower than the teacher's by more than `margin`
      (non-inferiority on the observed paired difference; its percentile bootstrap CI is
      reported beside it);
  (b) no slice (rows with a `slice`/`category` field) drops more than `slice_margin` below
      the teacher on that slice, and none scores under the absolute `slice_floor`;
  (c) the candidate's format validity rate is not lower than the teacher's (with the
      constraint on it is 100%).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskling.errors import ConfigError, DataError, RunError, TasklingError
from taskling.evaluate.baseline import GoldChangedError, check_same_gold
from taskling.evaluate.generation import NO_SLICE, load_gold_rows, primary_metric, row_scores
from taskling.evaluate.stats import Interval, bootstrap_interval
from taskling.generate.metrics import aggregate
from taskling.generate.spec import GenerationTask, GenExample, generation_hash
from taskling.io import iter_jsonl, read_json, write_json
from taskling.rundir import GENERATION, RunDir, read_manifest
from taskling.version import __version__

log = logging.getLogger(__name__)
_EPS = 1e-9


class GenerationGateSettings(BaseModel):
    """How strict the generation gate is; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str | None = None  # the per-row metric; None: execution (SQL with a database) or rouge_l
    margin: float = Field(0.02, ge=0, le=1)  # largest drop of the mean allowed
    slice_margin: float = Field(0.10, ge=0, le=1)  # largest drop allowed in any slice
    slice_floor: float = Field(0.0, ge=0, le=1)  # lowest mean any slice may have
    alpha: float = Field(0.05, gt=0, lt=1)
    resamples: int = Field(2000, ge=100)
    seed: int = 0


def run_task(run_dir: str | Path) -> GenerationTask:
    return GenerationTask.model_validate(read_manifest(run_dir, kind=GENERATION)["task"])


def read_outputs(path: Path) -> list[dict[str, Any]]:
    """Teacher rows: `text` and the answer as `output` (or `label`/`response`); a bad row names its line."""
    rows = []
    for number, row in iter_jsonl(path):
        answer = next((row.get(k) for k in ("output", "label", "response") if isinstance(row, dict) and k in row), None)
        if not isinstance(row, dict) or "text" not in row or not isinstance(answer, str):
            raise DataError(
                "expected an object with `text` and the teacher's answer as `output`",
                path=path,
                line=number,
                fix='write one {"text": ..., "output": ...} a line, one for every gold row',
            )
        rows.append({"text": str(row["text"]), "output": answer})
    return rows


def join_outputs(gold: list[GenExample], rows: list[dict[str, Any]], source: Path) -> list[str]:
    """The teacher's output for every gold row, matched by text; a missing one is an error."""
    by_text: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_text[row["text"]].append(row["output"])
    missing = [ex for ex in gold if not by_text.get(ex.text)]
    if missing:
        first = missing[0]
        raise TasklingError(
            f"{source}: no teacher output for {len(missing)} of {len(gold)} gold rows "
            f"(first: {first.source}:{first.line} {first.text!r})",
            fix="run the teacher on every gold row, then pin again",
        )
    return [by_text[ex.text].pop(0) for ex in gold]


def pin_generation_baseline(
    run_dir: str | Path,
    gold_file: str | Path,
    outputs_file: str | Path,
    *,
    name: str = "teacher",
    repin: bool = False,
    embed: bool = True,
) -> dict[str, Any]:
    """Score the teacher's outputs on the gold rows once and pin them in `run_dir/baseline.json`."""
    run_dir, gold_file, outputs_file = Path(run_dir), Path(gold_file), Path(outputs_file)
    task = run_task(run_dir)
    gold = load_gold_rows(gold_file, task)
    gold_hash, target = generation_hash(gold), RunDir(run_dir).baseline
    if target.is_file() and not repin:
        pinned = read_json(target)
        if pinned.get("gold_hash") != gold_hash:
            raise GoldChangedError(
                f"{target} was pinned on gold {str(pinned.get('gold_hash'))[:12]} but {gold_file} now hashes to "
                f"{gold_hash[:12]}",
                fix="if the gold set changed on purpose, re-pin: taskling baseline ... --repin",
            )
        raise TasklingError(f"{target} is already pinned; a baseline is never recomputed silently", fix="pass --repin")
    outputs = join_outputs(gold, read_outputs(outputs_file), outputs_file)
    database = None
    if task.sql is not None:
        from taskling.generate.sql import SqlDatabase

        database = SqlDatabase(task.sql.database)
    valid = [task.format_problem(o) is None and (database is None or database.valid(o)) for o in outputs]
    scores = row_scores(gold, outputs, valid, task, embed=embed, database=database)
    payload = {
        "kind": GENERATION,
        "name": name,
        "task": task.model_dump(mode="json"),
        "source": str(outputs_file),
        "gold_file": str(gold_file.resolve()),
        "gold_hash": gold_hash,
        "n": len(gold),
        "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "taskling_version": __version__,
        "means": {k: v for k, v in aggregate(scores).items() if k != "n"},
        "rows": [
            {"text": ex.text, "gold": ex.answer, "output": out, "slice": ex.slice, "scores": s}
            for ex, out, s in zip(gold, outputs, scores, strict=True)
        ],
    }
    write_json(target, payload)
    return payload


@dataclass
class SliceChange:
    name: str
    support: int
    reference: float
    candidate: float
    delta: Interval
    failed: str  # "" when the slice holds; else why


@dataclass
class GenerationVerdict:
    passed: bool
    metric: str
    candidate: str
    reference: str
    gold_hash: str
    n: int
    reference_mean: float
    candidate_mean: float
    delta: Interval
    candidate_validity: float
    reference_validity: float
    slices: list[SliceChange]
    checks: list[dict[str, Any]]
    thresholds: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scored_rows(path: Path, what: str) -> list[dict[str, Any]]:
    rows = [row for _, row in iter_jsonl(path)]
    if not all(isinstance(r, dict) and isinstance(r.get("scores"), dict) for r in rows):
        raise RunError(f"{path} holds no per-row scores", fix=f"score {what} again with taskling eval")
    return rows


def load_pinned(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RunError(f"nothing to gate against: {path} does not exist", fix="pin the teacher: taskling baseline RUN")
    pinned = read_json(path)
    if not isinstance(pinned, dict) or pinned.get("kind") != GENERATION:
        raise RunError(
            f"{path} is not a generation baseline", fix="pin one: taskling baseline RUN --gold --predictions"
        )
    gold = [GenExample(r["text"], r["gold"]) for r in pinned["rows"]]
    if generation_hash(gold) != pinned["gold_hash"]:
        raise GoldChangedError(
            f"{path}: its rows no longer match its gold hash", fix="re-pin: taskling baseline --repin"
        )
    gold_file = Path(pinned["gold_file"])
    if gold_file.is_file():
        current = generation_hash(load_gold_rows(gold_file, GenerationTask.model_validate(pinned.get("task") or {})))
        if current != pinned["gold_hash"]:
            raise GoldChangedError(
                f"{gold_file} changed since {path} was pinned", fix="re-pin on purpose: taskling baseline --repin"
            )
    return pinned


def slice_changes(slices: list[str], ref: np.ndarray, cand: np.ndarray, s: GenerationGateSettings) -> list[SliceChange]:
    out = []
    names = np.array(slices)
    for name in sorted(set(slices)):
        rows = names == name
        d = bootstrap_interval(cand[rows] - ref[rows], resamples=s.resamples, confidence=1 - s.alpha, seed=s.seed)
        mean = float(cand[rows].mean())
        failed = ""
        if -d.estimate > s.slice_margin + _EPS:
            failed = f"dropped {-d.estimate:.3f} > slice margin {s.slice_margin:.3f}"
        elif mean < s.slice_floor - _EPS:
            failed = f"{mean:.3f} is under the slice floor {s.slice_floor:.3f}"
        out.append(SliceChange(name, int(rows.sum()), float(ref[rows].mean()), mean, d, failed))
    return out


def gate_generation(
    run_dir: str | Path, against: str | Path | None = None, *, write: bool = True, **settings: Any
) -> GenerationVerdict:
    """`taskling gate RUN` for a generation run: its predictions.jsonl against the pinned teacher."""
    try:
        s = GenerationGateSettings.model_validate(settings)
    except ValidationError as err:
        raise ConfigError(f"generation gate settings are invalid: {err}") from None
    run = RunDir(run_dir)
    against = Path(against) if against is not None else run.baseline
    pinned = load_pinned(RunDir(against).baseline if against.is_dir() else against)
    if not run.predictions.is_file():
        raise RunError(f"{run.predictions} does not exist", fix=f"score the run first: taskling eval {run.root} --data")
    cand_rows = scored_rows(run.predictions, str(run.root))
    cand_gold = [GenExample(r["text"], r["gold"]) for r in cand_rows]
    check_same_gold((run.predictions, generation_hash(cand_gold)), (against, pinned["gold_hash"]), "gate")
    metric = s.metric or primary_metric(run_task(run.root))
    if any(metric not in r["scores"] for r in [*cand_rows, *pinned["rows"]]):
        raise ConfigError(f"metric {metric!r} is not scored on every row", fix="use rouge_l, chrf, exact, normalised")
    ref = np.array([r["scores"][metric] for r in pinned["rows"]], dtype=np.float64)
    cand = np.array([r["scores"][metric] for r in cand_rows], dtype=np.float64)
    delta = bootstrap_interval(cand - ref, resamples=s.resamples, confidence=1 - s.alpha, seed=s.seed)
    slices = slice_changes([r.get("slice") or NO_SLICE for r in pinned["rows"]], ref, cand, s)
    validity = float(np.mean([r["scores"].get("valid", 0.0) for r in cand_rows]))
    ref_validity = float(np.mean([r["scores"].get("valid", 0.0) for r in pinned["rows"]]))
    bad = [f"{c.name}: {c.failed}" for c in slices if c.failed]
    checks = [
        {
            "name": metric,
            "passed": -delta.estimate <= s.margin + _EPS,
            "detail": f"mean {metric} change {delta.estimate:+.4f} (95% CI {delta.low:+.4f}..{delta.high:+.4f}), "
            f"margin {s.margin:.4f}",
        },
        {"name": "slices", "passed": not bad, "detail": "; ".join(bad) or f"{len(slices)} slice(s) hold"},
        {
            "name": "format validity",
            "passed": validity >= ref_validity - _EPS,
            "detail": f"candidate {validity:.2%} valid, teacher {ref_validity:.2%}",
        },
    ]
    verdict = GenerationVerdict(
        passed=all(c["passed"] for c in checks),
        metric=metric,
        candidate=run.root.name,
        reference=str(pinned.get("name", "teacher")),
        gold_hash=pinned["gold_hash"],
        n=len(ref),
        reference_mean=float(ref.mean()),
        candidate_mean=float(cand.mean()),
        delta=delta,
        candidate_validity=validity,
        reference_validity=ref_validity,
        slices=slices,
        checks=checks,
        thresholds=s.model_dump(),
    )
    if write:
        write_json(run.gate, {"gated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **verdict.to_dict()})
    return verdict
