"""The run registry: every run directory under a root, with its metrics, gold hash and verdict.

Nothing is stored beyond the run directories themselves: `list_runs` reads `metrics.json`,
`baseline.json` and `gate.json` from each, so the registry is always what is on disk.
`compare` shows what changed per category between two runs, paired (McNemar per category,
bootstrap CIs); two runs scored on different gold sets are refused (`GoldMismatchError`):
their numbers are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskling.errors import RunError
from taskling.evaluate.baseline import check_same_gold, load_predictions, task_labels
from taskling.evaluate.gate import GateVerdict, gate
from taskling.io import read_json
from taskling.rundir import RunDir


@dataclass
class RunSummary:
    name: str
    path: Path
    accuracy: float | None
    macro_f1: float | None
    worst_category: str | None
    worst_category_accuracy: float | None
    n: int | None
    gold_hash: str | None
    baseline_accuracy: float | None
    baseline_on_other_gold: bool  # the pinned baseline's gold hash is not the metrics' one
    gate: str  # "pass", "fail: accuracy, categories", or "-" when never gated
    modified: float


def _read(path: Path) -> dict[str, Any] | None:
    return dict(read_json(path)) if path.is_file() else None


def _is_run(path: Path) -> bool:
    run = RunDir(path)
    return any(p.is_file() for p in (run.metrics, run.manifest, run.baseline))


def summarize(path: Path) -> RunSummary:
    run = RunDir(path)
    metrics = _read(run.metrics) or {}
    baseline = _read(run.baseline)
    verdict = _read(run.gate)
    if verdict is None:
        gate_text = "-"
    elif verdict["passed"]:
        gate_text = "pass"
    else:
        gate_text = "fail: " + ", ".join(c["name"] for c in verdict["checks"] if not c["passed"])
    stamps = [p.stat().st_mtime for p in path.iterdir() if p.is_file()] or [path.stat().st_mtime]
    return RunSummary(
        name=path.name,
        path=path,
        accuracy=metrics.get("accuracy"),
        macro_f1=metrics.get("macro_f1"),
        worst_category=metrics.get("worst_category"),
        worst_category_accuracy=metrics.get("worst_category_accuracy"),
        n=metrics.get("n"),
        gold_hash=metrics.get("gold_hash") or (baseline or {}).get("gold_hash"),
        baseline_accuracy=None if baseline is None else baseline["metrics"]["accuracy"],
        baseline_on_other_gold=bool(
            baseline and metrics.get("gold_hash") and baseline.get("gold_hash") != metrics["gold_hash"]
        ),
        gate=gate_text,
        modified=max(stamps),
    )


def list_runs(root: str | Path = "runs", *, depth: int = 3) -> list[RunSummary]:
    """Run directories under `root` (to `depth` levels, so ladder rungs under a run show too), newest first."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root} is not a directory", fix="pass the folder that holds your run directories")
    found: list[Path] = []
    frontier = [root]
    for _ in range(depth):
        frontier = sorted(p for d in frontier for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        found += [p for p in frontier if _is_run(p)]
    if _is_run(root):
        found.append(root)
    return sorted((summarize(p) for p in found), key=lambda s: -s.modified)


@dataclass
class Comparison:
    a: str
    b: str
    paired: bool  # always True: runs on different gold sets are refused
    accuracy: tuple[float, float]
    verdict: GateVerdict  # B held to A
    per_category: list[tuple[str, float | None, float | None]]  # label, accuracy in A, in B


def compare(a: str | Path, b: str | Path) -> Comparison:
    """What changed from run A to run B, per category; both must be scored on the same gold set."""
    a, b = Path(a), Path(b)
    labels = task_labels(a) or task_labels(b)
    sa = load_predictions(a, labels=labels)
    sb = load_predictions(b, labels=sa.labels)
    check_same_gold((sa.source, sa.gold_hash), (sb.source, sb.gold_hash), "compare these runs")
    ma, mb = sa.metrics(), sb.metrics()
    cats = sorted(set(ma.per_category) | set(mb.per_category))
    rows = [
        (label, _acc(ma.per_category.get(label)), _acc(mb.per_category.get(label)))
        for label in cats
        if (ma.per_category.get(label) or {}).get("support") or (mb.per_category.get(label) or {}).get("support")
    ]
    return Comparison(
        a=str(a),
        b=str(b),
        paired=True,
        accuracy=(ma.accuracy, mb.accuracy),
        verdict=gate(sb, sa),
        per_category=rows,
    )


def _acc(row: dict[str, float] | None) -> float | None:
    return None if not row or not row.get("support") else float(row["accuracy"])
