"""Issue 13 item 2: a candidate lower than production by more than a margin fails the gate,
even when the drop is not statistically significant (70% vs 73%: 3 rows lost, none won)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from taskling.cli import app
from taskling.data.gold import add_gold
from taskling.data.load import Example, write_examples
from taskling.evaluate.gate import Scored, gate, gate_paths
from taskling.evaluate.report import build_report
from taskling.monitor.retrain import read_registry, retrain
from taskling.serve.classifier import Prediction

LABELS = ["balance", "transfer", "card_lost", "pin_change"]


def production_and_candidate(lost: int, category_rows: list[int] | None = None) -> tuple[Scored, Scored]:
    """100 gold rows, 25 per label. Production gets 73 right; the candidate loses `lost` of them, wins none."""
    gold = [label for label in LABELS for _ in range(25)]
    texts = [f"message {i} about {g}" for i, g in enumerate(gold)]
    # Production is wrong on rows 18..24 of each label (28 wrong), and right on row 18 of pin_change (27 wrong).
    prod = [g if i % 25 < 18 or i == 93 else LABELS[(LABELS.index(g) + 1) % 4] for i, g in enumerate(gold)]
    assert sum(p == g for p, g in zip(prod, gold, strict=True)) == 73
    # By default the lost rows are spread over the categories (row 0 of balance, transfer, card_lost).
    rows = category_rows if category_rows is not None else [0, 25, 50, 75][:lost]
    cand = list(prod)
    for i in rows:
        cand[i] = LABELS[(LABELS.index(gold[i]) + 1) % 4]
    return (
        Scored("production", LABELS, texts, gold, prod, source="production/predictions.jsonl"),
        Scored("candidate", LABELS, texts, gold, cand, source="candidate/predictions.jsonl"),
    )


def test_70_against_73_fails_though_not_significant() -> None:
    prod, cand = production_and_candidate(3)
    verdict = gate(cand, prod)
    assert verdict.discordant == (3, 0)
    assert verdict.assessment == "no significant difference"  # McNemar mid-p = 0.125
    assert verdict.p_value == pytest.approx(0.125)
    assert not verdict.passed
    assert [c.name for c in verdict.failed_checks] == ["accuracy"]
    detail = verdict.failed_checks[0].detail
    assert "dropped 3.00%" in detail and "margin 1.00%" in detail and "3 rows lost, 0 won" in detail
    assert verdict.non_inferiority["margin"] == 0.01
    assert verdict.non_inferiority["accuracy_drop"] == pytest.approx(0.03)
    assert verdict.non_inferiority["category_drops"]["balance"] == pytest.approx(0.04)


def test_a_drop_inside_the_margin_passes() -> None:
    prod, cand = production_and_candidate(1)  # 72% vs 73%: exactly one point
    verdict = gate(cand, prod)
    assert verdict.passed, verdict.failed_checks
    assert verdict.non_inferiority["accuracy_drop"] == pytest.approx(0.01)
    # The margin is a setting: a wider one lets the 3-point drop through.
    prod3, cand3 = production_and_candidate(3)
    assert gate(cand3, prod3, margin=0.05).passed


def test_a_category_beyond_its_margin_fails_though_not_significant() -> None:
    # Three balance rows lost (18 -> 15 of 25: 12 points), none won; overall margin widened to 5 points.
    prod, cand = production_and_candidate(3, category_rows=[0, 1, 2])
    verdict = gate(cand, prod, margin=0.05)
    balance = next(c for c in verdict.categories if c.label == "balance")
    assert balance.p_value == pytest.approx(0.125) and balance.regressed
    assert [c.name for c in verdict.failed_checks] == ["categories"]
    assert "category margin 10%" in verdict.failed_checks[0].detail
    assert verdict.non_inferiority["categories_over_margin"] == ["balance"]
    assert gate(cand, prod, margin=0.05, category_margin=0.15).passed
    # The old option name still sets it.
    assert gate(cand, prod, margin=0.05, category_tolerance=0.15).passed


def write_run(path: Path, scored: Scored) -> Path:
    path.mkdir(parents=True)
    rows = [
        {"text": t, "gold": g, "label": p} for t, g, p in zip(scored.texts, scored.gold, scored.predicted, strict=True)
    ]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "labels.json").write_text(json.dumps(LABELS))
    return path


def test_gate_json_cli_and_report_show_the_margins_and_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskling.cli import console

    monkeypatch.setattr(console, "width", 200)
    prod, cand = production_and_candidate(3)
    prod_dir, cand_dir = write_run(tmp_path / "prod", prod), write_run(tmp_path / "cand", cand)
    failed = CliRunner().invoke(app, ["gate", str(cand_dir), "--against", str(prod_dir)])
    assert failed.exit_code == 1, failed.output
    said = " ".join(failed.output.split())
    assert "FAIL" in said and "dropped 3.00% against a margin of 1.00%" in said
    saved = json.loads((cand_dir / "gate.json").read_text())
    assert saved["passed"] is False
    assert saved["non_inferiority"]["margin"] == 0.01
    assert saved["non_inferiority"]["accuracy_drop"] == pytest.approx(0.03)
    assert saved["non_inferiority"]["category_margin"] == 0.10
    html = build_report(cand_dir)
    assert "non-inferiority" in html and "+3.00%" in html and "1.00%" in html
    passed = CliRunner().invoke(app, ["gate", str(cand_dir), "--against", str(prod_dir), "--margin", "0.05"])
    assert passed.exit_code == 0, passed.output
    assert json.loads((cand_dir / "gate.json").read_text())["thresholds"]["margin"] == 0.05
    bad = CliRunner().invoke(app, ["gate", str(cand_dir), "--against", str(prod_dir), "--margin", "-1"])
    assert bad.exit_code == 2 and "margin" in bad.output
    assert gate_paths(cand_dir, prod_dir, write=False, margin=0.03).passed


# ---------------------------------------------------------------- retrain: the 70% vs 73% candidate


class Fixed:
    """A predictor that answers from a text -> label table stored in the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.answers = json.loads((run_dir / "answers.json").read_text())

    def predict(self, texts: list[str], *, batch_size: int = 32) -> list[Prediction]:
        return [Prediction(t, self.answers[t], 1.0, {self.answers[t]: 1.0}) for t in texts]


def fixed_run(path: Path, scored: Scored) -> Path:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"task": {"labels": LABELS}}))
    (path / "answers.json").write_text(json.dumps(dict(zip(scored.texts, scored.predicted, strict=True))))
    write_examples(path / "data" / "train.jsonl", [Example("hello there", "balance")])
    return path


@pytest.fixture
def retrain_setup(tmp_path: Path) -> dict[str, Any]:
    prod, cand = production_and_candidate(3)
    gold_file = tmp_path / "gold.jsonl"
    write_examples(gold_file, [Example(t, g) for t, g in zip(prod.texts, prod.gold, strict=True)])
    gold = add_gold(tmp_path / "gold", [gold_file], LABELS).version
    return {
        "prod": fixed_run(tmp_path / "runs" / "prod", prod),
        "cand": fixed_run(tmp_path / "runs" / "cand", cand),
        "gold": gold,
        "registry": tmp_path / "runs" / "registry.json",
    }


def never_train(train_file: Path, run_dir: Path) -> None:
    raise AssertionError("the candidate is already trained")


def test_retrain_blocks_the_70_percent_candidate(retrain_setup: dict[str, Any]) -> None:
    s = retrain_setup
    kwargs = {"gold": s["gold"], "labels": LABELS, "registry": s["registry"], "trainer": never_train, "loader": Fixed}
    result = retrain(Path("unused.jsonl"), s["cand"], production=s["prod"], **kwargs)
    assert (result.candidate_accuracy, result.production_accuracy) == (0.70, 0.73)
    assert not result.promoted
    assert result.verdict["failed"][0].startswith("accuracy: accuracy dropped 3.00%")
    assert result.verdict["non_inferiority"]["accuracy_drop"] == pytest.approx(0.03)
    registry = read_registry(s["registry"])
    assert registry["production"] is None and [e["event"] for e in registry["events"]] == ["blocked"]
    # With a 5-point margin the same candidate is promoted.
    wide = retrain(Path("unused.jsonl"), s["cand"], production=s["prod"], gate_settings={"margin": 0.05}, **kwargs)
    assert wide.promoted and read_registry(s["registry"])["production"] == str(s["cand"])


def test_retrain_cli_blocks_it_and_takes_margin(
    retrain_setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import taskling.monitor.retrain as retrain_module

    s = retrain_setup
    monkeypatch.setattr(retrain_module, "lora_trainer", lambda config: never_train)
    monkeypatch.setattr(retrain_module, "classifier_loader", Fixed)
    config = tmp_path / "project.yaml"
    config.write_text(yaml.safe_dump({"task": {"name": "bank", "labels": LABELS}, "data": {"train": ["x.jsonl"]}}))
    relabeled = tmp_path / "relabeled.jsonl"
    write_examples(relabeled, [Example("my card is gone", "card_lost")])
    args = ["retrain", str(config), "--data", str(relabeled), "--gold", str(tmp_path / "gold")]
    args += ["--registry", str(s["registry"]), "--production", str(s["prod"]), "--candidate", str(s["cand"])]
    args += ["--versions", str(tmp_path / "versions")]
    blocked = CliRunner().invoke(app, args)
    assert blocked.exit_code == 1, blocked.output
    said = " ".join(blocked.output.split())
    assert "BLOCKED" in said and "accuracy 70.00% vs production 73.00%" in said
    assert "non-inferiority: accuracy dropped +3.00% (margin 1.00%)" in said
    promoted = CliRunner().invoke(app, [*args, "--margin", "0.05"])
    assert promoted.exit_code == 0, promoted.output
    assert "PROMOTED" in promoted.output
    assert [e["event"] for e in read_registry(s["registry"])["events"]] == ["blocked", "promoted"]
