"""The teacher as a serving stage, against a local fake OpenAI-compatible server (never the internet)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import Header, HTTPException

from taskling.data.teacher import TeacherError
from taskling.errors import ConfigError
from taskling.serve.abstain import UNKNOWN
from taskling.serve.server import check_stages
from taskling.serve.teacher_stage import STAGE, TeacherStage
from taskling.task import Task
from test_teacher import KEY, LABELS, fake_teacher


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    app, _ = fake_teacher()

    @app.get("/v1/models")
    def models(authorization: str = Header("")) -> dict[str, Any]:
        if authorization != f"Bearer {KEY}":
            raise HTTPException(401, "bad key")
        return {"object": "list", "data": [{"id": "teacher-model", "object": "model"}]}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def task() -> Task:
    return Task(name="bank", labels=LABELS)


def settings(url: str, tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {"url": url, "model": "teacher-model", "cost_per_call": 0.0004, "cache_dir": str(tmp_path)} | more


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # nothing listens once closed


def test_teacher_answers_labels_and_unknown_for_an_invented_one(
    url: str, task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLING_TEACHER_API_KEY", KEY)
    stage = TeacherStage.from_settings(settings(url, tmp_path), task)
    stage.check()
    texts = ["what is my balance", "weather in Paris", "a fruit please"]
    preds = stage.predict(texts)
    assert [p.text for p in preds] == texts
    assert [p.label for p in preds] == ["balance", "weather", UNKNOWN]  # "banana" is not a label of the set
    assert {p.stage for p in preds} == {STAGE}
    assert preds[0].probability == pytest.approx(0.98, abs=0.01)  # exp(-0.02) from the token logprobs
    assert preds[1].probability == pytest.approx(0.165, abs=0.01)  # the teacher was unsure
    assert preds[2].probability == 0.0 and set(preds[2].probabilities) == set(LABELS)
    assert stage.cost_per_call == 0.0004 and stage.version == "teacher:teacher-model"
    assert KEY not in repr(stage)


def test_an_unreachable_teacher_or_a_wrong_key_fails_at_start_up(
    url: str, task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLING_TEACHER_API_KEY", KEY)
    dead = TeacherStage.from_settings(settings(closed_port(), tmp_path), task)
    with pytest.raises(TeacherError, match="unreachable") as err:
        dead.check()
    assert "url" in err.value.fix
    with pytest.raises(TeacherError, match="unreachable"):  # what serve calls on a cascade's stages
        check_stages(type("C", (), {"stages": [("teacher", dead)]})())
    monkeypatch.setenv("TEACHER_KEY", "sk-wrong")
    wrong = TeacherStage.from_settings(settings(url, tmp_path, api_key_env="TEACHER_KEY"), task)
    with pytest.raises(TeacherError, match="refused the API key"):
        wrong.check()


def test_bad_teacher_settings_are_config_errors(task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="urll"):
        TeacherStage.from_settings({"urll": "http://x/v1", "model": "m"}, task)
    with pytest.raises(ConfigError, match="cost_per_call"):
        TeacherStage.from_settings({"url": "http://x/v1", "model": "m", "cost_per_call": -1}, task)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR") as err:
        TeacherStage.from_settings({"url": "http://x/v1", "model": "m", "api_key_env": "NO_SUCH_KEY_VAR"}, task)
    assert "export NO_SUCH_KEY_VAR" in err.value.fix
