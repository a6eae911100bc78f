"""Arbitrary text through `distill`, `data report` and `extract`: no traceback, the documented exit
code, and every input row accounted for (kept, queued or rejected with a reason)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from taskling.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
FAST = ["--set", "label_errors=false"]
# What breaks naive code: rich markup, chat control tokens, NUL, escapes, line separators, 50k characters.
TRICKY = ["[/bold]", "[red]x[/]", "[link=x]", "<|im_end|>", "<|im_start|>assistant\n", "<end_of_turn>"]
TRICKY += ["\x00", "\x1b[31m", "\u2028", "\x85", "\r", "x" * 50_000, " ", "\ufeff", "\ud800", "b\udcff"]
TEXT = st.one_of(st.text(max_size=80), st.sampled_from(TRICKY), st.lists(st.sampled_from(TRICKY)).map("".join))
# Labels go through a YAML task file: no lone surrogates there (YAML cannot hold them).
LABEL = st.one_of(st.text(st.characters(codec="utf-8"), min_size=1, max_size=20), st.sampled_from(TRICKY[:6]))
LABELS = st.lists(LABEL, min_size=2, max_size=4, unique_by=str.strip).filter(
    lambda labels: all(label.strip() for label in labels)
)


def task_file(folder: Path, labels: list[str]) -> Path:
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump({"labels": labels}, allow_unicode=False), encoding="utf-8")
    return path


def write_rows(path: Path, rows: list[tuple[str, str]], garbage: int) -> int:
    """JSONL of {"text", "label"} rows (ensure_ascii: a lone surrogate is a \\udXXX escape),
    then `garbage` lines that are not UTF-8; returns the number of non-blank lines."""
    lines = [json.dumps({"text": t, "label": label}).encode() for t, label in rows]
    lines += [b'{"text": "caf\xe9", "label": "x"}'] * garbage
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(lines)


def run(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_data_report_prints_markup_in_labels_and_texts_as_itself(tmp_path: Path) -> None:
    labels = ["[/bold]", "[red]alert"]
    task = task_file(tmp_path, labels)
    rows = [(f"[bold]row {i} [/] about {x}", labels[i % 2]) for i, x in enumerate("abcdef")]
    data = tmp_path / "d.jsonl"
    write_rows(data, rows, 0)
    result = run("data", "report", str(data), "--task", str(task), *FAST)
    assert result.exit_code == 0, result.output
    assert "[/bold]" in result.output and "[red]alert" in result.output
    # The report's own styling still works: rendered, not printed as markup.
    assert "[yellow]" not in result.output and "[/]" not in result.output.replace("[/bold]", "")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    labels=LABELS,
    rows=st.lists(st.tuples(TEXT, st.one_of(TEXT, st.just("")), st.integers(0, 3)), min_size=1, max_size=8),
    garbage=st.integers(0, 2),
)
def test_distill_and_data_report_account_for_every_row(
    tmp_path: Path, labels: list[str], rows: list[tuple[str, str, int]], garbage: int
) -> None:
    task = task_file(tmp_path, labels)
    # Most rows carry one of the task's labels (index 0-1), some an arbitrary string.
    pairs = [(t, labels[k] if k < 2 else other) for t, other, k in rows]
    logs = tmp_path / "logs.jsonl"
    n = write_rows(logs, pairs, garbage)

    out = tmp_path / "out"
    result = run("distill", str(logs), "--task", str(task), "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    files = {name: (out / f"{name}.jsonl").read_text(encoding="utf-8").split("\n") for name in ("train", "review")}
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text(encoding="utf-8").split("\n") if x]
    kept = sum(1 for name in files for x in files[name] if x)
    assert kept + len(rejected) == n
    assert all(r["reason"] and isinstance(r["line"], int) for r in rejected)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["rows_read"] == n == report["train"] + report["review_queue"] + report["rejected"]

    result = run("data", "report", str(logs), "--task", str(task), "--json", str(tmp_path / "r.json"), *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["rows_read"] == n == report["train"] + report["review_queue"] + report["rejected"]


# ---------------------------------------------------------------- extract


@pytest.fixture(scope="module")
def extraction_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from taskling.extract.schema import build_extraction_config
    from taskling.train.extraction import train_extraction

    run = tmp_path_factory.mktemp("extract") / "run"
    config = {
        "task": {"name": "clinc-extract", "json_schema": str(FIXTURES / "extract8_schema.json")},
        "data": {"train": [str(FIXTURES / "extract8_train.jsonl")], "validation_fraction": 0.2},
        "model": {"base": str(tiny_model_dir), "dtype": "float32", "max_length": 160},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 16, "learning_rate": 5e-3, "seed": 0, "threads": 1},
        "run_dir": str(run),
    }
    train_extraction(build_extraction_config(config))
    return run


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=1, max_size=3))
@example(texts=["send 40 dollars<|im_end|>", "caf\udce9"])  # undecodable argv bytes arrive as lone surrogates
def test_extract_answers_every_message_or_names_the_bad_one(extraction_run: Path, texts: list[str]) -> None:
    from taskling.data.load import is_unicode
    from taskling.extract.schema import ExtractionTask

    result = run("extract", str(extraction_run), "--", *texts)
    bad = [i for i, t in enumerate(texts, start=1) if not is_unicode(t)]
    if bad:
        assert result.exit_code == 2 and f"message {bad[0]} is not valid UTF-8" in result.output
        return
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.strip("\n").split("\n")]
    task = ExtractionTask.model_validate({"json_schema": str(FIXTURES / "extract8_schema.json")})
    assert len(records) == len(texts) and all(task.validate_record(r) == r for r in records)
