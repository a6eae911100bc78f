"""`taskling classify` and `taskling logs` with hostile input: one output row per input row, text shown as text.

Each test here failed before its fix: blank lines were dropped (rows shifted), rich markup in
a message or a logged row crashed the command, and an extraction run gave a pydantic traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskling.serve.predlog import LogRow, PredictionLog

runner = CliRunner()


def extraction_run(trained_run: Path, dest: Path) -> Path:
    """A copy of the trained run whose manifest is an extraction run's (fields, no labels)."""
    shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns("checkpoint", "*.db*"))
    manifest = json.loads((dest / "run.json").read_text())
    manifest["kind"] = "extraction"
    manifest["task"] = {"kind": "extraction", "name": "invoice", "fields": [{"name": "amount", "type": "number"}]}
    manifest.pop("label_answers", None)
    (dest / "run.json").write_text(json.dumps(manifest))
    return dest


def invoke(*args: str) -> object:
    from taskling.cli import app

    return runner.invoke(app, list(args))


def test_blank_lines_keep_their_place_and_exit_1(trained_run: Path, tmp_path: Path) -> None:
    messages = tmp_path / "messages.txt"
    messages.write_text("what is my balance\n\n   \nset a timer\n")
    result = invoke("classify", str(trained_run), "--file", str(messages))
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].endswith("what is my balance") and lines[3].endswith("set a timer")
    assert lines[1] == "line 2: empty message" and lines[2] == "line 3: empty message"

    result = invoke("classify", str(trained_run), "--file", str(messages), "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("error") for r in rows] == [None, "empty message", "empty message", None]
    assert rows[1] == {"line": 2, "error": "empty message"} and rows[3]["text"] == "set a timer"


def test_a_line_that_is_not_utf8_is_flagged_in_place(trained_run: Path, tmp_path: Path) -> None:
    messages = tmp_path / "messages.txt"
    messages.write_bytes(b"hello\r\n\xff\xfe broken\nbye")
    result = invoke("classify", str(trained_run), "--file", str(messages), "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("text") for r in rows] == ["hello", None, "bye"]
    assert rows[1]["line"] == 2 and "not UTF-8" in rows[1]["error"]


def test_a_missing_file_is_a_user_error(trained_run: Path, tmp_path: Path) -> None:
    result = invoke("classify", str(trained_run), "--file", str(tmp_path / "nope.txt"))
    assert result.exit_code == 2 and "cannot read the file" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("text", ["[/bold] closing a tag never opened", "[red]red?[/red] :smile: [link=x]y[/link]"])
def test_markup_in_a_message_prints_as_itself(trained_run: Path, text: str) -> None:
    result = invoke("classify", str(trained_run), text)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n").endswith(text)


def test_classify_on_an_extraction_run_is_a_clear_error(trained_run: Path, tmp_path: Path) -> None:
    run = extraction_run(trained_run, tmp_path / "extract-run")
    result = invoke("classify", str(run), "hello")
    assert result.exit_code == 2, result.output
    assert "is an extraction run, not a classification run" in result.output and "fix:" in result.output
    assert "Traceback" not in result.output and "ValidationError" not in result.output


def test_logs_prints_logged_markup_as_text(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    plog = PredictionLog(url)
    plog.write([LogRow("r1", "[bold]ad", "v@1", "[/] bye [bold]", "[/red]", 0.5, {"[/red]": 0.5}, 1.0)])
    plog.close()
    result = invoke("logs", "unused", "--url", url)
    assert result.exit_code == 0, result.output
    assert "[/] bye [bold]" in result.stdout and "[/red]" in result.stdout and "[bold]ad" in result.stdout
