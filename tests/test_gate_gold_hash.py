"""Issue 13 item 3: nothing compares scores made on different gold sets. A ladder, baseline,
gate verdict or run scored on another gold set is refused, naming both files and both hashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.data.load import Example, content_hash
from taskling.evaluate.baseline import GoldMismatchError
from taskling.evaluate.gate import gate, load_predictions, pin_baseline
from taskling.evaluate.report import build_report
from taskling.evaluate.runs import compare, list_runs

FOUR = ["balance", "transfer", "card_lost", "pin_change"]
TEN = [f"intent_{k}" for k in range(10)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scored_run(path: Path, labels: list[str], n: int, *, offset: int = 0) -> Path:
    """A run as `taskling eval` leaves it: predictions.jsonl (every 4th row wrong), labels.json, metrics.json."""
    gold = [labels[i % len(labels)] for i in range(n)]
    texts = [f"message {i + offset}" for i in range(n)]
    predicted = [g if i % 4 else labels[(labels.index(g) + 1) % len(labels)] for i, g in enumerate(gold)]
    write_jsonl(
        path / "predictions.jsonl",
        [{"text": t, "gold": g, "label": p} for t, g, p in zip(texts, gold, predicted, strict=True)],
    )
    (path / "labels.json").write_text(json.dumps(labels))
    gold_hash = content_hash(Example(t, g) for t, g in zip(texts, gold, strict=True))
    (path / "metrics.json").write_text(json.dumps({"gold_hash": gold_hash, "accuracy": 0.75, "n": n}))
    return path


def ladder_file(path: Path, labels: list[str], n: int) -> Path:
    """A ladder.json as `taskling ladder` writes it, scored on its own gold set."""
    gold = [labels[i % len(labels)] for i in range(n)]
    gold_hash = content_hash(Example(f"query {i}", g) for i, g in enumerate(gold))
    rung = {
        "name": "tfidf",
        "accuracy": 0.9,
        "macro_f1": 0.9,
        "worst_category": labels[0],
        "worst_category_accuracy": 0.8,
        "latency_ms": 1.0,
        "messages_per_second": 1000.0,
        "memory_mb": 1.0,
        "clears": True,
        "why": "",
    }
    ladder = {"gold_file": "other/gold.jsonl", "gold_hash": gold_hash, "gold_rows": n, "bar": "-", "smallest": None}
    path.write_text(json.dumps({**ladder, "rungs": [rung]}))
    return path


def test_report_refuses_a_ladder_scored_on_another_gold_set(tmp_path: Path) -> None:
    run = scored_run(tmp_path / "run", FOUR, 40)
    ladder = ladder_file(tmp_path / "ladder.json", TEN, 200)
    with pytest.raises(GoldMismatchError) as err:
        build_report(run, ladder=ladder)
    message = str(err.value)
    run_hash = load_predictions(run).gold_hash
    ladder_hash = json.loads(ladder.read_text())["gold_hash"]
    assert str(run / "predictions.jsonl") in message and str(ladder) in message
    assert run_hash[:16] in message and ladder_hash[:16] in message
    result = CliRunner().invoke(app, ["report", str(run), "--ladder", str(ladder)])
    assert result.exit_code == 2 and not (run / "report.html").exists()
    assert "cannot show this ladder beside this run" in " ".join(result.output.split())
    # A ladder that records no gold hash cannot be checked, so it is refused too.
    unhashed = json.loads(ladder.read_text())
    del unhashed["gold_hash"]
    (tmp_path / "old.json").write_text(json.dumps(unhashed))
    with pytest.raises(GoldMismatchError, match="not recorded"):
        build_report(run, ladder=tmp_path / "old.json")


def test_report_takes_a_ladder_on_the_same_gold_set(tmp_path: Path) -> None:
    run = scored_run(tmp_path / "run", FOUR, 40)
    ladder = ladder_file(tmp_path / "ladder.json", FOUR, 40)
    same = json.loads(ladder.read_text())
    same["gold_hash"] = load_predictions(run).gold_hash
    ladder.write_text(json.dumps(same))
    assert "<h2>Ladder</h2>" in build_report(run, ladder=ladder)


def test_report_refuses_a_baseline_or_verdict_on_another_gold_set(tmp_path: Path) -> None:
    run = scored_run(tmp_path / "run", FOUR, 40)
    other = tmp_path / "other-gold.jsonl"
    write_jsonl(other, [{"text": f"other {i}", "label": FOUR[i % 4]} for i in range(40)])
    pin_baseline(run, other, other, labels=FOUR, name="teacher")
    with pytest.raises(GoldMismatchError, match="cannot show the baseline beside this run"):
        build_report(run)
    (run / "baseline.json").unlink()
    (run / "gate.json").write_text(json.dumps({"gold_hash": "0" * 64, "passed": True, "reference": "x", "checks": []}))
    with pytest.raises(GoldMismatchError, match="cannot show this gate verdict"):
        build_report(run)


def test_gate_names_both_files_and_hashes(tmp_path: Path) -> None:
    a = load_predictions(scored_run(tmp_path / "a", FOUR, 40))
    b = load_predictions(scored_run(tmp_path / "b", FOUR, 40, offset=1))
    with pytest.raises(GoldMismatchError) as err:
        gate(b, a)
    message = str(err.value)
    assert a.source in message and b.source in message
    assert a.gold_hash[:16] in message and b.gold_hash[:16] in message


def test_compare_refuses_runs_on_different_gold_sets(tmp_path: Path) -> None:
    a = scored_run(tmp_path / "a", FOUR, 40)
    b = scored_run(tmp_path / "b", FOUR, 40, offset=1)
    with pytest.raises(GoldMismatchError, match="cannot compare these runs"):
        compare(a, b)
    result = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 2
    said = "".join(result.output.split())  # rich wraps long paths
    assert str(a / "predictions.jsonl").replace(" ", "") in said and str(b / "predictions.jsonl") in said


def test_runs_marks_a_baseline_pinned_on_another_gold_set(tmp_path: Path) -> None:
    run = scored_run(tmp_path / "run", FOUR, 40)
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": f"other {i}", "label": FOUR[i % 4]} for i in range(40)])
    pin_baseline(run, other, other, labels=FOUR, name="teacher")
    (summary,) = list_runs(tmp_path)
    assert summary.baseline_on_other_gold
