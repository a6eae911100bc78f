"""The CLI is a thin layer: it trains, evaluates and classifies, and prints errors without tracebacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from taskling.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def test_train_eval_classify_round_trip(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    config = tmp_path / "task.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = runner.invoke(app, ["train", str(config), "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    assert "optimizer steps" in result.output
    run_dir = Path(tiny_config["run_dir"])
    assert json.loads((run_dir / "train_summary.json").read_text())["steps"] == 3

    result = runner.invoke(app, ["eval", str(run_dir), "--data", str(FIXTURES / "clinc8_gold.jsonl")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == 80 and metrics["out_of_label_set_rate"] == 0.0
    assert f"{metrics['accuracy']:.2%}" in result.output
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 80

    messages = tmp_path / "messages.txt"
    messages.write_text("what is my balance\n\nset a timer for ten minutes\n")
    result = runner.invoke(app, ["classify", str(run_dir), "how is the weather", "--file", str(messages), "--json"])
    assert result.exit_code == 1, result.output  # the blank line is flagged, in its place, never dropped
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    labels = set(tiny_config["task"]["labels"])
    assert [r.get("text") for r in rows] == [
        "how is the weather",
        "what is my balance",
        None,
        "set a timer for ten minutes",
    ]
    assert rows[2] == {"line": 2, "error": "empty message"}
    assert all(r["label"] in labels and r["label"] in r["top"] for r in rows if "text" in r)


def test_user_errors_print_a_fix_not_a_traceback(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    tiny_config["train"]["epoch"] = 3  # typo: unknown key
    config = tmp_path / "task.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "train.epoch: unknown key" in result.output and "Traceback" not in result.output

    result = runner.invoke(app, ["classify", str(tmp_path / "no-such-run"), "hello"])
    assert result.exit_code == 2
    assert "not a finished run" in result.output and "fix:" in result.output
