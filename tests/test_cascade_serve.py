"""A cascade (or any predictor that names its stages) behind the server, and `unknown` in every entry point.

The server side uses a fake cascade (no model), so these run in a second; the `--abstain`
tests use the session's tiny trained run with an abstain.json written by hand.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from taskling.cli import app
from taskling.errors import RunError
from taskling.serve.abstain import UNKNOWN, AbstainThreshold
from taskling.serve.classifier import Prediction
from taskling.serve.engine import Engine
from taskling.serve.predlog import LogRow, PredictionLog, count_by_stage, read_rows
from taskling.serve.server import ServeSettings, build_engine, check_stages, create_app
from taskling.task import Task

runner = CliRunner()
LABELS = ["balance", "timer"]


class FakeCascade:
    """Answers like a cascade: easy texts at `tfidf`, hard ones at `lora`, the rest `unknown`."""

    stage_names: ClassVar[list[str]] = ["tfidf", "lora", "unknown"]
    version = "fake@1+cascade@abcd1234"
    task = Task(name="bank", labels=LABELS)

    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> list[Prediction]:
        out = []
        for t in texts:
            if t.startswith("easy"):
                out.append(Prediction(t, "balance", 0.95, {"balance": 0.95, "timer": 0.05}, stage="tfidf"))
            elif t.startswith("hard"):
                out.append(Prediction(t, "timer", 0.7, {"balance": 0.3, "timer": 0.7}, stage="lora"))
            else:
                out.append(Prediction(t, UNKNOWN, 0.5, {"balance": 0.5, "timer": 0.5}, stage="unknown"))
        return out


@pytest.fixture
def cascade_app(tmp_path: Path) -> Iterator[tuple[TestClient, Engine, str]]:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    settings = ServeSettings(log_url=url, threads=1)
    engine = Engine({"default": FakeCascade()}, PredictionLog(url), settings)
    with TestClient(create_app(engine)) as client:
        yield client, engine, url


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample, 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_each_answer_names_its_stage_in_the_response_log_and_metrics(
    cascade_app: tuple[TestClient, Engine, str],
) -> None:
    client, _, url = cascade_app
    texts = ["easy one", "hard one", "what is this", "easy two", "easy three"]
    body = client.post("/v1/classify", json={"texts": texts}).json()
    assert [r["stage"] for r in body["results"]] == ["tfidf", "lora", "unknown", "tfidf", "tfidf"]
    assert [r["label"] for r in body["results"]] == ["balance", "timer", UNKNOWN, "balance", "balance"]
    assert body["model_version"] == FakeCascade.version

    chat = {"model": "default", "messages": [{"role": "user", "content": "no idea"}]}
    answer = client.post("/v1/chat/completions", json=chat).json()
    assert answer["choices"][0]["message"]["content"] == UNKNOWN
    assert answer["taskling"]["stage"] == "unknown"
    card = client.get("/v1/models/default").json()
    assert card["taskling"]["stages"] == FakeCascade.stage_names

    logged = {r["text"]: r["stage"] for r in read_rows(url)}
    assert logged == {
        **dict(zip(texts, ["tfidf", "lora", "unknown", "tfidf", "tfidf"], strict=True)),
        "no idea": "unknown",
    }
    counts = count_by_stage(url)
    assert counts == {"tfidf": 3, "lora": 1, "unknown": 2}
    scrape = client.get("/metrics").text
    for stage, n in counts.items():
        assert metric(scrape, "taskling_stage_answers_total", adapter="default", stage=str(stage)) == n
        assert metric(scrape, "taskling_stage_latency_seconds_count", stage=str(stage)) == n


def test_an_old_prediction_log_gets_the_stage_column(tmp_path: Path) -> None:
    db = tmp_path / "predictions.db"
    with sqlite3.connect(db) as conn:  # the schema before stages existed
        conn.execute(
            "CREATE TABLE predictions (id INTEGER PRIMARY KEY AUTOINCREMENT, time FLOAT NOT NULL, "
            "request_id VARCHAR(64) NOT NULL, adapter VARCHAR(128) NOT NULL, model_version VARCHAR(128) NOT NULL, "
            "text TEXT NOT NULL, label VARCHAR(256) NOT NULL, probability FLOAT NOT NULL, "
            "probabilities TEXT NOT NULL, latency_ms FLOAT NOT NULL)"
        )
        conn.execute(
            "INSERT INTO predictions (time, request_id, adapter, model_version, text, label, probability, "
            "probabilities, latency_ms) VALUES (1.0, 'old', 'default', 'v', 'old text', 'timer', 0.9, '{}', 1.0)"
        )
    url = f"sqlite:///{db}"
    plog = PredictionLog(url)
    plog.write([LogRow("new", "default", "v", "new text", "balance", 0.8, {"balance": 0.8}, 2.0, stage="minilm")])
    plog.close()
    rows = {r["text"]: r for r in read_rows(url)}
    assert rows["old text"]["stage"] is None and rows["new text"]["stage"] == "minilm"
    assert [r["text"] for r in read_rows(url, stage="minilm")] == ["new text"]
    shown = runner.invoke(app, ["logs", str(tmp_path), "--url", url])
    assert shown.exit_code == 0, shown.output
    assert "stage" in shown.output and "minilm" in shown.output
    assert count_by_stage(url) == {None: 1, "minilm": 1}


class Unreachable:
    def check(self) -> None:
        raise RunError("teacher unreachable", fix="start it")

    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> list[Prediction]:
        raise AssertionError("never asked")


def test_a_stage_that_cannot_reach_its_endpoint_fails_at_start_up() -> None:
    cascade = FakeCascade()
    cascade.stages = [("tfidf", object()), ("teacher", Unreachable())]  # type: ignore[attr-defined]
    with pytest.raises(RunError, match="teacher unreachable"):
        check_stages(cascade)
    check_stages(FakeCascade())  # nothing to check: fine


# ---------------------------------------------------------------- --abstain


@pytest.fixture(scope="module")
def abstaining_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run with a threshold no answer reaches: every answer is `unknown`."""
    run = tmp_path_factory.mktemp("abstain") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("predictions.db*"))
    AbstainThreshold("probability", 1.01, "by hand", 10, 0, 1.0, 1.0, None).save(run)
    return run


@pytest.fixture(scope="module")
def plain_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("plain") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("predictions.db*", "abstain.json"))
    return run


def test_abstain_without_abstain_json_is_refused_before_the_model_loads(
    plain_run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import taskling.serve.classifier as classifier
    import taskling.serve.server as server

    def no_model(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the model loaded before the threshold was checked")

    monkeypatch.setattr(server, "load_adapters", no_model)
    monkeypatch.setattr(classifier.Classifier, "from_run", no_model)
    with pytest.raises(RunError, match=r"abstain\.json") as err:
        build_engine(plain_run, ServeSettings(abstain=True, log_url=f"sqlite:///{tmp_path / 'l.db'}"))
    assert f"taskling calibrate {plain_run}" in err.value.fix
    for args in (["classify", str(plain_run), "hello", "--abstain"],
                 ["predict-batch", str(plain_run), str(write_input(tmp_path)), "--out", str(tmp_path / "o.jsonl"),
                  "--abstain"]):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code != 0
        assert "abstain.json" in result.output and "taskling calibrate" in result.output


def write_input(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["check my balance", "set a timer"]))
    return path


def test_abstain_answers_unknown_in_classify_predict_batch_and_the_server(abstaining_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["classify", str(abstaining_run), "check my balance", "--abstain", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["label"] == UNKNOWN
    plain = runner.invoke(app, ["classify", str(abstaining_run), "check my balance", "--json"])
    assert json.loads(plain.output.strip().splitlines()[-1])["label"] != UNKNOWN  # only with --abstain

    out = tmp_path / "out.jsonl"
    batch = runner.invoke(
        app, ["predict-batch", str(abstaining_run), str(write_input(tmp_path)), "--out", str(out), "--abstain"]
    )
    assert batch.exit_code == 0, batch.output
    assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == [UNKNOWN, UNKNOWN]

    settings = ServeSettings(abstain=True, log_url=f"sqlite:///{tmp_path / 'log.db'}", threads=1, dtype="float32")
    with TestClient(create_app(build_engine(abstaining_run, settings))) as client:
        chat = {"model": "default", "messages": [{"role": "user", "content": "set a timer"}]}
        answer = client.post("/v1/chat/completions", json=chat).json()
        assert answer["choices"][0]["message"]["content"] == UNKNOWN
        assert client.post("/v1/classify", json={"text": "hi"}).json()["results"][0]["label"] == UNKNOWN
        assert client.get("/v1/models/default").json()["taskling"]["abstain"] is True
