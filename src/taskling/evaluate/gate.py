"""The ship gate: hold a candidate to a reference on the *same* gold rows.

`gate` passes only if

  (a) accuracy is not lower than the reference's by more than `margin` (default one point).
      This is a non-inferiority rule on the observed difference: a drop beyond the margin
      fails even when McNemar's paired test calls it "no significant difference" (3 rows
      lost and none won is not significant on 100 rows, and still not a candidate to ship).
      The test (mid-p by default) and the bootstrap CI of the difference are reported beside it;
  (b) no category's accuracy is lower by more than `category_margin` (default ten points of
      that category), significant or not;
  (c) no prediction lies outside the label set.

Two scores on different gold sets are never compared (`check_same_gold`). The verdict
(`GateVerdict`) names each check, whether it passed and why, the margins and the observed
drops, and is written to `gate.json` beside the candidate's predictions so `taskling runs`
and `taskling report` can show it. The frozen baseline lives in `evaluate/baseline.py`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from taskling.errors import ConfigError, RunError
from taskling.evaluate.baseline import (
    GoldChangedError,
    GoldMismatchError,
    Scored,
    check_same_gold,
    hash_gold_file,
    join_to_gold,
    load_baseline,
    load_predictions,
    load_reference,
    pin_baseline,
    read_labels,
    task_labels,
)
from taskling.evaluate.stats import CATEGORY_MARGIN, Interval, bootstrap_interval, mcnemar
from taskling.io import write_json
from taskling.rundir import RunDir

__all__ = [
    "CategoryChange",
    "Check",
    "GateSettings",
    "GateVerdict",
    "GoldChangedError",
    "GoldMismatchError",
    "Interval",
    "Scored",
    "bootstrap_interval",
    "gate",
    "gate_paths",
    "join_to_gold",
    "load_baseline",
    "load_predictions",
    "load_reference",
    "mcnemar",
    "pin_baseline",
    "read_labels",
    "task_labels",
    "write_verdict",
]

# Float noise: a drop of exactly the margin (1 row of 100 against 0.01) is inside it.
_EPS = 1e-9


class GateSettings(BaseModel):
    """How strict the gate is (`taskling gate`/`retrain` options; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    margin: float = Field(0.01, ge=0, le=1)  # largest accuracy drop allowed (0.01 = one point)
    # Largest accuracy drop allowed in any one category; `category_tolerance` is its old name.
    category_margin: float = Field(
        CATEGORY_MARGIN, ge=0, le=1, validation_alias=AliasChoices("category_margin", "category_tolerance")
    )
    alpha: float = Field(0.05, gt=0, lt=1)  # significance level of the tests; CIs are at 1 - alpha
    mid_p: bool = True  # McNemar mid-p (False: the stricter exact p)
    resamples: int = Field(2000, ge=100)
    seed: int = 0


def gate_settings(settings: GateSettings | None = None, **overrides: Any) -> GateSettings:
    """`settings` with `overrides` applied; an unknown or out-of-range value is a ConfigError."""
    base = settings.model_dump() if settings is not None else {}
    try:
        return GateSettings.model_validate({**base, **overrides})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {'unknown setting' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in err.errors()
        )
        raise ConfigError(
            f"gate settings are invalid: {problems}",
            fix="use margin, category_margin, alpha, mid_p, resamples, seed",
        ) from None


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class CategoryChange:
    label: str
    support: int
    reference: float
    candidate: float
    delta: Interval
    p_value: float
    regressed: bool  # dropped by more than the category margin


@dataclass
class GateVerdict:
    passed: bool
    candidate: str
    reference: str
    gold_hash: str
    n: int
    reference_accuracy: Interval
    candidate_accuracy: Interval
    delta: Interval
    discordant: tuple[int, int]  # (reference right & candidate wrong, reference wrong & candidate right)
    p_value: float
    assessment: str  # "win", "regression" or "no significant difference"
    outside_label_set: int
    categories: list[CategoryChange]
    checks: list[Check]
    thresholds: dict[str, Any] = field(default_factory=dict)
    # The margins and the observed drops (positive: the candidate is lower).
    non_inferiority: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _assessment(delta: float, p: float, alpha: float) -> str:
    if p >= alpha or delta == 0:
        return "no significant difference"
    return "win" if delta > 0 else "regression"


def _category_changes(
    labels: list[str], gold: np.ndarray, ref_ok: np.ndarray, cand_ok: np.ndarray, s: GateSettings
) -> list[CategoryChange]:
    diff = cand_ok.astype(np.float64) - ref_ok.astype(np.float64)
    changes = []
    for label in labels:
        rows = gold == label
        if not rows.any():
            continue
        d = bootstrap_interval(diff[rows], resamples=s.resamples, confidence=1 - s.alpha, seed=s.seed)
        lost, won = int((ref_ok & ~cand_ok & rows).sum()), int((~ref_ok & cand_ok & rows).sum())
        changes.append(
            CategoryChange(
                label=label,
                support=int(rows.sum()),
                reference=float(ref_ok[rows].mean()),
                candidate=float(cand_ok[rows].mean()),
                delta=d,
                p_value=mcnemar(lost, won, mid_p=s.mid_p),
                regressed=-d.estimate > s.category_margin + _EPS,
            )
        )
    return changes


def _accuracy_check(delta: Interval, lost: int, won: int, p: float, assessment: str, s: GateSettings) -> Check:
    test = "McNemar mid-p" if s.mid_p else "McNemar exact"
    drop = -delta.estimate
    rows = f"{lost} rows lost, {won} won"
    stats = f"{test} p={p:.3g}, {assessment}"
    if drop > s.margin + _EPS:
        return Check(
            "accuracy",
            False,
            f"accuracy dropped {drop:.2%} ({rows}), more than the margin {s.margin:.2%} ({stats}); "
            "a drop beyond the margin fails even when it is not significant",
        )
    return Check("accuracy", True, f"accuracy change {delta.estimate:+.2%} ({rows}), margin {s.margin:.2%} ({stats})")


def _categories_check(categories: list[CategoryChange], s: GateSettings) -> Check:
    regressed = [cat for cat in categories if cat.regressed]
    if regressed:
        detail = "; ".join(
            f"{cat.label} {cat.reference:.0%} -> {cat.candidate:.0%} (n={cat.support}, dropped "
            f"{-cat.delta.estimate:.0%} > category margin {s.category_margin:.0%}, p={cat.p_value:.2g})"
            for cat in regressed
        )
        return Check("categories", False, detail)
    worst = min(categories, key=lambda cat: cat.delta.estimate)
    if worst.delta.estimate < 0:
        detail = f"largest drop {worst.label} {-worst.delta.estimate:.0%} (category margin {s.category_margin:.0%})"
    else:
        detail = f"no category dropped (category margin {s.category_margin:.0%})"
    return Check("categories", True, detail)


def gate(candidate: Scored, reference: Scored, settings: GateSettings | None = None, **overrides: Any) -> GateVerdict:
    """Hold `candidate` to `reference` on the same gold rows; see the module docstring.

    `overrides` are `GateSettings` fields (`margin=0.02`, `category_margin=0.05`, ...).
    """
    s = gate_settings(settings, **overrides)
    check_same_gold(
        (candidate.source or candidate.name, candidate.gold_hash),
        (reference.source or reference.name, reference.gold_hash),
        "gate",
    )
    gold = np.array(reference.gold)
    ref_ok = np.array(reference.predicted) == gold
    cand_ok = np.array(candidate.predicted) == gold
    lost, won = int((ref_ok & ~cand_ok).sum()), int((~ref_ok & cand_ok).sum())
    p = mcnemar(lost, won, mid_p=s.mid_p)

    def boot(values: np.ndarray) -> Interval:
        return bootstrap_interval(values, resamples=s.resamples, confidence=1 - s.alpha, seed=s.seed)

    delta = boot(cand_ok.astype(np.float64) - ref_ok.astype(np.float64))
    allowed = set(reference.labels)
    outside = sum(1 for label in candidate.predicted if label not in allowed)
    categories = _category_changes(reference.labels, gold, ref_ok, cand_ok, s)
    assessment = _assessment(delta.estimate, p, s.alpha)
    checks = [
        _accuracy_check(delta, lost, won, p, assessment, s),
        _categories_check(categories, s),
        Check("label set", outside == 0, f"{outside} prediction(s) outside the label set"),
    ]
    return GateVerdict(
        passed=all(check.passed for check in checks),
        candidate=candidate.name,
        reference=reference.name,
        gold_hash=reference.gold_hash,
        n=len(gold),
        reference_accuracy=boot(ref_ok),
        candidate_accuracy=boot(cand_ok),
        delta=delta,
        discordant=(lost, won),
        p_value=p,
        assessment=assessment,
        outside_label_set=outside,
        categories=categories,
        checks=checks,
        thresholds={
            "margin": s.margin,
            "category_margin": s.category_margin,
            "alpha": s.alpha,
            "test": "McNemar mid-p" if s.mid_p else "McNemar exact",
            "bootstrap_resamples": s.resamples,
        },
        non_inferiority={
            "margin": s.margin,
            "accuracy_drop": -delta.estimate,
            "category_margin": s.category_margin,
            "category_drops": {cat.label: -cat.delta.estimate for cat in categories},
            "categories_over_margin": [cat.label for cat in categories if cat.regressed],
        },
    )


def write_verdict(verdict: GateVerdict, path: str | Path) -> Path:
    """Write `gate.json` (into `path` if it is a directory); returns the file."""
    path = Path(path)
    file = RunDir(path).gate if path.is_dir() else path
    write_json(file, {"gated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **verdict.to_dict()})
    return file


def gate_paths(
    candidate: str | Path,
    against: str | Path | None = None,
    *,
    gold_file: str | Path | None = None,
    write: bool = True,
    settings: GateSettings | None = None,
    **overrides: Any,
) -> GateVerdict:
    """`taskling gate`: resolve the candidate and reference from paths, gate, write gate.json."""
    candidate = Path(candidate)
    run_dir = candidate if candidate.is_dir() else candidate.parent
    against = Path(against) if against is not None else RunDir(run_dir).baseline
    if not against.exists():
        raise RunError(
            f"nothing to gate against: {against} does not exist",
            fix="pin a baseline (taskling baseline RUN --gold GOLD --predictions TEACHER.jsonl) or pass --against",
        )
    reference = load_reference(against)
    if gold_file is not None:
        check_same_gold(
            (gold_file, hash_gold_file(Path(gold_file), reference.labels)),
            (reference.source or against, reference.gold_hash),
            "gate against the pinned baseline",
        )
    scored = load_predictions(candidate, labels=reference.labels)
    verdict = gate(scored, reference, settings, **overrides)
    if write:
        write_verdict(verdict, run_dir)
    return verdict
