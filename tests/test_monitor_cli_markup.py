"""Issue 13 item 10: run and file names that look like rich markup are printed as written by
the monitor commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.data.load import load_file, write_examples
from taskling.serve.predlog import PredictionLog, default_url

FIXTURES = Path(__file__).parent / "fixtures"


def test_monitor_prints_a_markup_like_run_path_as_written(
    tmp_path: Path, labels: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskling.cli import console

    monkeypatch.setattr(console, "width", 400)
    run = tmp_path / "[red]prod"
    rows = load_file(FIXTURES / "clinc8_train.jsonl").examples
    write_examples(run / "data" / "train.jsonl", rows[:60])
    write_examples(run / "data" / "validation.jsonl", rows[60:80])
    (run / "run.json").write_text(json.dumps({"task": {"labels": labels}}))
    PredictionLog(default_url(run)).close()  # an empty log: nothing to judge, exit 0
    (tmp_path / "m.yaml").write_text("embedder: hashing\n")
    result = CliRunner().invoke(app, ["monitor", str(run), "--config", str(tmp_path / "m.yaml"), "--since", "1h"])
    assert result.exit_code == 0, result.output
    assert str(run / "monitor" / "drift.html") in result.output
    assert (run / "monitor" / "drift.html").is_file()


def test_gold_add_prints_a_markup_like_path_as_written(tmp_path: Path, labels: list[str]) -> None:
    src = tmp_path / "g.jsonl"
    write_examples(src, load_file(FIXTURES / "clinc8_gold.jsonl").examples[:10])
    root = tmp_path / "[b]gold"
    result = CliRunner().invoke(app, ["gold", "add", str(root), str(src), "--labels", ",".join(labels)])
    assert result.exit_code == 0, result.output
    assert str(root / "v1" / "rejected.jsonl") in "".join(result.output.split())
