"""Property-based fuzzing of every data loader and of the server's request bodies.

Properties, for any generated input:
- the loaders raise nothing but `DataError`, and a row error names `path:line`;
- kept + rejected rows equal the rows in the file, and each row's fate is the one its
  content calls for (where the test can tell independently);
- the server never answers 500, answers only labels of the set, and logs every text it
  acknowledged (no lost log rows).

The example counts here keep the suite fast; `bench/fuzz.py` runs the same properties
with 10,000+ cases (FUZZ_EXAMPLES scales them here too).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskling.data.load import load_file
from taskling.errors import DataError
from taskling.task import Task

SCALE = float(os.environ.get("FUZZ_EXAMPLES_SCALE", "1"))
LABELS = ["balance", "bill_due", "freeze_account", "pay_bill", "transfer", "weather", "alarm", "timer"]
TASK = Task(name="fuzz", labels=LABELS)


def n(base: int) -> int:
    return max(1, int(base * SCALE))


FUZZ = settings(
    max_examples=n(150), deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=False
)

# ------------------------------------------------------------------ strategies

nasty_text = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8")),
    st.sampled_from(["", " ", "\t", "\u200b", "\u202e", "\ufeff", "\x00", "\u2028", "\x1c", "\r", "\\", '"']),
    st.builds(lambda a, b: a + b, st.sampled_from(LABELS), st.sampled_from(["", " ", "\n", "\u200b", "s", "X"])),
    st.sampled_from(LABELS),
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | nasty_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty_text, inner, max_size=3),
    max_leaves=6,
)
turn = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "gpt", "human", "tool"]) | nasty_text},
    optional={"content": json_value | nasty_text},
)
row = st.one_of(
    st.fixed_dictionaries({"text": nasty_text, "label": nasty_text}),  # the common case, judged exactly below
    st.fixed_dictionaries({"text": json_value, "label": json_value}),
    st.fixed_dictionaries({"instruction": json_value, "response": json_value}),
    st.fixed_dictionaries({"instruction": json_value, "output": json_value}, optional={"input": json_value}),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4) | json_value}),
    st.fixed_dictionaries({"conversations": st.lists(json_value, max_size=3)}),
    json_value,
)


def expected_fate(r: Any) -> bool | None:
    """True/False when a row's fate is plain from its content (a text_label row of strings), else None."""
    if not (isinstance(r, dict) and set(r) == {"text", "label"}):
        return None
    text, label = r["text"], r["label"]
    if not (isinstance(text, str) and isinstance(label, str)):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return bool(text.strip()) and label.strip() in LABELS


# ------------------------------------------------------------------ checks


def check_load(path: Path, rows_in: int | None, fates: dict[int, bool | None]) -> None:
    """The loader's promises for `path`, in skip and in error mode."""
    try:
        result = load_file(path, TASK, on_bad_rows="skip")
    except DataError as err:  # a file-level problem (encoding, CSV syntax): names the file
        assert err.path == str(path)
        assert str(err).startswith(str(path))
        return
    assert len(result.examples) + len(result.bad_rows) == result.rows_read
    if rows_in is not None:
        assert result.rows_read == rows_in
    for bad in result.bad_rows:
        assert bad.path == str(path) and bad.line >= 1 and bad.reason
    for ex in result.examples:
        assert ex.label in LABELS and ex.text and ex.text == ex.text.strip()
    kept_lines = {ex.line for ex in result.examples}
    for line, fate in fates.items():
        if fate is not None:
            assert (line in kept_lines) == fate, (line, fate)
    try:
        strict = load_file(path, TASK, on_bad_rows="error")
    except DataError as err:
        first = min(result.bad_rows, key=lambda b: b.line)
        assert err.path == str(path) and err.line == first.line
        assert str(err).startswith(f"{path}:{first.line}: ")
        assert err.fix
        return
    assert not result.bad_rows and len(strict.examples) == len(result.examples)


def write_tmp(suffix: str, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def fuzz_jsonl(rows: list[Any], ascii_flags: list[bool], junk: list[tuple[int, str]]) -> None:
    lines = [json.dumps(r, ensure_ascii=flag) for r, flag in zip(rows, ascii_flags + [True] * len(rows), strict=False)]
    for pos, text in junk:  # lines that are not JSON at all
        lines.insert(pos % (len(lines) + 1), text.replace("\n", " ").replace("\r", " "))
    fates: dict[int, bool | None] = {}
    for number, line in enumerate(lines, start=1):
        try:
            fates[number] = expected_fate(json.loads(line))
        except ValueError:
            fates[number] = None
    counted = sum(1 for line in lines if line.strip())
    path = write_tmp(".jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        check_load(path, counted, fates)
    finally:
        path.unlink()


def fuzz_json_list(rows: list[Any], broken: bool) -> None:
    text = json.dumps(rows)
    broken = broken and len(text) > 2
    if broken:
        text = text[:-1]
    path = write_tmp(".json", text.encode("utf-8", "surrogatepass"))
    try:
        fates = {i: expected_fate(r) for i, r in enumerate(rows, start=1)}
        check_load(path, 1 if broken else len(rows), {} if broken else fates)
    finally:
        path.unlink()


def fuzz_csv(header: list[str], cells: list[list[str]], delimiter: str) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter)
    writer.writerow(header)
    writer.writerows(cells)
    path = write_tmp(".tsv" if delimiter == "\t" else ".csv", buf.getvalue().encode("utf-8", "surrogatepass"))
    try:
        fates: dict[int, bool | None] = {}
        rows_in = sum(1 for c in cells if c != [])
        check_load(path, rows_in if all(c for c in cells) else None, fates)
    finally:
        path.unlink()


def fuzz_bytes(data: bytes, suffix: str) -> None:
    path = write_tmp(suffix, data)
    try:
        check_load(path, None, {})
    finally:
        path.unlink()


csv_cell = nasty_text.filter(lambda t: "\x00" not in t)

# ------------------------------------------------------------------ loader tests


@FUZZ
@given(
    st.lists(row, max_size=8),
    st.lists(st.booleans(), max_size=8),
    st.lists(st.tuples(st.integers(0, 20), st.text(max_size=20)), max_size=2),
)
def test_jsonl_loader(rows: list[Any], ascii_flags: list[bool], junk: list[tuple[int, str]]) -> None:
    fuzz_jsonl(rows, ascii_flags, junk)


@FUZZ
@given(st.lists(row, max_size=8), st.booleans())
def test_json_list_loader(rows: list[Any], broken: bool) -> None:
    fuzz_json_list(rows, broken)


@FUZZ
@given(
    st.lists(st.sampled_from(["text", "label", "id", "instruction", "output"]) | csv_cell, min_size=1, max_size=4),
    st.lists(st.lists(csv_cell | st.sampled_from(LABELS), max_size=5), max_size=8),
    st.sampled_from([",", "\t"]),
)
def test_csv_loader(header: list[str], cells: list[list[str]], delimiter: str) -> None:
    fuzz_csv(header, cells, delimiter)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]))
def test_any_bytes(data: bytes, suffix: str) -> None:
    fuzz_bytes(data, suffix)


def test_pathological_rows_are_bad_rows_not_crashes(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    parts = json.dumps(
        {"messages": [{"role": "user", "content": [{"text": 5}]}, {"role": "assistant", "content": "x"}]}
    )
    path.write_text(
        "\n".join(
            [
                deep,
                json.dumps({"text": "a\u2028b", "label": "timer"}, ensure_ascii=False),
                '{"text": "\\ud800", "label": "timer"}',
                parts,
            ]
        )
    )
    result = load_file(path, TASK, on_bad_rows="skip")
    assert result.rows_read == 4
    assert [ex.line for ex in result.examples] == [2]
    assert result.examples[0].text == "a\u2028b"
    assert {b.line: b.reason for b in result.bad_rows} == {1: "malformed", 3: "malformed", 4: "label_not_in_set"}


# ------------------------------------------------------------------ server request bodies


@pytest.fixture(scope="module")
def client(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from taskling.serve.server import ServeSettings, build_engine, create_app

    db = tmp_path_factory.mktemp("fuzzlog") / "log.db"
    settings_ = ServeSettings(log_url=f"sqlite:///{db}", threads=1, dtype="float32", max_text_chars=2000)
    engine = build_engine(trained_run, settings_)
    with TestClient(create_app(engine)) as c:
        c.acknowledged = 0  # type: ignore[attr-defined]
        c.db_url = f"sqlite:///{db}"  # type: ignore[attr-defined]
        yield c


short = nasty_text.map(lambda t: t[:50])
classify_body = st.one_of(
    st.fixed_dictionaries({}, optional={"text": short | json_value, "texts": st.lists(short, max_size=3) | json_value}),
    st.fixed_dictionaries({"text": short}, optional={"adapter": st.sampled_from(["default", "../x", "nope"]) | short}),
    json_value,
)
chat_body = st.one_of(
    st.fixed_dictionaries(
        {"messages": st.lists(turn, max_size=3) | json_value},
        optional={"model": json_value, "stream": json_value, "n": json_value},
    ),
    json_value,
)


def check_response(client: Any, endpoint: str, body: bytes) -> None:
    resp = client.post(endpoint, content=body, headers={"content-type": "application/json"})
    assert resp.status_code in (200, 400, 404, 413, 422), (resp.status_code, resp.text[:300])
    if resp.headers["content-type"].startswith("text/event-stream"):  # `stream: true`: one chunk, then [DONE]
        events = [e for e in resp.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        payload = json.loads(events[0].removeprefix("data: "))
        payload["choices"][0]["message"] = payload["choices"][0]["delta"]
    else:
        payload = resp.json()
    if resp.status_code != 200:
        return
    if endpoint == "/v1/classify":
        assert payload["results"] and all(r["label"] in LABELS for r in payload["results"])
        client.acknowledged += len(payload["results"])
    else:
        assert payload["choices"][0]["message"]["content"] in LABELS
        client.acknowledged += 1


@settings(FUZZ, max_examples=n(60))
@given(classify_body)
def test_classify_bodies(client: Any, body: Any) -> None:
    check_response(client, "/v1/classify", json.dumps(body).encode())


@settings(FUZZ, max_examples=n(60))
@given(chat_body)
def test_chat_bodies(client: Any, body: Any) -> None:
    check_response(client, "/v1/chat/completions", json.dumps(body).encode())


@settings(FUZZ, max_examples=n(40))
@given(st.binary(max_size=100))
def test_raw_bodies(client: Any, body: bytes) -> None:
    check_response(client, "/v1/classify", body)


def test_no_acknowledged_prediction_is_lost(client: Any) -> None:
    from taskling.serve.predlog import count_rows

    for body in ({"text": "a"}, {"texts": ["b", "c"]}, {"text": "\ud800"}):
        check_response(client, "/v1/classify", json.dumps(body).encode())
    assert client.acknowledged >= 3
    assert count_rows(client.db_url) == client.acknowledged


def test_non_finite_numbers_are_a_422_not_a_500(client: Any) -> None:
    for body in ('{"text": Infinity}', '{"texts": [NaN]}', '{"text": "a", "adapter": -Infinity}'):
        resp = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == 422
