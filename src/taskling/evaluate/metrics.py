"""Metrics that expose what an average hides.

`score` compares gold labels with predicted labels: accuracy, macro-F1, per-category
accuracy (recall) with the worst category named, the confusion matrix, and the share of
predictions outside the label set. It takes plain label lists, so any system (the
specialist, the teacher, a baseline) is scored the same way.

`evaluate` runs a trained classifier over a gold file and writes, in the run directory
(or `out_dir`): `metrics.json` and `predictions.jsonl`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from taskling.data.load import content_hash, load_file
from taskling.io import write_json, write_jsonl
from taskling.rundir import RunDir

OUTSIDE = "<outside label set>"


@dataclass
class Metrics:
    n: int
    accuracy: float
    macro_f1: float
    per_category: dict[str, dict[str, float]]  # label -> {accuracy, support, precision, f1}
    worst_category: str
    worst_category_accuracy: float
    out_of_label_set_rate: float
    confusion_labels: list[str]
    confusion: list[list[int]]  # rows: gold, columns: predicted (last column: outside the set)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> Metrics:
    """Score predictions against gold labels over the task's label set."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        raise ValueError("nothing to score: the gold set is empty")
    labels = list(labels)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(gold) - set(index))
    if unknown:
        raise ValueError(f"gold labels outside the label set: {', '.join(unknown[:5])}")
    outside = len(labels)
    confusion = [[0] * (len(labels) + 1) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        confusion[index[g]][index.get(p, outside)] += 1

    per_category: dict[str, dict[str, float]] = {}
    f1s = []
    for i, label in enumerate(labels):
        support = sum(confusion[i])
        tp = confusion[i][i]
        predicted_as = sum(row[i] for row in confusion)
        recall = tp / support if support else 0.0
        precision = tp / predicted_as if predicted_as else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_category[label] = {"accuracy": recall, "precision": precision, "f1": f1, "support": support}
        if support:  # macro-F1 over the labels present in gold, as scikit-learn does with labels=present
            f1s.append(f1)
    present = [label for label in labels if per_category[label]["support"]]
    worst = min(present, key=lambda label: (per_category[label]["accuracy"], label))
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return Metrics(
        n=len(gold),
        accuracy=correct / len(gold),
        macro_f1=sum(f1s) / len(f1s),
        per_category=per_category,
        worst_category=worst,
        worst_category_accuracy=per_category[worst]["accuracy"],
        out_of_label_set_rate=sum(row[outside] for row in confusion) / len(gold),
        confusion_labels=[*labels, OUTSIDE],
        confusion=confusion,
    )


@dataclass
class EvalResult:
    metrics: Metrics
    metrics_path: Path
    predictions_path: Path
    gold_hash: str
    seconds: float


def timing(seconds: float, rows: int) -> dict[str, float]:
    """The `seconds` and `messages_per_second` fields of a metrics.json."""
    return {"seconds": seconds, "messages_per_second": rows / max(seconds, 1e-9)}


def write_scores(out: RunDir, summary: dict[str, Any], rows: Iterable[dict[str, Any]]) -> tuple[Path, Path]:
    """Write a scored gold set: `summary` as metrics.json and one row per message as predictions.jsonl."""
    write_json(out.metrics, summary)
    write_jsonl(out.predictions, rows)
    return out.metrics, out.predictions


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    classifier: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Classify every row of `data` with the run's adapter and write metrics and predictions.

    `progress(done, total)` is called as rows are classified."""
    from taskling.serve.classifier import Classifier

    run_dir = Path(run_dir)
    clf = classifier or Classifier.from_run(run_dir)
    gold = load_file(data, clf.task).examples
    started = time.perf_counter()
    # Only a given callback is passed on: a wrapping classifier may not take one.
    extra = {"progress": progress} if progress is not None else {}
    predictions = clf.predict([ex.text for ex in gold], batch_size=batch_size, **extra)
    seconds = time.perf_counter() - started
    metrics = score([ex.label for ex in gold], [p.label for p in predictions], clf.task.labels)

    gold_hash = content_hash(gold)
    rows = (
        {"text": ex.text, "gold": ex.label, "label": p.label, "probability": p.probability, "margin": p.margin}
        | ({"stage": p.stage} if getattr(p, "stage", None) else {})
        for ex, p in zip(gold, predictions, strict=True)
    )
    summary = {"gold_file": str(data), "gold_hash": gold_hash, **timing(seconds, len(gold)), **metrics.to_dict()}
    if any(getattr(p, "stage", None) for p in predictions):  # a cascade: who answered what, and how well
        from taskling.evaluate.cascade import stage_scores

        summary["stages"] = stage_scores([ex.label for ex in gold], predictions)
    metrics_path, predictions_path = write_scores(RunDir(out_dir if out_dir is not None else run_dir), summary, rows)
    return EvalResult(metrics, metrics_path, predictions_path, gold_hash, seconds)
