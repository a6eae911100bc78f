"""Metrics for records and free text: per field, per enum value, and whole records.

`score_records` compares gold records with predicted ones field by field:

- every field: exact match (after JSON parsing; `null` is a value like any other);
- enum and boolean fields: accuracy, plus `evaluate.score`'s full classification metrics
  over the field's values (null counted as the value "null"), so the worst value is named;
- string fields: normalised match (case, punctuation and spacing ignored), character-level
  F1 on the normalised strings, and ROUGE-L;
- the whole record: exact match; the worst field named like the worst category;
- invalid outputs (answers that do not parse or validate): their rate, which constrained
  decoding keeps at 0.

`metrics.json` carries the classification `Metrics` keys too (`accuracy` = record exact
match, `per_category` = per field, `worst_category` = the worst field,
`out_of_label_set_rate` = invalid outputs), so `evaluate.Metrics(**...)` and the HTML
report's per-category bars read it unchanged. Every enum field also gets
`fields/NAME/predictions.jsonl` + `labels.json`: a classification run directory in
miniature, which `taskling gate` and `taskling report` take as they are.

`score_texts` scores free-text generation: exact match, normalised match, char F1, ROUGE-L.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskling.evaluate.metrics import score, timing, write_scores
from taskling.extract.schema import ExtractionTask, load_records, records_hash
from taskling.generate.metrics import normalise, rouge_l
from taskling.io import write_json, write_jsonl
from taskling.rundir import RunDir

NULL = "null"


def char_f1(gold: str, predicted: str) -> float:
    """F1 of the overlapping characters (a bag of characters) of the normalised strings."""
    g, p = Counter(normalise(gold).replace(" ", "")), Counter(normalise(predicted).replace(" ", ""))
    if not g and not p:
        return 1.0
    common = sum((g & p).values())
    if not common:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def score_texts(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Free-text generation: exact match, normalised match, character F1 and ROUGE-L, averaged."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"{len(gold)} gold texts but {len(predicted)} predictions")
    n = len(gold)
    return {
        "n": n,
        "exact_match": sum(g == p for g, p in zip(gold, predicted, strict=True)) / n,
        "normalised_match": sum(normalise(g) == normalise(p) for g, p in zip(gold, predicted, strict=True)) / n,
        "char_f1": sum(char_f1(g, p) for g, p in zip(gold, predicted, strict=True)) / n,
        "rouge_l": sum(rouge_l(g, p) for g, p in zip(gold, predicted, strict=True)) / n,
    }


def _as_label(value: Any) -> str:
    return NULL if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


def score_records(
    gold: Sequence[dict[str, Any]], predicted: Sequence[dict[str, Any] | None], task: ExtractionTask
) -> dict[str, Any]:
    """Per-field and whole-record scores; a `None` prediction is an invalid output (wrong everywhere)."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"{len(gold)} gold records but {len(predicted)} predictions")
    n = len(gold)
    invalid = sum(p is None for p in predicted)
    preds = [p if p is not None else {} for p in predicted]
    fields: dict[str, dict[str, Any]] = {}
    per_category: dict[str, dict[str, float]] = {}
    for spec in task.fields:
        g = [r.get(spec.name) for r in gold]
        p = [r.get(spec.name, "<invalid>") if r else "<invalid>" for r in preds]
        exact = sum(a == b for a, b in zip(g, p, strict=True)) / n
        entry: dict[str, Any] = {"type": spec.type, "exact_match": exact, "support": n}
        entry["gold_non_null"] = sum(v is not None for v in g)
        if spec.type in ("enum", "boolean"):
            values = list(spec.values) if spec.type == "enum" else ["true", "false"]
            labels = values + ([NULL] if not spec.required else [])
            m = score([_as_label(v) for v in g], [_as_label(v) for v in p], labels)
            entry.update(accuracy=m.accuracy, macro_f1=m.macro_f1, metrics=m.to_dict())
        elif spec.type == "string":
            gs = ["" if v is None else str(v) for v in g]
            ps = ["" if v is None or v == "<invalid>" else str(v) for v in p]
            entry.update(
                normalised_match=sum(
                    (a is None) == (b is None) and normalise(x) == normalise(y)
                    for a, b, x, y in zip(g, p, gs, ps, strict=True)
                )
                / n,
                char_f1=sum(char_f1(x, y) for x, y in zip(gs, ps, strict=True)) / n,
                rouge_l=sum(rouge_l(x, y) for x, y in zip(gs, ps, strict=True)) / n,
            )
            # Mostly-null fields look good on the null rows alone; this scores the rows that hold a value.
            present = [char_f1(x, y) for a, x, y in zip(g, gs, ps, strict=True) if a is not None]
            entry["char_f1_non_null"] = sum(present) / len(present) if present else None
        fields[spec.name] = entry
        acc = entry.get("accuracy", exact)
        per_category[spec.name] = {"accuracy": acc, "precision": acc, "f1": acc, "support": n}
    worst = min(per_category, key=lambda k: (per_category[k]["accuracy"], k))
    record_exact = (
        sum(bool(p) and all(p.get(k) == r.get(k) for k in task.field_names) for r, p in zip(gold, preds, strict=True))
        / n
    )
    return {
        # The classification Metrics keys, so the report and gate tooling read this file as is.
        "n": n,
        "accuracy": record_exact,
        "macro_f1": sum(v["accuracy"] for v in per_category.values()) / len(per_category),
        "per_category": per_category,
        "worst_category": worst,
        "worst_category_accuracy": per_category[worst]["accuracy"],
        "out_of_label_set_rate": invalid / n,
        "confusion_labels": [],
        "confusion": [],
        # Extraction names for the same numbers, and the per-field detail.
        "record_exact_match": record_exact,
        "invalid_output_rate": invalid / n,
        "worst_field": worst,
        "worst_field_accuracy": per_category[worst]["accuracy"],
        "fields": fields,
    }


@dataclass
class ExtractionEval:
    metrics: dict[str, Any]
    metrics_path: Path
    predictions_path: Path
    seconds: float


def evaluate_extraction(
    run_dir: str | Path,
    data: str | Path,
    *,
    out_dir: str | Path | None = None,
    extractor: Any = None,
    limit: int | None = None,
) -> ExtractionEval:
    """Extract a record for every row of `data` and write metrics.json, predictions.jsonl and fields/."""
    from taskling.extract.extractor import Extractor

    run_dir = Path(run_dir)
    ext = extractor or Extractor.from_run(run_dir)
    gold = load_records([Path(data)], ext.task).examples[:limit]
    started = time.perf_counter()
    results = ext.extract([ex.text for ex in gold])
    seconds = time.perf_counter() - started
    predicted = [r.record if r.valid else None for r in results]
    metrics = score_records([ex.record for ex in gold], predicted, ext.task)
    out = RunDir(out_dir if out_dir is not None else run_dir)
    payload: dict[str, Any] = {"kind": "extraction", "gold_file": str(data), "gold_hash": records_hash(gold)}
    payload |= {**timing(seconds, len(gold)), **metrics}
    rows = (
        {
            "text": ex.text,
            "gold": ext.task.render(ex.record),
            "label": r.answer,
            "valid": r.valid,
            "record": r.record,
            "confidence": r.confidence,
        }
        for ex, r in zip(gold, results, strict=True)
    )
    metrics_path, predictions_path = write_scores(out, payload, rows)
    for spec in ext.task.fields:
        if spec.type != "enum":
            continue
        labels = list(spec.values) + ([NULL] if not spec.required else [])
        field_dir = RunDir(out.fields / spec.name)
        write_json(field_dir.labels, labels)
        write_jsonl(
            field_dir.predictions,
            (
                {
                    "text": ex.text,
                    "gold": _as_label(ex.record.get(spec.name)),
                    "label": _as_label(r.record.get(spec.name)) if r.valid else "<invalid>",
                    "probability": r.confidence.get(spec.name, 0.0),
                }
                for ex, r in zip(gold, results, strict=True)
            ),
        )
    return ExtractionEval(payload, metrics_path, predictions_path, seconds)
