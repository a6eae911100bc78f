"""The prediction log: group commit, WAL SQLite, read back, JSONL export, survival of SIGKILL."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from taskling.serve.predlog import (
    LogError,
    LogRow,
    PredictionLog,
    count_rows,
    default_url,
    export_jsonl,
    read_rows,
    redact,
)


def row(i: int, label: str = "balance", p: float = 0.9) -> LogRow:
    return LogRow(
        request_id=f"req-{i}",
        adapter="default",
        model_version="run@abc",
        text=f"message {i} é 漢字",
        label=label,
        probability=p,
        probabilities={label: p, "other": 1 - p},
        latency_ms=3.5,
    )


def test_rows_are_committed_before_the_future_resolves(tmp_path: Path) -> None:
    url = default_url(tmp_path)
    plog = PredictionLog(url)
    futures = [plog.submit([row(i)]) for i in range(200)]
    for fut in futures:
        assert fut.result(timeout=30) == 1
        # A fresh connection sees a row as soon as its future has resolved.
    with sqlite3.connect(tmp_path / "predictions.db") as conn:
        assert conn.execute("select count(*) from predictions").fetchone()[0] == 200
        assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert plog.commits < 200  # rows were grouped into fewer commits
    plog.close()
    assert plog.submit([row(0)]).exception() is not None


def test_read_back_filters_and_export(tmp_path: Path) -> None:
    url = default_url(tmp_path)
    plog = PredictionLog(url)
    plog.write([row(1, "balance", 0.95), row(2, "alarm", 0.4), row(3, "balance", 0.3)])
    plog.close()
    rows = list(read_rows(url))
    assert [r["request_id"] for r in rows] == ["req-1", "req-2", "req-3"]
    assert rows[0]["text"] == "message 1 é 漢字"
    assert rows[1]["probabilities"] == {"alarm": 0.4, "other": pytest.approx(0.6)}
    assert [r["request_id"] for r in read_rows(url, label="balance")] == ["req-1", "req-3"]
    assert [r["request_id"] for r in read_rows(url, max_probability=0.5)] == ["req-2", "req-3"]
    assert [r["request_id"] for r in read_rows(url, limit=1)] == ["req-1"]
    assert [r["request_id"] for r in read_rows(url, limit=2, newest=True)] == ["req-2", "req-3"]
    assert count_rows(url) == 3
    out = tmp_path / "relabel.jsonl"
    assert export_jsonl(read_rows(url, label="balance"), out) == 2
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["text"] == "message 1 é 漢字" and lines[0]["label"] == "balance"
    assert list(lines[0])[:2] == ["text", "label"]


def test_bad_url_is_a_friendly_error_without_password() -> None:
    with pytest.raises(LogError) as err:
        PredictionLog("nosuchdb+driver://user:s3cret@host/db")
    assert "s3cret" not in str(err.value)
    assert "***" in redact("postgresql://user:s3cret@host/db")


def test_acknowledged_rows_survive_sigkill(tmp_path: Path) -> None:
    # A child process writes rows and prints each request id once its commit is acknowledged,
    # then keeps writing; it is killed mid-stream. Every printed id must be in the database.
    script = textwrap.dedent(
        f"""
        import sys, itertools
        from taskling.serve.predlog import LogRow, PredictionLog
        plog = PredictionLog({default_url(tmp_path)!r})
        for i in itertools.count():
            ids = [f"r{{i}}-{{k}}" for k in range(20)]
            futs = [(r, plog.submit([LogRow(r, "a", "v", "t", "l", 1.0, {{"l": 1.0}}, 1.0)])) for r in ids]
            for rid, fut in futs:
                fut.result()
                print(rid, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) >= 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    acked += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    with sqlite3.connect(tmp_path / "predictions.db") as conn:
        logged = {r[0] for r in conn.execute("select request_id from predictions")}
    assert len(acked) >= 300
    assert set(acked) <= logged


def test_the_log_is_created_readable_by_its_owner_only(tmp_path: Path) -> None:
    import os

    previous = os.umask(0o022)  # the usual umask, under which SQLite alone would make it 0644
    try:
        plog = PredictionLog(default_url(tmp_path))
        plog.write([row(1)])
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        plog.close()
    finally:
        os.umask(previous)
    assert modes == {"predictions.db": 0o600, "predictions.db-wal": 0o600, "predictions.db-shm": 0o600}


def test_an_old_world_readable_log_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "predictions.db"
    PredictionLog(default_url(tmp_path)).close()
    db.chmod(0o644)
    PredictionLog(default_url(tmp_path)).close()
    assert db.stat().st_mode & 0o777 == 0o600


def test_retention_deletes_old_rows_at_start_and_while_running(tmp_path: Path) -> None:
    import time

    url = default_url(tmp_path)
    day = 86_400
    plog = PredictionLog(url)
    old, recent = row(1), row(2)
    old.time, recent.time = time.time() - 10 * day, time.time() - 1 * day
    plog.write([old, recent])
    plog.close()
    assert count_rows(url) == 2

    plog = PredictionLog(url, retain_days=5, purge_every_s=0.05)
    assert [r["request_id"] for r in read_rows(url)] == ["req-2"]  # deleted at start-up
    late = row(3)
    late.time = time.time() - 6 * day  # e.g. a clock that was wrong, or rows copied in
    plog.write([late])
    deadline = time.monotonic() + 10
    while count_rows(url) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    plog.close()
    assert [r["request_id"] for r in read_rows(url)] == ["req-2"]  # the periodic purge, with no writes
    assert plog.purged_rows == 2
