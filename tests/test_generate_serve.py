"""A generation run served and batched on the tiny model: /v1/generate, chat completions,
the prediction log, `taskling logs`, `taskling predict-batch` and drift over the served log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import regex
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from taskling.cli import app
from taskling.errors import TasklingError
from taskling.monitor.config import MonitorConfig
from taskling.monitor.drift import monitor
from taskling.serve.engine import Engine
from taskling.serve.http import ERROR_TYPES
from taskling.serve.predlog import read_rows
from taskling.serve.server import ServeSettings, build_engine, create_app
from test_generate_run import CODE, gen_run  # noqa: F401  (the module-scoped fixture: one tiny trained run)

KEY = "k-gen-5c1"
AUTH = {"X-API-Key": KEY}
runner = CliRunner()
TEXTS = ["open a ticket about my flight", "open a ticket about my bill"]


@pytest.fixture(scope="module")
def log_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('genlog') / 'log.db'}"


@pytest.fixture(scope="module")
def engine(gen_run: tuple[Path, Path], log_url: str) -> Engine:  # noqa: F811
    settings = ServeSettings(api_key=KEY, log_url=log_url, threads=1, dtype="float32", max_texts=4)
    return build_engine(gen_run[0], settings)


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as c:
        yield c


def error_of(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["type"] == ERROR_TYPES.get(status)
    return str(error["message"])


def test_generate_answers_in_format_and_logs_every_answer(client: TestClient, log_url: str) -> None:
    r = client.post("/v1/generate", json={"texts": TEXTS}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "default" and len(body["results"]) == 2
    for result in body["results"]:
        assert set(result) == {"output", "valid", "n_tokens", "ms", "problem"}
        assert result["valid"] and regex.fullmatch(CODE, result["output"]) and result["problem"] == ""
        assert 0 < result["n_tokens"] <= 8
    logged = [row for row in read_rows(log_url) if row["request_id"] == body["request_id"]]
    assert [row["text"] for row in logged] == TEXTS
    assert [row["label"] for row in logged] == [res["output"] for res in body["results"]]  # label = output text
    assert all(row["probability"] == 1.0 and row["probabilities"]["valid"] == 1.0 for row in logged)
    assert [row["probabilities"]["n_tokens"] for row in logged] == [res["n_tokens"] for res in body["results"]]
    assert all(row["stage"] is None and row["latency_ms"] > 0 for row in logged)


def test_max_tokens_cuts_the_answer_and_is_held_to_the_task(client: TestClient, log_url: str) -> None:
    r = client.post("/v1/generate", json={"text": TEXTS[0], "max_tokens": 1}, headers=AUTH)
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["n_tokens"] == 1 and not result["valid"] and result["problem"].startswith("cut at max_tokens=1")
    (row,) = [row for row in read_rows(log_url) if row["request_id"] == r.json()["request_id"]]
    assert row["probability"] == 0.0 and row["label"] == result["output"]  # invalid answers are logged too
    assert "task.output.max_tokens (8)" in error_of(
        client.post("/v1/generate", json={"text": "x", "max_tokens": 9}, headers=AUTH), 422
    )


def test_generate_has_the_classify_routes_limits_auth_and_errors(client: TestClient) -> None:
    error_of(client.post("/v1/generate", json={"text": "hi"}), 401)
    error_of(client.post("/v1/generate", json={"texts": ["a"] * 5}, headers=AUTH), 413)
    error_of(client.post("/v1/generate", json={"texts": []}, headers=AUTH), 422)
    error_of(client.post("/v1/generate", json={"text": "a", "temperature": 1}, headers=AUTH), 422)
    assert "no adapter named" in error_of(
        client.post("/v1/generate", json={"text": "a", "adapter": "nope"}, headers=AUTH), 404
    )
    assert "/v1/generate" in error_of(client.post("/v1/classify", json={"text": "a"}, headers=AUTH), 400)
    assert "/v1/generate" in error_of(client.post("/v1/extract", json={"text": "a"}, headers=AUTH), 400)


def test_chat_completions_return_the_format_valid_output(client: TestClient) -> None:
    direct = client.post("/v1/generate", json={"text": TEXTS[1]}, headers=AUTH).json()["results"][0]
    messages = [{"role": "user", "content": TEXTS[1]}]
    r = client.post("/v1/chat/completions", json={"model": "default", "messages": messages}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == direct["output"]
    assert body["taskling"]["valid"] is True and body["taskling"]["n_tokens"] == direct["n_tokens"]
    assert body["usage"]["completion_tokens"] > direct["n_tokens"]  # the end-of-turn marker counts too
    assert body["usage"]["prompt_tokens"] > 0 and body["taskling"]["ignored"] == []
    cut = client.post(
        "/v1/chat/completions", json={"model": "default", "messages": messages, "max_tokens": 1}, headers=AUTH
    ).json()
    assert cut["taskling"]["n_tokens"] == 1 and cut["taskling"]["valid"] is False
    assert "max_tokens" not in cut["taskling"]["ignored"]  # honoured, not ignored
    assert "logprobs" in error_of(
        client.post(
            "/v1/chat/completions", json={"model": "default", "messages": messages, "logprobs": True}, headers=AUTH
        ),
        400,
    )
    card = client.get("/v1/models/default", headers=AUTH).json()["taskling"]
    assert card["kind"] == "generation" and card["output"] == {"format": "regex", "pattern": CODE, "max_tokens": 8}


def test_logs_show_the_generated_outputs(client: TestClient, log_url: str) -> None:
    client.post("/v1/generate", json={"text": TEXTS[0]}, headers=AUTH)
    out = runner.invoke(app, ["logs", "unused", "--url", log_url, "--limit", "1"])
    assert out.exit_code == 0, out.output
    newest = next(iter(read_rows(log_url, limit=1, newest=True)))
    assert newest["label"] in out.output and "open a ticket" in out.output


def test_monitor_reads_a_served_generation_log(
    client: TestClient,
    log_url: str,
    gen_run: tuple[Path, Path],  # noqa: F811
) -> None:
    client.post("/v1/generate", json={"texts": TEXTS}, headers=AUTH)
    report = monitor(gen_run[0], url=log_url, config=MonitorConfig(embedder="hashing", min_rows=1))
    names = [s.name for s in report.signals]
    assert "label_shift" not in names and {"input_drift", "output_length", "validity_drop"} <= set(names)
    assert report.window["rows"] >= 2 and report.categories == []


def test_predict_batch_writes_one_answer_per_row_and_flags_rows_without_text(
    gen_run: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    src = tmp_path / "in.jsonl"
    rows = [{"id": 1, "text": TEXTS[0]}, {"id": 2, "text": None}, {"id": 3, "text": "  "}, {"id": 4, "text": TEXTS[1]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["predict-batch", str(gen_run[0]), str(src), "--out", str(out), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == [1, 2, 3, 4]  # one row per input row, in order
    assert [r["valid"] for r in written] == [True, False, False, True]
    assert [r["problem"] for r in written] == ["", "no text", "no text", ""]
    assert all(regex.fullmatch(CODE, written[i]["output"]) for i in (0, 3)) and written[1]["output"] == ""
    assert written[0]["n_tokens"] > 0 and written[1]["n_tokens"] == 0
    csv_out = tmp_path / "out.csv"
    assert runner.invoke(app, ["predict-batch", str(gen_run[0]), str(src), "--out", str(csv_out)]).exit_code == 0
    assert csv_out.read_text().splitlines()[0].split(",")[-4:] == ["output", "valid", "n_tokens", "problem"]


def test_predict_batch_on_a_generation_run_refuses_ray(gen_run: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    from taskling.serve.generation import refuse_ray_for_generation

    with pytest.raises(TasklingError, match="local engine only"):
        refuse_ray_for_generation("ray")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "a"}) + "\n")
    result = runner.invoke(
        app, ["predict-batch", str(gen_run[0]), str(src), "--out", str(tmp_path / "o.jsonl"), "--engine", "ray"]
    )
    assert result.exit_code != 0 and "local engine only" in result.output
