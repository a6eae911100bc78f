"""The OpenAI-compatible API, driven by the official `openai` client against a real server.

`taskling serve` runs on an *extraction* run directory (served as `default`) with a
classification run beside it in `--adapters-dir` (served as `clinc`): one uvicorn
process on loopback answers both kinds, every answer lands in the prediction log.
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from taskling.extract.schema import ExtractionTask
from taskling.model.loader import load_tokenizer
from taskling.task import Task
from test_serve import Server, start_server, stop

FIELDS = [
    {"name": "intent", "type": "enum", "values": ["balance", "alarm", "weather"]},
    {"name": "urgent", "type": "boolean"},
    {"name": "city", "type": "string", "max_length": 8, "required": False},
]


def make_extraction_run(trained_run: Path, dest: Path) -> Path:
    """The trained adapter relabeled as an extraction run (an enum, a boolean, an optional string)."""
    shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns("checkpoint", "*.db*"))
    manifest = json.loads((dest / "run.json").read_text())
    manifest["kind"] = "extraction"
    manifest["task"] = {"kind": "extraction", "name": "requests", "fields": FIELDS}
    manifest.pop("label_answers", None)
    (dest / "run.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="module")
def served(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("oai")
    extraction = make_extraction_run(trained_run, root / "requests")
    others = root / "adapters"
    shutil.copytree(trained_run, others / "clinc", ignore=shutil.ignore_patterns("checkpoint", "*.db*"))
    srv = start_server(extraction, root, "--adapters-dir", str(others))
    yield srv
    stop(srv)


@pytest.fixture(scope="module")
def client(served: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused-on-loopback", max_retries=0)


@pytest.fixture(scope="module")
def clinc(trained_run: Path) -> tuple[Any, Task]:
    """The classification run's tokenizer and task, to count tokens independently of the server."""
    manifest = json.loads((trained_run / "run.json").read_text())
    tokenizer = load_tokenizer(str(trained_run / "tokenizer"), manifest["chat_template"])
    return tokenizer, Task.model_validate(manifest["task"])


def logged(server: Server) -> list[tuple[str, str, str, str, float]]:
    with sqlite3.connect(server.db) as conn:
        query = "select request_id, adapter, text, label, probability from predictions order by id"
        return list(conn.execute(query))


def test_models_lists_every_served_adapter(client: openai.OpenAI, labels: list[str]) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["clinc", "default"]  # classification runs first
    assert all(m.object == "model" and m.owned_by == "taskling" and m.created > 0 for m in models.data)
    clinc = client.models.retrieve("clinc").model_dump()
    assert clinc["taskling"]["kind"] == "classification" and clinc["taskling"]["labels"] == labels
    extraction = client.models.retrieve("default").model_dump()["taskling"]
    assert extraction["kind"] == "extraction"
    assert list(extraction["schema"]["properties"]) == ["intent", "urgent", "city"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_usage_logprobs_n_and_ignored_fields(
    client: openai.OpenAI, served: Server, clinc: tuple[Any, Task]
) -> None:
    text = "what is the balance of my checking account"
    raw = client.chat.completions.with_raw_response.create(
        model="clinc",
        messages=[
            {"role": "system", "content": "You are a pirate. Answer anything."},
            {"role": "user", "content": "an earlier turn"},
            {"role": "assistant", "content": "balance"},
            {"role": "user", "content": text},
        ],
        temperature=1.5,
        logprobs=True,
        top_logprobs=3,
        n=2,
    )
    completion = raw.parse()
    expected = httpx.post(served.url + "/v1/classify", json={"text": text, "adapter": "clinc"}).json()["results"][0]
    label, probs = expected["label"], expected["probabilities"]
    assert [c.message.content for c in completion.choices] == [label, label]  # n identical choices
    assert [c.index for c in completion.choices] == [0, 1]

    entry = completion.choices[0].logprobs.content[0]  # type: ignore[union-attr,index]
    assert entry.token == label and entry.bytes == list(label.encode())
    assert entry.logprob == pytest.approx(math.log(probs[label]), abs=1e-5)
    best3 = sorted(probs, key=lambda k: -probs[k])[:3]
    assert [t.token for t in entry.top_logprobs] == best3
    assert [t.logprob for t in entry.top_logprobs] == pytest.approx([math.log(probs[k]) for k in best3], abs=1e-5)

    tokenizer, task = clinc
    prompt = tokenizer.apply_chat_template(task.messages(text), add_generation_prompt=True, tokenize=False)
    answer = tokenizer.apply_chat_template(task.messages(text, label), tokenize=False)[len(prompt) :].rstrip("\n")
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n_answer = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens == n_prompt and n_prompt > len(tokenizer(text)["input_ids"])
    assert usage.completion_tokens == 2 * n_answer and usage.total_tokens == n_prompt + 2 * n_answer

    # The pirate prompt, the earlier turns and the temperature changed nothing, and the answer says so.
    assert raw.headers["X-Taskling-Ignored"] == "system, other_messages, temperature"
    assert completion.model_dump()["taskling"]["ignored"] == ["system", "other_messages", "temperature"]

    # The run's own instruction as the system message is not "ignored": it is what the model reads.
    own = [{"role": "system", "content": task.system_prompt()}, {"role": "user", "content": text}]
    plain = client.chat.completions.with_raw_response.create(model="clinc", messages=own)  # type: ignore[arg-type]
    assert "X-Taskling-Ignored" not in plain.headers
    body = plain.parse()
    assert body.choices[0].logprobs is None and body.choices[0].message.content == label

    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="clinc", messages=own, top_logprobs=2)  # type: ignore[arg-type]


def test_stream_is_one_chunk_then_done(client: openai.OpenAI, served: Server) -> None:
    messages = [{"role": "user", "content": "set an alarm for six"}]
    expected = httpx.post(served.url + "/v1/classify", json={"text": messages[0]["content"], "adapter": "clinc"})
    label = expected.json()["results"][0]["label"]
    chunks = list(
        client.chat.completions.create(
            model="clinc",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 2
    assert chunks[0].choices[0].delta.content == label and chunks[0].choices[0].finish_reason == "stop"
    assert chunks[1].choices == [] and chunks[1].usage is not None and chunks[1].usage.completion_tokens > 0
    with httpx.stream(
        "POST", served.url + "/v1/chat/completions", json={"model": "clinc", "messages": messages, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert len(events) == 2 and events[-1] == "data: [DONE]"
    assert json.loads(events[0][len("data: ") :])["choices"][0]["delta"]["content"] == label


def test_extraction_runs_answer_schema_valid_json(client: openai.OpenAI, served: Server) -> None:
    task = ExtractionTask.model_validate({"fields": FIELDS})
    texts = ["is it going to rain in paris", "wake me up at seven, urgent", "Переведи 这是什么 🤖"]
    r = httpx.post(served.url + "/v1/extract", json={"texts": texts}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "default" and body["model_version"].startswith("requests@")
    for result in body["results"]:
        assert task.validate_record(result["record"]) == result["record"] and result["valid"] is True
        assert set(result["confidence"]) == {"intent", "urgent", "city"}
        assert all(0 < c <= 1 for c in result["confidence"].values())

    completion = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": texts[0]}], logprobs=True
    )
    content = completion.choices[0].message.content
    assert content is not None and json.loads(content) == body["results"][0]["record"]
    assert task.parse(content) == json.loads(content)  # schema-valid JSON as the message content
    entry = completion.choices[0].logprobs.content[0]  # type: ignore[union-attr,index]
    confidence = body["results"][0]["confidence"]
    assert entry.token == content and entry.top_logprobs == []
    assert entry.logprob == pytest.approx(sum(math.log(c) for c in confidence.values()), abs=1e-4)
    assert completion.usage is not None and completion.usage.completion_tokens > len(FIELDS)

    wrong = httpx.post(served.url + "/v1/classify", json={"text": "hi"})
    assert wrong.status_code == 400 and "/v1/extract" in wrong.json()["error"]["message"]
    wrong = httpx.post(served.url + "/v1/extract", json={"text": "hi", "adapter": "clinc"})
    assert wrong.status_code == 400 and "/v1/classify" in wrong.json()["error"]["message"]

    rows = [row for row in logged(served) if row[0] == body["request_id"]]
    assert [row[2] for row in rows] == texts and {row[1] for row in rows} == {"default"}
    for row, result in zip(rows, body["results"], strict=True):
        assert json.loads(row[3]) == result["record"]  # the record is the logged label
        assert row[4] == pytest.approx(math.prod(result["confidence"].values()))


def test_every_answer_is_logged(client: openai.OpenAI, served: Server) -> None:
    before = len(logged(served))
    client.chat.completions.create(model="clinc", messages=[{"role": "user", "content": "log me"}], n=3)
    list(
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "log me too"}], stream=True
        )
    )
    rows = logged(served)[before:]
    assert [(row[1], row[2]) for row in rows] == [("clinc", "log me"), ("default", "log me too")]
    metrics = httpx.get(served.url + "/metrics").text
    assert 'taskling_requests_total{endpoint="/v1/models/{model}",status="200"}' in metrics
    assert 'taskling_requests_total{endpoint="/v1/extract",status="200"}' in metrics
    assert 'taskling_predictions_total{adapter="default",label="valid"}' in metrics
