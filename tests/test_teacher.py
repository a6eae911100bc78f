"""The teacher client against a real local OpenAI-compatible HTTP server (never the internet)."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from typer.testing import CliRunner

from taskling.data.load import Example
from taskling.data.teacher import TeacherClient, TeacherError, label_texts, synthesize

KEY = "sk-test-secret-123"
LABELS = ["balance", "timer", "weather"]
GOLD_TEXT = "how much money is in my checking account"

# What the fake teacher answers: (label, logprob of each of its two tokens).
ANSWERS = {
    "balance": ("balance", -0.01),
    "timer": ("timer", -0.02),
    "weather": ("weather", -0.9),  # unsure: exp(-1.8) = 0.17 confidence
    "fruit": ("banana", -0.05),  # an invented label
}
SYNTH = {
    "balance": [
        {"text": "what's left in my savings", "label": "balance"},
        {"text": "What's left in my savings?", "label": "balance"},  # duplicate
        {"text": GOLD_TEXT + " please", "label": "balance"},  # copies gold
        {"text": "", "label": "balance"},
    ],
    "timer": [
        {"text": "ring in five minutes", "label": "timer"},
        {"text": "is it going to rain", "label": "weather"},  # teacher drifted to another category
        {"text": "count down twenty seconds", "label": "stopwatch"},  # not in the set
    ],
    "weather": [{"text": "do i need an umbrella today", "label": "weather"}],
}


def fake_teacher() -> tuple[FastAPI, list[dict[str, Any]]]:
    app = FastAPI()
    seen: list[dict[str, Any]] = []

    @app.post("/v1/chat/completions")
    def complete(body: dict[str, Any], authorization: str = Header("")) -> dict[str, Any]:
        if authorization != f"Bearer {KEY}":
            raise HTTPException(401, "bad key")
        seen.append(body)
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Task:"):  # a synth request
            label = prompt.split("category '")[1].split("'")[0]
            content = json.dumps({"examples": SYNTH[label]})
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content}}
        else:
            key = next((k for k in ANSWERS if k in prompt), "timer")
            answer, logprob = ANSWERS[key]
            tokens = [answer[:2], answer[2:]]
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "logprobs": {"content": [{"token": t, "logprob": logprob, "top_logprobs": []} for t in tokens]},
            }
        return {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
        }

    return app, seen


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    app, seen = fake_teacher()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", seen
    srv.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def task() -> Any:
    from taskling.task import Task

    return Task(name="bank", labels=LABELS)


def test_label_texts_confidence_from_logprobs_and_cache(
    server: tuple[str, list[dict[str, Any]]], task: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, seen = server
    texts = ["what is my balance", "set a timer", "weather in paris", "I like fruit"]
    client = TeacherClient(url, KEY, "teacher-xl", cache_dir=tmp_path)
    before = len(seen)
    with caplog.at_level(logging.DEBUG):
        rows = label_texts(texts, task, client)
    assert [r["label"] for r in rows] == ["balance", "timer", "weather", "banana"]
    assert rows[0]["confidence"] == pytest.approx(math.exp(-0.02), abs=1e-4)
    assert rows[2]["confidence"] == pytest.approx(math.exp(-1.8), abs=1e-4)
    assert len(seen) - before == 4
    assert "Categories: balance, timer, weather" in seen[-1]["messages"][0]["content"]
    assert seen[-1]["logprobs"] is True and seen[-1]["temperature"] == 0
    assert (client.usage.requests, client.usage.prompt_tokens, client.usage.completion_tokens) == (4, 80, 12)
    # A rerun is answered from the disk cache: no request, no tokens.
    again = TeacherClient(url, KEY, "teacher-xl", cache_dir=tmp_path)
    assert label_texts(texts, task, again) == rows
    assert len(seen) - before == 4
    assert (again.usage.requests, again.usage.cache_hits, again.usage.total_tokens) == (0, 4, 0)
    # The key is never logged, cached or shown.
    assert KEY not in caplog.text and KEY not in repr(client)
    assert all(KEY not in p.read_text() for p in tmp_path.rglob("*.json"))


def test_wrong_key_and_missing_endpoint_are_clear_errors(
    server: tuple[str, list[dict[str, Any]]], task: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = server
    with pytest.raises(TeacherError, match="HTTP 401"):
        label_texts(["hi"], task, TeacherClient(url, "wrong", cache_dir=tmp_path))
    for name in ("TASKLING_TEACHER_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TeacherError, match="no teacher endpoint"):
        TeacherClient(cache_dir=tmp_path)


def test_synth_validates_every_example(server: tuple[str, list[dict[str, Any]]], task: Any, tmp_path: Path) -> None:
    url, _ = server
    client = TeacherClient(url, KEY, cache_dir=tmp_path)
    gold = [Example(GOLD_TEXT, "balance")]
    result = synthesize(task, client, per_label=4, gold=gold)
    assert [(ex.text, ex.label) for ex in result.accepted] == [
        ("what's left in my savings", "balance"),
        ("ring in five minutes", "timer"),
        ("do i need an umbrella today", "weather"),
    ]
    assert result.rejected_by_reason() == {
        "duplicate": 1,
        "empty_text": 1,
        "wrong_label": 1,
        "label_not_in_set": 1,
        "gold_leak": 1,
    }
    assert result.usage.requests == 3


def test_label_then_distill_cli(
    server: tuple[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskling.cli import app

    url, _ = server
    monkeypatch.setenv("TASKLING_TEACHER_BASE_URL", url)
    monkeypatch.setenv("TASKLING_TEACHER_API_KEY", KEY)
    monkeypatch.setenv("TASKLING_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "task.yaml"
    task.write_text("name: bank\nlabels: [balance, timer, weather]\n")
    texts = tmp_path / "texts.txt"
    texts.write_text("what is my balance\nset a timer\nweather in paris\nI like fruit\n")
    runner = CliRunner()
    labeled = runner.invoke(app, ["label", str(texts), "--task", str(task), "--out", str(tmp_path / "logs.jsonl")])
    assert labeled.exit_code == 0, labeled.output
    assert KEY not in labeled.output and "requests 4" in labeled.output
    out = tmp_path / "out"
    distilled = runner.invoke(
        app,
        [
            "distill",
            str(tmp_path / "logs.jsonl"),
            "--task",
            str(task),
            "--out",
            str(out),
            "--set",
            "label_errors=false",
        ],
    )
    assert distilled.exit_code == 0, distilled.output
    report = json.loads((out / "report.json").read_text())
    assert (report["train"], report["review_queue"], report["rejected"]) == (2, 1, 1)
    assert report["invented_labels"] == {"banana": 1}
    assert report["review_reasons"] == {"low_confidence": 1}
