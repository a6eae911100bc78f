"""The server app in-process (FastAPI's TestClient over the tiny trained run): one error shape,
every status counted, start-up checks before the model loads, "ready" only once it has."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from taskling.errors import ConfigError, RunError
from taskling.serve.engine import Engine
from taskling.serve.http import ERROR_TYPES
from taskling.serve.predlog import LogRow, PredictionLog, count_rows
from taskling.serve.server import ServeSettings, build_engine, create_app
from test_cli_classify import extraction_run

KEY = "k-3b9f1e"
AUTH = {"X-API-Key": KEY}
runner = CliRunner()


@pytest.fixture(scope="module")
def engine(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    url = f"sqlite:///{tmp_path_factory.mktemp('applog') / 'log.db'}"
    settings = ServeSettings(api_key=KEY, log_url=url, threads=1, dtype="float32", max_texts=2, max_body_bytes=2048)
    return build_engine(trained_run, settings)


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as c:
        yield c


def assert_error_shape(response: Any, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}, body
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    assert error["type"] == ERROR_TYPES.get(status, "server_error")


def test_every_error_has_the_one_documented_shape(client: TestClient) -> None:
    post = client.post
    assert_error_shape(post("/v1/classify", json={"text": "hi"}), 401)  # no key
    assert_error_shape(post("/v1/classify", json={"texts": ["a", "b", "c"]}, headers=AUTH), 413)  # too many texts
    big = json.dumps({"text": "a"}).encode() + b" " * 4096
    assert_error_shape(post("/v1/classify", content=big, headers={**AUTH, "content-type": "application/json"}), 413)
    invalid = post("/v1/classify", json={"texts": [1, 2]}, headers=AUTH)
    assert_error_shape(invalid, 422)
    assert invalid.json()["error"]["param"] == "texts.0"
    assert_error_shape(post("/v1/classify", json={"text": "a", "adapter": "nope"}, headers=AUTH), 404)
    assert_error_shape(post("/v1/classify", json={"text": "a", "adapter": "../x"}, headers=AUTH), 400)
    chat = {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}  # without logprobs: true
    assert_error_shape(post("/v1/chat/completions", json=chat, headers=AUTH), 400)
    assert_error_shape(post("/v1/chat/completions", json={**chat, "n": 0}, headers=AUTH), 422)
    assert_error_shape(client.get("/v1/models/nope", headers=AUTH), 404)
    assert_error_shape(client.get("/no/such/path", headers=AUTH), 404)
    assert_error_shape(client.get("/v1/classify", headers=AUTH), 405)


def test_metrics_count_every_status_500_included(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.post("/v1/classify", json={"text": "hi"})  # 401
    client.post("/v1/classify", json={"texts": ["a", "b", "c"]}, headers=AUTH)  # 413
    client.post("/v1/classify", content=b"x" * 4096, headers={**AUTH, "content-type": "application/json"})  # 413
    ok = client.post("/v1/classify", json={"text": "hello"}, headers=AUTH)
    assert ok.status_code == 200

    def boom(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("planted failure")

    monkeypatch.setattr(engine.classifiers["default"], "predict", boom)
    assert_error_shape(client.post("/v1/classify", json={"text": "hi"}, headers=AUTH), 500)
    assert "planted" not in client.post("/v1/classify", json={"text": "hi"}, headers=AUTH).text
    monkeypatch.undo()
    text = client.get("/metrics", headers=AUTH).text
    for status in ("200", "401", "413", "500"):
        assert f'taskling_requests_total{{endpoint="/v1/classify",status="{status}"}}' in text, status
    assert 'taskling_rejected_total{reason="too_large"}' in text and 'taskling_rejected_total{reason="auth"}' in text


def test_a_name_requests_cannot_use_is_refused_before_the_model_loads(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import taskling.serve.server as server

    monkeypatch.setattr(server, "load_adapters", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"'my model' cannot be served: names are a letter or digit"):
        build_engine(trained_run, ServeSettings(name="my model"))
    from taskling.cli import app

    result = runner.invoke(app, ["serve", str(trained_run), "--name", "my model"])
    assert result.exit_code == 2 and "cannot be served" in result.output and "fix:" in result.output


def test_extraction_runs_are_served_but_not_quantized(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import taskling.serve.server as server

    root = tmp_path / "adapters"
    root.mkdir()
    extraction_run(trained_run, root / "invoices")
    settings = ServeSettings(adapters_dir=root, log_url=f"sqlite:///{tmp_path / 'l.db'}", threads=1, dtype="float32")
    engine = build_engine(trained_run, settings)
    assert list(engine.classifiers) == ["default"] and list(engine.extractors) == ["invoices"]
    engine.plog.close()
    (root / "other").mkdir()
    (root / "other" / "run.json").write_text(json.dumps({"kind": "ranking"}))
    (root / "other" / "adapter").mkdir()
    (root / "other" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(RunError, match="is a ranking run; only classification, extraction and generation runs"):
        build_engine(trained_run, settings)
    shutil.rmtree(root / "other")

    monkeypatch.setattr(server, "load_adapters", lambda *a, **k: pytest.fail("the model was loaded"))
    from taskling.cli import app

    result = runner.invoke(app, ["serve", str(trained_run), "--adapters-dir", str(root), "--quantize", "int8"])
    assert result.exit_code == 2 and "--quantize int8 applies to classification runs" in result.output
    assert "Traceback" not in result.output and "ValidationError" not in result.output


def test_an_empty_api_key_file_is_an_error_not_no_key(trained_run: Path, tmp_path: Path) -> None:
    from taskling.cli import app

    empty = tmp_path / "key.txt"
    empty.write_text("  \n")
    env = {"TASKLING_API_KEY": ""}
    result = runner.invoke(app, ["serve", str(trained_run), "--api-key-file", str(empty)], env=env)
    assert result.exit_code == 2 and "is empty" in result.output
    result = runner.invoke(app, ["serve", str(trained_run), "--api-key-file", str(tmp_path / "missing")], env=env)
    assert result.exit_code == 2 and "cannot read the API key file" in result.output


def test_ready_is_printed_only_after_the_model_loads_and_retention_runs_at_start(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    import taskling.serve.server as server
    from taskling.cli import app

    url = f"sqlite:///{tmp_path / 'log.db'}"
    plog = PredictionLog(url)
    old = time.time() - 3 * 86_400
    plog.write([LogRow("old", "default", "v", "old text", "a", 1.0, {"a": 1.0}, 1.0, time=old)])
    plog.write([LogRow("new", "default", "v", "new text", "a", 1.0, {"a": 1.0}, 1.0)])
    plog.close()

    events: list[str] = []
    real_load = server.load_adapters

    def load(*args: Any, **kwargs: Any) -> Any:
        out = real_load(*args, **kwargs)
        print("MODEL-LOADED", flush=True)
        return out

    def fake_run(app_: Any, **_kwargs: Any) -> None:
        with TestClient(app_) as c:
            events.append(f"healthz {c.get('/healthz').status_code}")

    monkeypatch.setattr(server, "load_adapters", load)
    monkeypatch.setattr(uvicorn, "run", fake_run)
    args = ["serve", str(trained_run), "--log-url", url, "--retain-days", "1", "--threads", "1"]
    result = runner.invoke(app, args, env={"TASKLING_API_KEY": ""})
    assert result.exit_code == 0, result.output
    assert events == ["healthz 200"]
    out = result.output
    assert "MODEL-LOADED" in out and "ready: serving" in out
    assert out.index("MODEL-LOADED") < out.index("ready: serving")
    assert out.index("MODEL-LOADED") < out.index("http://")  # nothing claims the address before the model is in
    assert count_rows(url) == 1  # the 3-day-old row went at start-up


def test_the_log_file_the_server_creates_is_private(trained_run: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'srv.db'}"
    previous = os.umask(0o022)
    try:
        engine = build_engine(trained_run, ServeSettings(log_url=url, threads=1, dtype="float32"))
        with TestClient(create_app(engine)) as c:
            assert c.post("/v1/classify", json={"text": "hello"}).status_code == 200
            modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if p.name.startswith("srv.db")}
    finally:
        os.umask(previous)
    assert set(modes) >= {"srv.db", "srv.db-wal", "srv.db-shm"}
    assert set(modes.values()) == {0o600}, modes
