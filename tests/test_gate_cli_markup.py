"""Issue 13 item 10: labels and names that look like rich markup are printed as written by
the bar commands (gate, compare, runs), never interpreted ("[b]x[/b]") or crashing ("[/]")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskling.cli import app

LABELS = ["[b]card[/b]", "plain", "[/]odd"]


def make_run(path: Path, predicted: list[str]) -> Path:
    gold = [LABELS[0]] * 8 + [LABELS[1]] * 8 + [LABELS[2]] * 8
    path.mkdir(parents=True)
    rows = [{"text": f"t{i}", "gold": g, "label": p} for i, (g, p) in enumerate(zip(gold, predicted, strict=True))]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "labels.json").write_text(json.dumps(LABELS))
    (path / "metrics.json").write_text(
        json.dumps({"accuracy": 0.5, "worst_category": LABELS[0], "worst_category_accuracy": 0.0, "n": 24})
    )
    return path


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    from taskling.cli import console

    monkeypatch.setattr(console, "width", 250)
    old = make_run(tmp_path / "[bold]v1", [LABELS[0]] * 8 + [LABELS[1]] * 8 + [LABELS[2]] * 8)
    new = make_run(tmp_path / "[bold]v2", [LABELS[1]] * 8 + [LABELS[1]] * 8 + [LABELS[2]] * 8)  # forgot card
    return old, new


def test_gate_prints_markup_like_labels_and_names_as_written(runs: tuple[Path, Path]) -> None:
    old, new = runs
    result = CliRunner().invoke(app, ["gate", str(new), "--against", str(old)])
    assert result.exit_code == 1, result.output
    assert "[bold]v2 vs [bold]v1" in result.output
    assert "[b]card[/b] 100% -> 0%" in result.output  # the failed check names the category as written


def test_compare_and_runs_print_markup_like_labels_as_written(runs: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = runs
    compared = CliRunner().invoke(app, ["compare", str(old), str(new)])
    assert compared.exit_code == 0, compared.output
    assert "[b]card[/b]" in compared.output and "[/]odd" in compared.output
    listed = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    assert "[bold]v1" in listed.output and "[b]card[/b] (" in listed.output
