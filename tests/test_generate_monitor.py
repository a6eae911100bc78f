"""Drift monitoring on a generation run: input drift as always, plus answer length and format
validity against the run's eval answers (`predictions.jsonl`). No model: a run directory
written by hand, log rows as the server writes them, the hashing embedder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.generate.generator import Generation
from taskling.monitor.config import MonitorConfig
from taskling.monitor.drift import monitor, write_report
from taskling.monitor.generation import output_reference
from taskling.rundir import RunDir
from taskling.serve.generation import log_row
from taskling.serve.predlog import PredictionLog

WORDS = ["flight", "balance", "timer", "bill", "weather", "transfer", "alarm", "rate"]
CONFIG = MonitorConfig(embedder="hashing", min_rows=20)


def message(i: int) -> str:
    return f"open a ticket about my {WORDS[i % len(WORDS)]} number {i}"


def jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A generation run as `taskling train` + `taskling eval` leave it (no weights: the monitor needs none)."""
    root = tmp_path / "run"
    names = RunDir(root)
    names.adapter.mkdir(parents=True)
    manifest = {"kind": "generation", "task": {"kind": "generate", "output": {"format": "regex"}}}
    names.manifest.write_text(json.dumps(manifest))
    jsonl(names.train_data, [{"instruction": message(i), "response": f"AB-{100 + i}"} for i in range(80)])
    jsonl(names.validation_data, [{"instruction": message(i), "response": f"AB-{300 + i}"} for i in range(80, 100)])
    # The eval answers: 4 tokens each, 95% valid.
    jsonl(names.predictions, [{"text": message(i), "n_tokens": 4, "valid": i % 20 != 0} for i in range(40)])
    return root


def serve_rows(url: str, n: int, *, tokens: int = 4, valid_every: int = 1000, start: float | None = None) -> None:
    """n logged answers, as `serve/generation.log_row` writes them, one second apart."""
    start = time.time() - n if start is None else start
    rows = []
    for i in range(n):
        valid = i % valid_every != valid_every - 1
        g = Generation(message(i), "AB-123" if valid else "AB-1", valid, tokens, 3.0)
        row = log_row(f"r{i}", "default", "v1", g, 5.0)
        row.time = start + i
        rows.append(row)
    plog = PredictionLog(url)
    plog.write(rows)
    plog.close()


def signal(report: object, name: str) -> object:
    return next(s for s in report.signals if s.name == name)  # type: ignore[attr-defined]


def test_reference_is_the_eval_answers(run: Path) -> None:
    ref = output_reference(run)
    assert ref.mean_tokens == 4.0 and ref.validity_rate == pytest.approx(0.95) and ref.n == 40


def test_steady_traffic_does_not_alarm_and_has_no_label_checks(run: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    serve_rows(url, 60)
    report = monitor(run, url=url, config=CONFIG)
    names = [s.name for s in report.signals]
    assert names == ["input_drift", "ood_share", "text_length", "output_length", "validity_drop"]
    assert not report.alarm, [s.detail for s in report.signals]
    assert signal(report, "output_length").value == pytest.approx(0.0)  # type: ignore[attr-defined]
    assert signal(report, "validity_drop").value == pytest.approx(-0.05)  # type: ignore[attr-defined]
    _, html = write_report(report, tmp_path / "out")
    assert "format validity rate" in html.read_text() and "mean answer tokens" in html.read_text()


def test_longer_answers_alarm_output_length(run: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    serve_rows(url, 60, tokens=7)  # +75% > the 50% default
    report = monitor(run, url=url, config=CONFIG)
    assert [s.name for s in report.moved] == ["output_length"]
    assert signal(report, "output_length").value == pytest.approx(0.75)  # type: ignore[attr-defined]


def test_a_validity_drop_alarms(run: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    serve_rows(url, 60, valid_every=4)  # 75% valid against 95%
    report = monitor(run, url=url, config=CONFIG)
    assert [s.name for s in report.moved] == ["validity_drop"]
    assert signal(report, "validity_drop").value == pytest.approx(0.20)  # type: ignore[attr-defined]


def test_too_few_rows_report_but_never_alarm(run: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    serve_rows(url, 10, tokens=20, valid_every=2)
    report = monitor(run, url=url, config=CONFIG)
    assert not report.alarm and "not judged" in signal(report, "validity_drop").detail  # type: ignore[attr-defined]


def test_without_eval_answers_the_rows_before_the_window_are_the_reference(run: Path, tmp_path: Path) -> None:
    RunDir(run).predictions.unlink()
    url = f"sqlite:///{tmp_path / 'log.db'}"
    now = time.time()
    serve_rows(url, 40, tokens=4, start=now - 1.5 * 86400)  # before a 1-day window (the monitor reads 2 days)
    serve_rows(url, 40, tokens=9, start=now - 3600)
    report = monitor(run, url=url, config=CONFIG, since="1d", now=now)
    length = signal(report, "output_length")
    assert length.alarm and "40 log rows before the window" in length.detail  # type: ignore[attr-defined]
    fresh = tmp_path / "fresh.db"
    serve_rows(f"sqlite:///{fresh}", 30)
    alone = monitor(run, url=f"sqlite:///{fresh}", config=CONFIG)
    assert "no reference" in signal(alone, "output_length").detail and not alone.alarm  # type: ignore[attr-defined]


def test_cli_monitor_on_a_generation_run_exits_1_on_alarm(run: Path, tmp_path: Path) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text("monitor: {embedder: hashing, min_rows: 20}\n")
    url = f"sqlite:///{tmp_path / 'log.db'}"
    serve_rows(url, 60, valid_every=4)
    out = CliRunner().invoke(app, ["monitor", str(run), "--db", url, "--config", str(config)])
    assert out.exit_code == 1, out.output
    assert "validity_drop" in out.output and (RunDir(run).monitor / "drift.json").is_file()
    drift = json.loads((RunDir(run).monitor / "drift.json").read_text())
    assert drift["alarm"] is True and drift["categories"] == []
