"""The frozen baseline and the ship gate: statistics against hand-worked values, gates that
must fail and pass, and refusal to score against a silently changed gold set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.errors import TasklingError
from taskling.evaluate.gate import (
    GoldChangedError,
    Scored,
    bootstrap_interval,
    gate,
    gate_paths,
    load_baseline,
    mcnemar,
    pin_baseline,
)

LABELS = ["balance", "transfer", "card_lost", "pin_change", "rare_fraud"]


# ---------------------------------------------------------------- statistics


def test_mcnemar_matches_a_table_worked_by_hand() -> None:
    # Paired 2x2 table: both right 80, reference right & candidate wrong b=1,
    # reference wrong & candidate right c=9, both wrong 10. Only b and c matter.
    # X ~ Binomial(10, 1/2); P(X <= 1) = (C(10,0) + C(10,1)) / 2^10 = 11/1024.
    # exact two-sided p = 2 * 11/1024 = 22/1024; mid-p = 22/1024 - C(10,1)/1024 = 12/1024.
    assert mcnemar(1, 9, mid_p=False) == pytest.approx(22 / 1024)
    assert mcnemar(1, 9) == pytest.approx(12 / 1024)
    assert mcnemar(9, 1) == mcnemar(1, 9)  # two-sided: symmetric
    assert mcnemar(0, 0) == 1.0  # no discordant rows: no evidence either way
    assert mcnemar(3, 3, mid_p=False) == 1.0
    # Five flips all one way: exact p = 2/32 is not significant at 5%, mid-p = 1/32 is.
    assert mcnemar(5, 0, mid_p=False) == pytest.approx(0.0625)
    assert mcnemar(0, 5) == pytest.approx(1 / 32)


def test_mcnemar_exact_agrees_with_scipy_binomial_test() -> None:
    from scipy.stats import binomtest

    for b, c in [(2, 7), (10, 4), (0, 12), (25, 40)]:
        assert mcnemar(b, c, mid_p=False) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)


def test_bootstrap_interval_brackets_the_mean() -> None:
    ones = np.array([1] * 70 + [0] * 30)
    ci = bootstrap_interval(ones, resamples=4000, seed=1)
    assert ci.estimate == pytest.approx(0.7)
    # Normal approximation: 0.7 +- 1.96 * sqrt(0.21 / 100) = [0.61, 0.79].
    assert ci.low == pytest.approx(0.61, abs=0.02)
    assert ci.high == pytest.approx(0.79, abs=0.02)
    constant = bootstrap_interval(np.array([-1.0] * 6))
    assert (constant.low, constant.high) == (-1.0, -1.0)


# ---------------------------------------------------------------- the gate


def make_gold() -> tuple[list[str], list[str]]:
    """40 rows for each of four common categories, 6 for the rare one."""
    gold = [label for label in LABELS[:4] for _ in range(40)] + ["rare_fraud"] * 6
    texts = [f"message {i} about {label}" for i, label in enumerate(gold)]
    return texts, gold


def wrong(label: str) -> str:
    return LABELS[(LABELS.index(label) + 1) % 4]


def reference_system() -> Scored:
    """The teacher: 30 of 40 right in each common category, all 6 rare rows right."""
    texts, gold = make_gold()
    predicted = [g if (i % 40) < 30 or g == "rare_fraud" else wrong(g) for i, g in enumerate(gold)]
    return Scored("teacher", LABELS, texts, gold, predicted)


def test_gate_fails_a_candidate_that_forgot_the_rare_category_while_improving_the_average() -> None:
    ref = reference_system()
    texts, gold = make_gold()
    # 38 of 40 right in every common category, but every rare_fraud row called a transfer.
    predicted = [("transfer" if g == "rare_fraud" else g if (i % 40) < 38 else wrong(g)) for i, g in enumerate(gold)]
    verdict = gate(Scored("student", LABELS, texts, gold, predicted), ref)
    assert verdict.candidate_accuracy.estimate > verdict.reference_accuracy.estimate  # the average improved
    assert verdict.assessment == "win"
    assert not verdict.passed
    failed = {c.name: c.detail for c in verdict.failed_checks}
    assert list(failed) == ["categories"]
    assert "rare_fraud 100% -> 0%" in failed["categories"]
    rare = next(c for c in verdict.categories if c.label == "rare_fraud")
    assert rare.regressed and rare.delta.high == -1.0


def test_gate_passes_a_candidate_within_the_margin() -> None:
    ref = reference_system()
    texts, gold = make_gold()
    predicted = list(ref.predicted)
    # Two rows newly wrong, one newly right: a 0.6-point drop on 166 rows, inside the 1-point margin.
    predicted[0], predicted[41], predicted[35] = wrong(gold[0]), wrong(gold[41]), gold[35]
    verdict = gate(Scored("student", LABELS, texts, gold, predicted), ref)
    assert verdict.discordant == (2, 1)
    assert verdict.assessment == "no significant difference"
    assert verdict.passed, verdict.failed_checks
    assert "margin 1.00%" in verdict.checks[0].detail
    assert verdict.delta.contains(0.0)
    # With no margin at all the same drop fails, noise or not: the margin is the allowance.
    strict = gate(Scored("student", LABELS, texts, gold, predicted), ref, margin=0.0)
    assert [c.name for c in strict.failed_checks] == ["accuracy"]


def test_gate_fails_a_significant_regression_and_labels_outside_the_set() -> None:
    ref = reference_system()
    texts, gold = make_gold()
    predicted = [
        wrong(g) if g != "rare_fraud" and i % 40 < 3 else p
        for i, (g, p) in enumerate(zip(gold, ref.predicted, strict=True))
    ]
    predicted[-1] = "I think it is fraud"  # free text, outside the label set
    verdict = gate(Scored("student", LABELS, texts, gold, predicted), ref)
    names = [c.name for c in verdict.failed_checks]
    # rare_fraud lost 1 of its 6 rows: 17 points, beyond the 10-point category margin.
    assert names == ["accuracy", "categories", "label set"]
    assert verdict.non_inferiority["categories_over_margin"] == ["rare_fraud"]
    assert verdict.assessment == "regression"
    assert verdict.outside_label_set == 1
    assert verdict.discordant == (13, 0)
    assert verdict.p_value == pytest.approx(2**-13)


# ---------------------------------------------------------------- pinned baseline on disk


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pinned(tmp_path: Path) -> dict[str, Path]:
    ref = reference_system()
    gold = write_rows(
        tmp_path / "gold.jsonl", [{"text": t, "label": g} for t, g in zip(ref.texts, ref.gold, strict=True)]
    )
    # The teacher's labels, shuffled: rows are matched to gold by text, not by position.
    teacher_rows = [{"text": t, "label": p} for t, p in zip(ref.texts, ref.predicted, strict=True)][::-1]
    teacher = write_rows(tmp_path / "teacher.jsonl", teacher_rows)
    run = tmp_path / "run"
    run.mkdir()
    candidate = [{"text": t, "gold": g, "label": g} for t, g in zip(ref.texts, ref.gold, strict=True)]
    write_rows(run / "predictions.jsonl", candidate)
    return {"gold": gold, "teacher": teacher, "run": run}


def test_baseline_pins_metrics_rows_and_gold_hash(pinned: dict[str, Path]) -> None:
    payload = pin_baseline(pinned["run"], pinned["gold"], pinned["teacher"], labels=LABELS, name="teacher")
    on_disk = json.loads((pinned["run"] / "baseline.json").read_text())
    assert on_disk["gold_hash"] == payload["gold_hash"] and len(payload["gold_hash"]) == 64
    assert on_disk["metrics"]["accuracy"] == pytest.approx(126 / 166)
    assert on_disk["n"] == 166
    assert load_baseline(pinned["run"]).predicted == reference_system().predicted
    with pytest.raises(TasklingError, match="never recomputed silently"):
        pin_baseline(pinned["run"], pinned["gold"], pinned["teacher"], labels=LABELS)


def test_baseline_refuses_a_teacher_file_missing_gold_rows(pinned: dict[str, Path], tmp_path: Path) -> None:
    rows = pinned["teacher"].read_text().splitlines()[:-3]
    short = write_rows(tmp_path / "short.jsonl", [json.loads(r) for r in rows])
    with pytest.raises(TasklingError, match="no prediction for 3 of 166 gold rows"):
        pin_baseline(pinned["run"], pinned["gold"], short, labels=LABELS)


def test_gate_refuses_a_silently_changed_gold_set(pinned: dict[str, Path]) -> None:
    pin_baseline(pinned["run"], pinned["gold"], pinned["teacher"], labels=LABELS)
    assert gate_paths(pinned["run"]).passed
    # Someone "fixes" one gold label in place.
    lines = pinned["gold"].read_text().splitlines()
    row = json.loads(lines[0])
    row["label"] = "transfer"
    lines[0] = json.dumps(row)
    pinned["gold"].write_text("\n".join(lines) + "\n")
    with pytest.raises(GoldChangedError, match="changed since"):
        gate_paths(pinned["run"])
    with pytest.raises(GoldChangedError, match="re-pin"):
        pin_baseline(pinned["run"], pinned["gold"], pinned["teacher"], labels=LABELS)
    # Re-pinning on purpose is allowed; now the candidate, scored on the old gold, is refused.
    pin_baseline(pinned["run"], pinned["gold"], pinned["teacher"], labels=LABELS, repin=True)
    with pytest.raises(GoldChangedError, match="was scored on gold"):
        gate_paths(pinned["run"])


def test_gate_cli_exit_codes(pinned: dict[str, Path]) -> None:
    runner = CliRunner()
    run = str(pinned["run"])
    missing = runner.invoke(app, ["gate", run])
    assert missing.exit_code == 2 and "nothing to gate against" in missing.output
    args = ["baseline", run, "--gold", str(pinned["gold"]), "--predictions", str(pinned["teacher"])]
    pinned_out = runner.invoke(app, [*args, "--labels", ",".join(LABELS)])
    assert pinned_out.exit_code == 0, pinned_out.output
    assert "75.90%" in pinned_out.output
    passed = runner.invoke(app, ["gate", run])
    assert passed.exit_code == 0, passed.output
    assert "PASS" in passed.output
    assert json.loads((pinned["run"] / "gate.json").read_text())["passed"] is True
    # Make the candidate forget rare_fraud: the gate must exit 1 and say why.
    rows = [json.loads(r) for r in (pinned["run"] / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        if r["gold"] == "rare_fraud":
            r["label"] = "balance"
    write_rows(pinned["run"] / "predictions.jsonl", rows)
    failed = runner.invoke(app, ["gate", run])
    assert failed.exit_code == 1, failed.output
    assert "FAIL" in failed.output and "categories" in failed.output and "rare_fraud" in failed.output
