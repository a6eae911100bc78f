"""Progress for long commands: a `(done, total)` callback from the library, shown by the CLI.

Off a terminal (CI logs, a pipe) the CLI writes plain lines with counts to stderr, every 10%
or 10 s and at the end; stdout keeps only the answers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from taskling.cli.common import PlainProgress

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()
LINE = re.compile(r"^(\w[\w-]*): (\d+)/(\d+) ([\w ]+?) \((\d+)%\)")


def progress_lines(stderr: str, label: str) -> list[tuple[int, int]]:
    found = [LINE.match(line) for line in stderr.splitlines()]
    return [(int(m[2]), int(m[3])) for m in found if m and m[1] == label]


def test_plain_progress_writes_every_tenth_every_ten_seconds_and_at_the_end() -> None:
    now = [0.0]
    lines: list[str] = []
    plain = PlainProgress("eval", "rows", write=lines.append, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] += 0.05
        plain(done, 100)
    assert [line.split(" (")[0] for line in lines] == [f"eval: {n}/100 rows" for n in range(10, 101, 10)]
    assert lines[-1] == "eval: 100/100 rows (100%), 5.0 s"
    assert lines[0] == "eval: 10/100 rows (10%), 0.5 s, about 4 s left"

    # A slow job with many rows: a line at least every 10 s, even inside one 10% step.
    now[0], lines[:] = 0.0, []
    slow = PlainProgress("label", "texts", write=lines.append, clock=lambda: now[0])
    for done in range(1, 31):
        now[0] += 4.0
        slow(done, 1000)
    assert [line.split(" (")[0] for line in lines] == [
        f"label: {n}/1000 texts" for n in (3, 6, 9, 12, 15, 18, 21, 24, 27, 30)
    ]


def test_eval_prints_periodic_lines_with_counts_off_a_terminal(trained_run: Path, tmp_path: Path) -> None:
    from taskling.cli import app

    gold = FIXTURES / "clinc8_gold.jsonl"
    result = runner.invoke(
        app, ["eval", str(trained_run), "--data", str(gold), "--batch-size", "8", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    counts = progress_lines(result.stderr, "eval")
    assert counts == [(n, 80) for n in range(8, 81, 8)]
    assert "eval" not in {m[1] for m in map(LINE.match, result.stdout.splitlines()) if m}


def test_classify_file_prints_progress_to_stderr_and_answers_to_stdout(trained_run: Path, tmp_path: Path) -> None:
    from taskling.cli import app

    texts = [json.loads(line)["text"] for line in (FIXTURES / "clinc8_gold.jsonl").read_text().splitlines()][:40]
    messages = tmp_path / "messages.txt"
    messages.write_text("\n".join(texts) + "\n")
    result = runner.invoke(app, ["classify", str(trained_run), "--file", str(messages), "--json"])
    assert result.exit_code == 0, result.output
    assert progress_lines(result.stderr, "classify") == [(32, 40), (40, 40)]
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["text"] for a in answers] == texts


def test_classifier_progress_counts_rise_to_the_total(trained_run: Path) -> None:
    from taskling.serve.classifier import Classifier

    calls: list[tuple[int, int]] = []
    texts = ["set a timer", "what is my balance", "play some jazz"] * 7
    Classifier.from_run(trained_run).predict(texts, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(n, 21) for n in (4, 8, 12, 16, 20, 21)]


def test_train_prints_step_lines_with_the_loss_off_a_terminal(tiny_config: dict, tmp_path: Path) -> None:
    import yaml

    from taskling.cli import app

    tiny_config["train"].update({"max_steps": 4, "eval_every": 4})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("train: ")]
    assert [(d, t) for d, t in progress_lines(result.stderr, "train")] == [(n, 4) for n in (1, 2, 3, 4)]
    history = [json.loads(line) for line in (Path(tiny_config["run_dir"]) / "history.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in history if "train_loss" in r]
    assert [line.split("loss ")[1].split(",")[0] for line in lines] == [f"{loss:.4f}" for loss in losses]


def test_ladder_reports_rungs_done(tiny_config: dict, tmp_path: Path) -> None:
    from taskling.config import build_config
    from taskling.evaluate.ladder import run_ladder

    calls: list[tuple[int, int]] = []
    gold = FIXTURES / "clinc8_gold.jsonl"
    run_ladder(
        build_config(tiny_config),
        gold,
        tmp_path / "ladder",
        rungs=["tfidf", "zero-shot"],
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(0, 2), (1, 2), (2, 2)]


def test_dpo_reports_every_step(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    from taskling.train.dpo import build_pairs, dpo

    sft = tmp_path / "sft"
    shutil.copytree(trained_run, sft)
    pairs, _ = build_pairs(sft, tmp_path / "pairs.jsonl", margin_below=1.01, limit=8)
    calls: list[tuple[int, int]] = []
    result = dpo(sft, pairs, tmp_path / "dpo", batch_size=4, epochs=1, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(n, result.steps) for n in range(1, result.steps + 1)] and result.steps == 2


def test_distill_prints_its_cleaning_stages_off_a_terminal(labels: list[str], tmp_path: Path) -> None:
    import yaml

    from taskling.cli import app

    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"name": "clinc8", "labels": labels}))
    logs = FIXTURES / "clinc8_train.jsonl"
    result = runner.invoke(app, ["distill", str(logs), "--task", str(task), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert progress_lines(result.stderr, "distill") == [(1, 3), (2, 3), (3, 3)]


def test_predict_batch_prints_row_counts_off_a_terminal(trained_run: Path, tmp_path: Path) -> None:
    import pytest

    pytest.importorskip("pandas")
    from taskling.cli import app

    rows = (FIXTURES / "clinc8_gold.jsonl").read_text().splitlines()[:40]
    table = tmp_path / "in.jsonl"
    table.write_text("\n".join(rows) + "\n")
    args = ["predict-batch", str(trained_run), str(table), "--out", str(tmp_path / "out.jsonl"), "--batch-size", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert progress_lines(result.stderr, "predict-batch") == [(16, 40), (32, 40), (40, 40)]


def test_export_reports_its_steps_off_a_terminal(trained_run: Path, tmp_path: Path) -> None:
    from taskling.cli import app

    result = runner.invoke(app, ["export", str(trained_run), "--to", "vllm", "--out", str(tmp_path / "vllm")])
    assert result.exit_code == 0, result.output
    assert progress_lines(result.stderr, "export-vllm")[-1] == (3, 3)
    assert (1, 3) in progress_lines(result.stderr, "export-vllm")
