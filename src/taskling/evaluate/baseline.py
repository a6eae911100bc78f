"""Scored label lists and the frozen baseline the gate holds candidates to.

A `Scored` is one system's labels on a gold set, in gold order, with the file it came from;
its `gold_hash` identifies the gold rows by content. `load_predictions` reads a run's
`predictions.jsonl`; `pin_baseline` scores a reference system's labels on the gold set once
and writes `RUN_DIR/baseline.json` (its metrics, its label for every gold row, the gold
set's content hash). It is never recomputed silently: pinning again, or gating against a
gold set whose content changed, is a `GoldChangedError` until the user re-pins on purpose
(`repin=True`, `taskling baseline --repin`). `check_same_gold` is the one place that refuses
to compare scores made on two different gold sets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskling.data.load import Example, content_hash, load_file
from taskling.errors import DataError, RunError, TasklingError
from taskling.evaluate.metrics import Metrics, score
from taskling.io import iter_jsonl, read_json, write_json
from taskling.rundir import RunDir
from taskling.task import Task
from taskling.version import __version__

log = logging.getLogger(__name__)


class GoldChangedError(TasklingError):
    """The gold set's content differs from the one the baseline was pinned on."""


class GoldMismatchError(GoldChangedError):
    """Two artifacts that are about to be compared were scored on different gold sets."""


def check_same_gold(first: tuple[str | Path, str | None], second: tuple[str | Path, str | None], what: str) -> None:
    """Refuse to compare `(file, gold hash)` pairs whose gold hashes differ (or one is unknown)."""
    (file_a, hash_a), (file_b, hash_b) = first, second
    if hash_a and hash_b and hash_a == hash_b:
        return
    shown_a, shown_b = (h[:16] if h else "not recorded" for h in (hash_a, hash_b))
    raise GoldMismatchError(
        f"cannot {what}: {file_a} was scored on gold {shown_a} but {file_b} on gold {shown_b}",
        fix="score both on the same gold file (taskling eval RUN --data GOLD.jsonl, or re-run the ladder "
        "with --gold GOLD.jsonl); scores on different gold sets are not comparable",
    )


# ---------------------------------------------------------------- scored rows


@dataclass
class Scored:
    """One system's labels on a gold set, in gold order."""

    name: str
    labels: list[str]
    texts: list[str]
    gold: list[str]
    predicted: list[str]
    source: str = ""  # the file the labels were read from, for error messages

    @property
    def gold_hash(self) -> str:
        return content_hash(Example(t, g) for t, g in zip(self.texts, self.gold, strict=True))

    def metrics(self) -> Metrics:
        return score(self.gold, self.predicted, self.labels)


def read_prediction_rows(path: Path, *, need_gold: bool = False) -> list[dict[str, Any]]:
    """Rows with `text` and `label` (and `gold` if `need_gold`); a bad row is a DataError with its line."""
    rows = []
    for number, row in iter_jsonl(path):
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise DataError(
                "expected an object with `text` and `label`",
                path=path,
                line=number,
                fix='write predictions as {"text": ..., "label": ...} (a predictions.jsonl from taskling eval works)',
            )
        if need_gold and "gold" not in row:
            raise DataError(
                "row has no `gold` label",
                path=path,
                line=number,
                fix="use a predictions.jsonl written by taskling eval, or pin it as a baseline with --gold",
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
    run = RunDir(run_dir)
    if run.manifest.is_file():
        return list(read_json(run.manifest)["task"]["labels"])
    if run.labels.is_file():
        return list(read_json(run.labels))
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
    file = RunDir(path).predictions if path.is_dir() else path
    if not file.is_file():
        raise RunError(
            f"{file} does not exist",
            fix=f"score the run first: taskling eval {run_dir} --data GOLD.jsonl",
        )
    rows = read_prediction_rows(file, need_gold=True)
    labels = list(labels or task_labels(run_dir) or [])
    if not labels:
        raise TasklingError(f"no label set for {file}", fix="pass --labels LABELS.txt")
    return Scored(
        name=name or run_dir.name,
        labels=labels,
        texts=[str(r["text"]) for r in rows],
        gold=[str(r["gold"]) for r in rows],
        predicted=[str(r["label"]) for r in rows],
        source=str(file),
    )


# ---------------------------------------------------------------- the frozen baseline


def hash_gold_file(path: Path, labels: Sequence[str]) -> str:
    """The content hash of a gold file, as `taskling eval` and the baseline record it."""
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
    target = RunDir(run_dir).baseline
    labels = list(labels or task_labels(run_dir) or [])
    if not labels:
        raise TasklingError(
            f"no label set: {RunDir(run_dir).manifest} does not exist", fix="pass --labels LABELS.txt (or a,b,c)"
        )
    gold = load_file(gold_file, Task(labels=tuple(labels))).examples
    gold_hash = content_hash(gold)
    if target.is_file() and not repin:
        pinned = read_json(target)
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
    predicted = join_to_gold(gold, read_prediction_rows(predictions_file), predictions_file)
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
    write_json(target, payload)
    log.info("pinned %s: accuracy %.4f on %d gold rows (%s)", target, metrics.accuracy, len(gold), gold_hash[:12])
    return payload


def load_baseline(path: str | Path, *, check_gold: bool = True) -> Scored:
    """A pinned baseline; with `check_gold`, refuse if its gold file's content has changed."""
    path = Path(path)
    file = RunDir(path).baseline if path.is_dir() else path
    if not file.is_file():
        raise RunError(f"{file} does not exist", fix="pin one: taskling baseline RUN_DIR --gold ... --predictions ...")
    pinned = read_json(file)
    rows = pinned["predictions"]
    scored = Scored(
        name=str(pinned.get("name", "baseline")),
        labels=list(pinned["labels"]),
        texts=[r["text"] for r in rows],
        gold=[r["gold"] for r in rows],
        predicted=[r["label"] for r in rows],
        source=str(file),
    )
    if scored.gold_hash != pinned["gold_hash"]:
        raise GoldChangedError(
            f"{file}: its pinned rows no longer match its gold hash (the file was edited)",
            fix="re-pin on purpose: taskling baseline ... --repin",
        )
    gold_file = Path(pinned["gold_file"])
    if check_gold and gold_file.is_file():
        current = hash_gold_file(gold_file, scored.labels)
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
    if path.is_dir() and RunDir(path).baseline.is_file():
        return load_baseline(path)
    return load_predictions(path)
