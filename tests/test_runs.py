"""The run registry and run comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.evaluate.gate import gate_paths
from taskling.evaluate.runs import compare, list_runs

LABELS = ["a", "b", "c"]


def make_run(path: Path, predicted: list[str]) -> Path:
    gold = ["a"] * 10 + ["b"] * 10 + ["c"] * 4
    path.mkdir(parents=True)
    rows = [{"text": f"t{i}", "gold": g, "label": p} for i, (g, p) in enumerate(zip(gold, predicted, strict=True))]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "labels.json").write_text(json.dumps(LABELS))
    correct = sum(r["gold"] == r["label"] for r in rows)
    (path / "metrics.json").write_text(json.dumps({"accuracy": correct / 24, "gold_hash": "f" * 64, "n": 24}))
    return path


def test_runs_lists_metrics_and_gate_verdicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskling.cli import console

    monkeypatch.setattr(console, "width", 160)  # the CLI runner's 80 columns would truncate cells
    old = make_run(tmp_path / "v1", ["a"] * 10 + ["b"] * 10 + ["c"] * 4)
    new = make_run(tmp_path / "v2", ["a"] * 10 + ["b"] * 10 + ["a"] * 4)  # forgot c
    gate_paths(new, old)
    by_name = {r.name: r for r in list_runs(tmp_path)}
    assert by_name["v1"].accuracy == 1.0 and by_name["v1"].gate == "-"
    # 4 of 24 rows lost: 17 points beyond the accuracy margin, and all of c.
    assert by_name["v2"].gate == "fail: accuracy, categories"
    out = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert out.exit_code == 0 and "fail: accuracy, categories" in out.output and "ffffffffffff" in out.output


def test_compare_shows_what_changed_per_category(tmp_path: Path) -> None:
    old = make_run(tmp_path / "v1", ["a"] * 10 + ["b"] * 5 + ["a"] * 5 + ["c"] * 4)
    new = make_run(tmp_path / "v2", ["a"] * 10 + ["b"] * 10 + ["a"] * 4)
    result = compare(old, new)
    assert result.paired
    assert dict((k, (x, y)) for k, x, y in result.per_category) == {"a": (1.0, 1.0), "b": (0.5, 1.0), "c": (1.0, 0.0)}
    assert result.verdict is not None and not result.verdict.passed
    out = CliRunner().invoke(app, ["compare", str(old), str(new)])
    assert out.exit_code == 0, out.output
    assert "-100%" in out.output and "+50%" in out.output
