"""Bytes that are not UTF-8, lone surrogates and odd line breaks: a clear error naming the line, or a
counted bad row; never a UnicodeDecodeError, and never a wrong line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskling.data.distill import DistillConfig, distill, load_task_file, read_logs
from taskling.data.load import load_file
from taskling.errors import ConfigError, DataError
from taskling.extract.schema import ExtractionTask, load_records
from taskling.task import Task

TASK = Task(labels=("billing", "bug"))
GOOD = json.dumps({"text": "refund me", "label": "billing"}).encode()
LATIN1 = json.dumps({"text": "caf\u00e9 broke", "label": "bug"}, ensure_ascii=False).encode("latin-1")


def lines(path: Path, *rows: bytes) -> Path:
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_jsonl_bad_bytes_name_the_line_or_are_counted(tmp_path: Path) -> None:
    path = lines(tmp_path / "d.jsonl", GOOD, LATIN1, GOOD)
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_file(path, TASK)
    skipped = load_file(path, TASK, on_bad_rows="skip")
    assert [ex.line for ex in skipped.examples] == [1, 3]
    assert [(b.line, b.reason) for b in skipped.bad_rows] == [(2, "not_utf8")]


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("d.csv", b"text,label\nrefund me,billing\ncaf\xe9 broke,bug\n", 3),
        ("d.json", b'[\n {"instruction": "x", "input": "ok", "output": "bug"},\n {"instruction": "caf\xe9"}\n]', 3),
    ],
)
def test_csv_and_json_list_bad_bytes_name_the_line(tmp_path: Path, name: str, content: bytes, line: int) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=rf"{name}:{line}: not UTF-8") as err:
            load_file(path, TASK, on_bad_rows=mode)
        assert err.value.fix and "UTF-8" in err.value.fix


def test_json_strings_with_line_separators_keep_their_line_numbers(tmp_path: Path) -> None:
    rows = [{"text": "a\u2028b\x1cc\u0085d", "label": "bug"}, {"text": "second", "label": "billing"}]
    path = lines(tmp_path / "logs.jsonl", *(json.dumps(r, ensure_ascii=False).encode() for r in rows))
    logs, bad = read_logs([path])
    assert bad == [] and [(r.text, r.line) for r in logs] == [(rows[0]["text"], 1), ("second", 2)]


def test_distill_rejects_undecodable_and_surrogate_rows_with_their_line(tmp_path: Path) -> None:
    surrogate = b'{"text": "broken \\ud800 escape", "label": "bug"}'
    meta_surrogate = b'{"text": "fine text here", "label": "bug", "metadata": "\\udfff"}'
    logs = lines(tmp_path / "logs.jsonl", GOOD, LATIN1, surrogate, meta_surrogate, b"{not json")
    task_file = tmp_path / "task.yaml"
    task_file.write_text("labels: [billing, bug]\n")
    config = DistillConfig(clean={"label_errors": False})
    result = distill([logs], load_task_file(task_file), tmp_path / "out", config)
    assert (result.rows_read, result.train, result.rejected) == (5, 1, 4)
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (2, "not_utf8"),
        (3, "malformed"),
        (4, "malformed"),
        (5, "malformed"),
    ]
    assert "byte 0xe9" in rejected[0]["detail"] and "surrogate" in rejected[1]["detail"]


def test_record_files_name_the_line_and_keep_line_numbers(tmp_path: Path) -> None:
    task = ExtractionTask.model_validate({"fields": [{"name": "city", "type": "string", "required": False}]})
    row = {"text": "fly to\u2028paris", "record": {"city": "paris"}}
    path = lines(
        tmp_path / "r.jsonl",
        json.dumps(row, ensure_ascii=False).encode(),
        b'{"text": "caf\xe9", "record": {"city": null}}',
        b'{"text": "lone \\ud800", "record": {"city": null}}',
        b'{"record": {"city": null}}',
    )
    with pytest.raises(DataError, match=r"r\.jsonl:2: not UTF-8"):
        load_records([path], task)
    loaded = load_records([path], task, on_bad_rows="skip")
    assert [(ex.text, ex.line) for ex in loaded.examples] == [(row["text"], 1)]
    assert [(b.line, b.reason) for b in loaded.bad_rows] == [
        (2, "not UTF-8"),
        (3, "not valid Unicode"),
        (4, "missing field"),
    ]


def test_config_task_and_labels_files_that_are_not_utf8(tmp_path: Path) -> None:
    from taskling.config import load_config

    config = tmp_path / "c.yaml"
    config.write_bytes(b"task:\n  name: caf\xe9\n  labels: [a, b]\ndata:\n  train: [x.jsonl]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(config)
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_task_file(config)
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"billing\ncaf\xe9\n")
    with pytest.raises(ConfigError, match=r"labels\.txt:2 is not UTF-8"):
        Task.model_validate({"labels_file": str(labels)})
