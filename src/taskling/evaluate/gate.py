"""The bar: a frozen reference baseline and the ship gate that holds a candidate to it.

`pin_baseline` scores a reference system's labels (the teacher, or any earlier system) on
the gold set once and writes `RUN_DIR/baseline.json`: its metrics, its label for every gold
row, and the gold set's content hash. It is never recomputed silently: pinning again, or
gating against a gold set whose content changed, is a `GoldChangedError` until the user
re-pins on purpose (`repin=True`, `taskling baseline --repin`).

`gate` compares a candidate's predictions with the reference on the *same* gold rows and
passes only if

  (a) accuracy is not worse than the reference's by more than `margin`, judged by McNemar's
      test on the paired rows (mid-p by default) so a drop that is noise is not called a
      regression; the bootstrap CI of the difference is reported beside it;
  (b) no category lost more than `category_tolerance` accuracy, unless the paired bootstrap
      CI of that category's change still reaches 0 (noise on a handful of rows);
  (c) no prediction lies outside the label set.

The verdict (`GateVerdict`) names each check, whether it passed and why, and is written to
`gate.json` beside the candidate's predictions so `taskling runs` can list it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from taskling.data.load import Example, content_hash, load_file
from taskling.errors import RunError, TasklingError
from taskling.evaluate.metrics import Metrics, score
from taskling.io import write_text
from taskling.task import Task
from taskling.version import __version__

log = logging.getLogger(__name__)

BASELINE_FILE = "baseline.json"
GATE_FILE = "gate.json"


class GoldChangedError(TasklingError):
    """The gold set's content differs from the one the baseline was pinned on."""


# ---------------------------------------------------------------- statistics


def mcnemar(b: int, c: int, *, mid_p: bool = True) -> float:
    """Two-sided p-value of McNemar's exact test on the discordant pair counts.

    `b`: rows the reference got right and the candidate wrong; `c`: the reverse. Under the
    null each discordant row is a fair coin, so the count is Binomial(b + c, 1/2). The exact
    p is 2 * P(X <= min(b, c)); the mid-p subtracts P(X = min(b, c)) once, which keeps the
    nominal error rate far better than the conservative exact test (Fagerland et al. 2013).
    """
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # Exact integer arithmetic: n is at most the gold set size, so this stays cheap.
    below = sum(math.comb(n, i) for i in range(k + 1))
    total = 2**n
    exact = min(1.0, 2 * below / total)
    if not mid_p:
        return exact
    return min(1.0, (2 * below - math.comb(n, k)) / total)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_interval(
    values: np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile bootstrap CI of the mean of `values` (per-row 0/1, or paired differences)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high))


# ---------------------------------------------------------------- scored rows


@dataclass
class Scored:
    """One system's labels on a gold set, in gold order."""

    name: str
    labels: list[str]
    texts: list[str]
    gold: list[str]
    predicted: list[str]

    @property
    def gold_hash(self) -> str:
        return content_hash(Example(t, g) for t, g in zip(self.texts, self.gold, strict=True))

    def metrics(self) -> Metrics:
        return score(self.gold, self.predicted, self.labels)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TasklingError(f"{path}:{number}: not valid JSON ({err.msg})", fix="one JSON object a line") from None
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise TasklingError(
                f"{path}:{number}: expected an object with `text` and `label`",
                fix='write predictions as {"text": ..., "label": ...} (a predictions.jsonl from taskling eval works)',
            )
        rows.append(row)
    return rows


def join_to_gold(gold: Sequence[Example], rows: Sequence[dict[str, Any]], source: str | Path) -> list[str]:
    """The predicted label for every gold row, matched by text; a missing row is an error."""
    by_text: dict[str, list[str]] = {}
    for row in rows:
        by_text.setdefault(str(row["text"]), []).append(str(row["label"]))
    predicted, missing = [], []
    for ex in gold:
        queue = by_text.get(ex.text)
        if queue:
            predicted.append(queue.pop(0))
        else:
            missing.append(ex)
    if missing:
        first = missing[0]
        raise TasklingError(
            f"{source}: no prediction for {len(missing)} of {len(gold)} gold rows "
            f"(first: {first.source}:{first.line} {first.text!r})",
            fix="label every gold row with the reference system, then pin again",
        )
    return predicted


def task_labels(run_dir: Path) -> list[str] | None:
    """The label set of a run (run.json) or of a ladder rung (labels.json), if recorded."""
    manifest = run_dir / "run.json"
    if manifest.is_file():
        return list(json.loads(manifest.read_text())["task"]["labels"])
    listed = run_dir / "labels.json"
    if listed.is_file():
        return list(json.loads(listed.read_text()))
    return None


def read_labels(spec: str | Path) -> list[str]:
    """Labels from a file (one a line) or a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        return [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [x.strip() for x in str(spec).split(",") if x.strip()]


def load_predictions(path: str | Path, labels: Sequence[str] | None = None, name: str | None = None) -> Scored:
    """A run directory's `predictions.jsonl` (or such a file): rows with text, gold and label."""
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    file = path / "predictions.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise RunError(
            f"{file} does not exist",
            fix=f"score the run first: taskling eval {run_dir} --data GOLD.jsonl",
        )
    rows = _read_jsonl(file)
    no_gold = [i for i, row in enumerate(rows, start=1) if "gold" not in row]
    if no_gold:
        raise TasklingError(
            f"{file}:{no_gold[0]}: row has no `gold` label ({len(no_gold)} rows)",
            fix="use a predictions.jsonl written by taskling eval, or pin it as a baseline with --gold",
        )
    labels = list(labels or task_labels(run_dir) or [])
    if not labels:
        raise TasklingError(f"no label set for {file}", fix="pass --labels LABELS.txt")
    return Scored(
        name=name or run_dir.name,
        labels=labels,
        texts=[str(r["text"]) for r in rows],
        gold=[str(r["gold"]) for r in rows],
        predicted=[str(r["label"]) for r in rows],
    )


# ---------------------------------------------------------------- the frozen baseline


def _hash_file(path: Path, labels: Sequence[str]) -> str:
    task = Task(labels=tuple(labels))
    return content_hash(load_file(path, task).examples)


def pin_baseline(
    run_dir: str | Path,
    gold_file: str | Path,
    predictions_file: str | Path,
    *,
    labels: Sequence[str] | None = None,
    name: str = "baseline",
    repin: bool = False,
) -> dict[str, Any]:
    """Score a reference system's labels on the gold set and pin them in `run_dir/baseline.json`."""
    run_dir, gold_file, predictions_file = Path(run_dir), Path(gold_file), Path(predictions_file)
    labels = list(labels or task_labels(run_dir) or [])
    if not labels:
        raise TasklingError(
            f"no label set: {run_dir}/run.json does not exist", fix="pass --labels LABELS.txt (or a,b,c)"
        )
    gold = load_file(gold_file, Task(labels=tuple(labels))).examples
    gold_hash = content_hash(gold)
    target = run_dir / BASELINE_FILE
    if target.is_file() and not repin:
        pinned = json.loads(target.read_text())
        if pinned["gold_hash"] != gold_hash:
            raise GoldChangedError(
                f"{target} was pinned on gold {pinned['gold_hash'][:12]} ({pinned['n']} rows) but "
                f"{gold_file} now hashes to {gold_hash[:12]} ({len(gold)} rows)",
                fix="if the gold set changed on purpose, re-pin: taskling baseline ... --repin",
            )
        raise TasklingError(
            f"{target} is already pinned (gold {gold_hash[:12]}); a baseline is never recomputed silently",
            fix="pass --repin to replace it on purpose",
        )
    predicted = join_to_gold(gold, _read_jsonl(predictions_file), predictions_file)
    metrics = score([ex.label for ex in gold], predicted, labels)
    payload = {
        "name": name,
        "source": str(predictions_file),
        "gold_file": str(gold_file.resolve()),
        "gold_hash": gold_hash,
        "labels": labels,
        "n": len(gold),
        "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "taskling_version": __version__,
        "metrics": metrics.to_dict(),
        "predictions": [{"text": ex.text, "gold": ex.label, "label": p} for ex, p in zip(gold, predicted, strict=True)],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    tmp.replace(target)
    log.info("pinned %s: accuracy %.4f on %d gold rows (%s)", target, metrics.accuracy, len(gold), gold_hash[:12])
    return payload


def load_baseline(path: str | Path, *, check_gold: bool = True) -> Scored:
    """A pinned baseline; with `check_gold`, refuse if its gold file's content has changed."""
    path = Path(path)
    file = path / BASELINE_FILE if path.is_dir() else path
    if not file.is_file():
        raise RunError(f"{file} does not exist", fix="pin one: taskling baseline RUN_DIR --gold ... --predictions ...")
    pinned = json.loads(file.read_text())
    rows = pinned["predictions"]
    scored = Scored(
        name=str(pinned.get("name", "baseline")),
        labels=list(pinned["labels"]),
        texts=[r["text"] for r in rows],
        gold=[r["gold"] for r in rows],
        predicted=[r["label"] for r in rows],
    )
    if scored.gold_hash != pinned["gold_hash"]:
        raise GoldChangedError(
            f"{file}: its pinned rows no longer match its gold hash (the file was edited)",
            fix="re-pin on purpose: taskling baseline ... --repin",
        )
    gold_file = Path(pinned["gold_file"])
    if check_gold and gold_file.is_file():
        current = _hash_file(gold_file, scored.labels)
        if current != pinned["gold_hash"]:
            raise GoldChangedError(
                f"{gold_file} changed since {file} was pinned (hash {pinned['gold_hash'][:12]} -> {current[:12]})",
                fix="scores on another gold set are not comparable; re-pin on purpose: taskling baseline --repin",
            )
    elif check_gold:
        log.warning("%s: gold file %s is gone; gating on the pinned rows", file, gold_file)
    return scored


def load_reference(path: str | Path) -> Scored:
    """`--against`: a baseline.json, a run dir holding one, or a previous run's predictions."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return load_baseline(path)
    if path.is_dir() and (path / BASELINE_FILE).is_file():
        return load_baseline(path)
    return load_predictions(path)


# ---------------------------------------------------------------- the gate


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
    regressed: bool


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

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _assessment(delta: float, p: float, alpha: float) -> str:
    if p >= alpha or delta == 0:
        return "no significant difference"
    return "win" if delta > 0 else "regression"


def gate(
    candidate: Scored,
    reference: Scored,
    *,
    margin: float = 0.01,
    category_tolerance: float = 0.10,
    alpha: float = 0.05,
    mid_p: bool = True,
    resamples: int = 2000,
    seed: int = 0,
) -> GateVerdict:
    """Hold `candidate` to `reference` on the same gold rows; see the module docstring."""
    if candidate.gold_hash != reference.gold_hash:
        raise GoldChangedError(
            f"{candidate.name} was scored on gold {candidate.gold_hash[:12]} ({len(candidate.gold)} rows) but "
            f"{reference.name} on gold {reference.gold_hash[:12]} ({len(reference.gold)} rows)",
            fix="score the candidate on the pinned gold file (taskling eval RUN --data GOLD), "
            "or re-pin the baseline on purpose with --repin",
        )
    labels = reference.labels
    gold = np.array(reference.gold)
    ref_ok = np.array(reference.predicted) == gold
    cand_ok = np.array(candidate.predicted) == gold
    diff = cand_ok.astype(np.float64) - ref_ok.astype(np.float64)
    b, c = int((ref_ok & ~cand_ok).sum()), int((~ref_ok & cand_ok).sum())
    p = mcnemar(b, c, mid_p=mid_p)

    def boot(values: np.ndarray) -> Interval:
        return bootstrap_interval(values, resamples=resamples, confidence=1 - alpha, seed=seed)

    delta = boot(diff)
    allowed = set(labels)
    outside = sum(1 for label in candidate.predicted if label not in allowed)

    categories = []
    for label in labels:
        rows = gold == label
        if not rows.any():
            continue
        d = boot(diff[rows])
        cb, cc = int((ref_ok & ~cand_ok & rows).sum()), int((~ref_ok & cand_ok & rows).sum())
        # A drop beyond tolerance counts only if its paired CI excludes 0: one flipped row
        # out of five is not evidence, five out of five is.
        dropped = -d.estimate > category_tolerance and d.high < 0
        categories.append(
            CategoryChange(
                label=label,
                support=int(rows.sum()),
                reference=float(ref_ok[rows].mean()),
                candidate=float(cand_ok[rows].mean()),
                delta=d,
                p_value=mcnemar(cb, cc, mid_p=mid_p),
                regressed=dropped,
            )
        )

    assessment = _assessment(delta.estimate, p, alpha)
    test = "McNemar mid-p" if mid_p else "McNemar exact"
    accuracy_failed = delta.estimate < -margin and p < alpha
    if accuracy_failed:
        why = f"accuracy dropped {-delta.estimate:.2%} (> margin {margin:.2%}), significant: {test} p={p:.3g}"
    elif delta.estimate < -margin:
        why = f"accuracy dropped {-delta.estimate:.2%} (> margin {margin:.2%}) but within noise: {test} p={p:.3g}"
    else:
        why = f"accuracy change {delta.estimate:+.2%} (margin {margin:.2%}); {test} p={p:.3g}, {assessment}"
    regressed = [cat for cat in categories if cat.regressed]
    if regressed:
        cat_detail = "; ".join(
            f"{cat.label} {cat.reference:.0%} -> {cat.candidate:.0%} (n={cat.support}, "
            f"CI {cat.delta.low:+.0%}..{cat.delta.high:+.0%})"
            for cat in regressed
        )
    else:
        worst = min(categories, key=lambda cat: cat.delta.estimate)
        if worst.delta.estimate < 0:
            drop = -worst.delta.estimate
            cat_detail = f"largest drop {worst.label} {drop:.0%} (tolerance {category_tolerance:.0%})"
        else:
            cat_detail = f"no category dropped (tolerance {category_tolerance:.0%})"
    checks = [
        Check("accuracy", not accuracy_failed, why),
        Check("categories", not regressed, cat_detail),
        Check("label set", outside == 0, f"{outside} prediction(s) outside the label set"),
    ]
    ref_boot = boot(ref_ok)
    cand_boot = boot(cand_ok)
    return GateVerdict(
        passed=all(check.passed for check in checks),
        candidate=candidate.name,
        reference=reference.name,
        gold_hash=reference.gold_hash,
        n=len(gold),
        reference_accuracy=ref_boot,
        candidate_accuracy=cand_boot,
        delta=delta,
        discordant=(b, c),
        p_value=p,
        assessment=assessment,
        outside_label_set=outside,
        categories=categories,
        checks=checks,
        thresholds={
            "margin": margin,
            "category_tolerance": category_tolerance,
            "alpha": alpha,
            "test": test,
            "bootstrap_resamples": resamples,
        },
    )


def write_verdict(verdict: GateVerdict, path: str | Path) -> Path:
    path = Path(path)
    file = path / GATE_FILE if path.is_dir() else path
    payload = {"gated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **verdict.to_dict()}
    write_text(file, json.dumps(payload, indent=2, ensure_ascii=False))
    return file


def gate_paths(
    candidate: str | Path,
    against: str | Path | None = None,
    *,
    gold_file: str | Path | None = None,
    write: bool = True,
    **settings: Any,
) -> GateVerdict:
    """`taskling gate`: resolve the candidate and reference from paths, gate, write gate.json."""
    candidate = Path(candidate)
    run_dir = candidate if candidate.is_dir() else candidate.parent
    against = Path(against) if against is not None else run_dir / BASELINE_FILE
    if not against.exists():
        raise RunError(
            f"nothing to gate against: {against} does not exist",
            fix="pin a baseline (taskling baseline RUN --gold GOLD --predictions TEACHER.jsonl) or pass --against",
        )
    reference = load_reference(against)
    if gold_file is not None:
        current = _hash_file(Path(gold_file), reference.labels)
        if current != reference.gold_hash:
            raise GoldChangedError(
                f"{gold_file} hashes to {current[:12]} but {against} was pinned on {reference.gold_hash[:12]}",
                fix="re-pin on purpose: taskling baseline ... --repin",
            )
    scored = load_predictions(candidate, labels=reference.labels)
    verdict = gate(scored, reference, **settings)
    if write:
        write_verdict(verdict, run_dir)
    return verdict
