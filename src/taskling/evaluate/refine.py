"""Did DPO help? Score an SFT run and its DPO refinement on the same gold file.

`compare` writes `dpo_report.json` into the DPO run: accuracy and per-category (or, for
extraction, per-field) accuracy before and after, the categories helped and hurt, and the
gate's verdict with the DPO run as candidate and the SFT run as reference (`gate.json`,
one per field for extraction). The SFT run's scores go to `DPO_RUN/compare/sft/`, so the
SFT run's own files are left as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskling.evaluate.gate import GateVerdict, gate, load_predictions, write_verdict
from taskling.io import write_json
from taskling.rundir import CLASSIFICATION, RunDir
from taskling.train.dpo import run_kind


def _score_classification(
    sft_run: Path, dpo_run: Path, gold: str | Path, sft_out: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, GateVerdict]]:
    from taskling.evaluate.metrics import evaluate

    before = evaluate(sft_run, gold, out_dir=sft_out).metrics.to_dict()
    after = evaluate(dpo_run, gold).metrics.to_dict()
    labels = before["confusion_labels"][:-1]
    verdict = gate(load_predictions(dpo_run), load_predictions(sft_out, labels=labels, name=sft_run.name))
    write_verdict(verdict, RunDir(dpo_run).gate)
    return before, after, {"label": verdict}


def _score_extraction(
    sft_run: Path, dpo_run: Path, gold: str | Path, sft_out: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, GateVerdict]]:
    from taskling.evaluate.extraction import evaluate_extraction

    before = evaluate_extraction(sft_run, gold, out_dir=sft_out).metrics
    after = evaluate_extraction(dpo_run, gold).metrics
    verdicts = {}
    for field in sorted(p.name for p in RunDir(dpo_run).fields.iterdir()):
        mine, theirs = RunDir(dpo_run).fields / field, RunDir(sft_out).fields / field
        verdicts[field] = gate(
            load_predictions(mine, name=f"{dpo_run.name}:{field}"),
            load_predictions(theirs, name=f"{sft_run.name}:{field}"),
        )
        write_verdict(verdicts[field], RunDir(mine).gate)
    return before, after, verdicts


def per_category_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Accuracy before and after, its change and the support, per category (or field)."""
    per = {}
    for key, was in before["per_category"].items():
        now = after["per_category"][key]
        per[key] = {
            "before": was["accuracy"],
            "after": now["accuracy"],
            "delta": now["accuracy"] - was["accuracy"],
            "support": was["support"],
        }
    return per


def compare(sft_run: str | Path, dpo_run: str | Path, gold: str | Path) -> dict[str, Any]:
    """Score both runs on `gold`; per-category (per-field) change and the gate's verdict."""
    sft_run, dpo_run = Path(sft_run), Path(dpo_run)
    kind = run_kind(dpo_run)
    score = _score_classification if kind == CLASSIFICATION else _score_extraction
    before, after, verdicts = score(sft_run, dpo_run, gold, RunDir(dpo_run).comparison / "sft")
    per = per_category_change(before, after)
    report = {
        "kind": kind,
        "gold_file": str(gold),
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "per_category": per,
        "helped": [k for k, v in per.items() if v["delta"] > 0],
        "hurt": [k for k, v in per.items() if v["delta"] < 0],
        "gate": {
            name: {"passed": v.passed, "assessment": v.assessment, "p_value": v.p_value} for name, v in verdicts.items()
        },
        "gate_passed": all(v.passed for v in verdicts.values()),
    }
    write_json(RunDir(dpo_run).dpo_report, report)
    return report
