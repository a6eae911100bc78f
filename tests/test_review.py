"""`taskling review`: the worst scored gold rows to mark; the marks become gold rows, training rows, DPO pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.errors import DataError, RunError
from taskling.generate.review import apply_review, review_candidates, write_review
from taskling.generate.spec import GenerationTask
from taskling.io import write_json, write_jsonl
from taskling.rundir import GENERATION, RunDir

PATTERN = r"[A-Z]{2}-\d{3}"


def prediction(text: str, gold: str, output: str, rouge: float, valid: bool = True) -> dict[str, Any]:
    return {
        "text": text, "gold": gold, "label": output, "output": output, "valid": valid,
        "problem": "" if valid else "does not fullmatch", "slice": text[0],
        "scores": {"exact": float(gold == output), "rouge_l": rouge, "valid": float(valid)},
    }  # fmt: skip


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A scored generation run, no model: manifest, metrics.json, predictions.jsonl, a pinned teacher."""
    r = RunDir(tmp_path / "run")
    task = GenerationTask(name="codes", output={"format": "regex", "pattern": PATTERN})  # type: ignore[arg-type]
    write_json(r.manifest, {"kind": GENERATION, "task": task.model_dump(mode="json")})
    r.adapter.mkdir()
    r.adapter_weights.write_bytes(b"")  # read_manifest wants a finished run; no weights are loaded
    write_json(r.metrics, {"kind": "generation", "metric": "rouge_l", "gold_file": str(tmp_path / "gold.jsonl")})
    write_jsonl(r.predictions, [
        prediction("alpha", "AB-123", "AB-123", 1.0),           # right, teacher agrees: never listed
        prediction("bravo", "BR-111", "BR-112", 0.0),           # wrong
        prediction("charlie", "CH-500", "oops", 0.0, False),    # invalid: first
        prediction("delta", "DE-777", "DE-777", 1.0),           # right but the teacher said otherwise
        prediction("echo", "EC-100 x", "EC-100", 0.8),          # partly right
    ])  # fmt: skip
    teacher = {"alpha": "AB-123", "bravo": "BR-111", "charlie": "CH-500", "delta": "DE-778", "echo": "EC-100"}
    write_json(r.baseline, {"kind": GENERATION, "rows": [
        {"text": t, "output": o, "scores": {"rouge_l": 1.0}} for t, o in teacher.items()
    ]})  # fmt: skip
    return r.root


def test_worst_rows_come_first_and_right_ones_are_left_out(run: Path) -> None:
    rows = review_candidates(run)
    assert [r["text"] for r in rows] == ["charlie", "bravo", "echo", "delta"]
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["reasons"][0].startswith("invalid") and rows[0]["teacher"] == "CH-500"
    assert rows[3]["reasons"] == ["disagrees with the teacher (rouge_l 1.000)"]
    assert rows[2]["reasons"] == ["rouge_l 0.800"]
    assert all(r["mark"] is None and r["fixed"] is None for r in rows)


def test_write_review_keeps_n(run: Path) -> None:
    written = write_review(run, 2)
    assert written.path == RunDir(run).review and written.rows == 2 and written.candidates == 4
    lines = [json.loads(line) for line in written.path.read_text().splitlines()]
    assert [r["text"] for r in lines] == ["charlie", "bravo"] and written.metric == "rouge_l"


def mark(path: Path, marks: dict[str, tuple[str, str | None]]) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if row["text"] in marks:
            row["mark"], row["fixed"] = marks[row["text"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_apply_turns_marks_into_gold_training_rows_and_pairs(run: Path) -> None:
    review = write_review(run, 10).path
    mark(review, {"charlie": ("fixed", "CH-501"), "bravo": ("wrong", None), "delta": ("acceptable", None)})
    done = apply_review(run, review)
    assert done.marks == {"acceptable": 1, "wrong": 1, "fixed": 1} and done.unmarked == 1
    gold = [json.loads(line) for line in done.gold_path.read_text().splitlines()]
    assert gold == [
        {"instruction": "charlie", "response": "CH-501", "slice": "c"},  # the reviewer's text
        {"instruction": "bravo", "response": "BR-111", "slice": "b"},  # the reference stands
        {"instruction": "delta", "response": "DE-777", "slice": "d"},  # the model's output accepted
    ]
    assert [json.loads(line)["mark"] for line in done.train_path.read_text().splitlines()] == [
        "fixed",
        "wrong",
        "acceptable",
    ]
    pairs = [json.loads(line) for line in done.pairs_path.read_text().splitlines()]
    assert pairs == [
        {"text": "charlie", "chosen": "CH-501", "rejected": "oops", "source": "review_fixed"},
        {"text": "bravo", "chosen": "BR-111", "rejected": "BR-112", "source": "review_wrong"},
    ]
    assert done.gold_file is not None and done.gold_file.endswith("gold.jsonl")


@pytest.mark.parametrize(
    ("marks", "match"),
    [
        ({"bravo": ("great", None)}, "unknown mark 'great'"),
        ({"bravo": ("fixed", None)}, "without the fixed text"),
        ({"bravo": ("fixed", "not a code")}, "fails the output format"),
    ],
)
def test_bad_marks_name_the_line(run: Path, marks: dict[str, tuple[str, str | None]], match: str) -> None:
    review = write_review(run, 10).path
    mark(review, marks)
    with pytest.raises(DataError, match=match) as err:
        apply_review(run, review)
    assert f"{review}:2" in str(err.value) and err.value.fix  # bravo is the second row


def test_an_unscored_run_says_to_eval_first(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="has not been scored") as err:
        write_review(tmp_path)
    assert "taskling eval" in (err.value.fix or "")


def test_cli_writes_then_applies(run: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(app, ["review", str(run), "--worst", "3"])
    assert done.exit_code == 0, done.output
    assert "3 of 4 rows to review" in done.output
    review = RunDir(run).review
    mark(review, {"bravo": ("fixed", "BR-111")})
    done = runner.invoke(app, ["review", str(run), "--apply", str(review)])
    assert done.exit_code == 0, done.output
    assert "1 marked rows" in done.output and "(1 pairs)" in done.output
    bad = runner.invoke(app, ["review", str(run), "--apply", str(run / "nope.jsonl")])
    assert bad.exit_code == 2 and "review file not found" in bad.output
