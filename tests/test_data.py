"""Every input format loads to the same examples; every bad row is named or counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskling.data.load import content_hash, load_file, stratified_split
from taskling.errors import DataError
from taskling.task import Task

TASK = Task(labels=("billing", "bug", "other"))
PAIRS = [("my card was charged twice", "billing"), ("the app crashes on start", "bug")]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[object]) -> Path:
    return write(path, [json.dumps(r) for r in rows])


@pytest.mark.parametrize(
    "name,rows",
    [
        ("text_label.jsonl", [{"text": t, "label": lab} for t, lab in PAIRS]),
        ("instruction.jsonl", [{"instruction": t, "response": lab} for t, lab in PAIRS]),
        ("alpaca.jsonl", [{"instruction": "Classify.", "input": t, "output": lab} for t, lab in PAIRS]),
        (
            "openai.jsonl",
            [
                {
                    "messages": [
                        {"role": "system", "content": "You route tickets."},
                        {"role": "user", "content": t},
                        {"role": "assistant", "content": lab},
                    ]
                }
                for t, lab in PAIRS
            ],
        ),
        (
            "sharegpt.jsonl",
            [{"conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": lab}]} for t, lab in PAIRS],
        ),
    ],
)
def test_every_jsonl_format_gives_the_same_examples(tmp_path: Path, name: str, rows: list[object]) -> None:
    result = load_file(jsonl(tmp_path / name, rows), TASK)
    assert [(ex.text, ex.label) for ex in result.examples] == PAIRS
    assert [ex.line for ex in result.examples] == [1, 2]
    assert result.rows_read == 2 and not result.bad_rows


def test_alpaca_json_list_and_empty_input_uses_instruction(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "the app crashes on start", "input": "", "output": "bug"}]))
    (ex,) = load_file(path, TASK).examples
    assert (ex.text, ex.label) == ("the app crashes on start", "bug")


def test_csv_with_custom_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", ["message,category", '"my card was charged twice, again",billing', "hi,other"])
    result = load_file(path, TASK, text_field="message", label_field="category")
    assert [(ex.text, ex.label, ex.line) for ex in result.examples] == [
        ("my card was charged twice, again", "billing", 2),
        ("hi", "other", 3),
    ]


BAD_ROWS = {
    "malformed": "{not json",
    "malformed_array": "[1, 2]",
    "empty_text": json.dumps({"text": "   ", "label": "bug"}),
    "empty_label": json.dumps({"text": "hello", "label": ""}),
    "label_not_in_set": json.dumps({"text": "hello", "label": "Billing"}),
    "unknown_format": json.dumps({"prompt": "hello", "completion": "bug"}),
    "chat_without_answer": json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_stops_with_file_line_and_fix(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path / "d.jsonl", [json.dumps({"text": "fine", "label": "bug"}), BAD_ROWS[kind]])
    with pytest.raises(DataError) as info:
        load_file(path, TASK)
    err = info.value
    assert err.path == str(path) and err.line == 2
    assert f"{path}:2" in str(err) and err.fix


def test_label_typo_suggests_the_close_label(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [json.dumps({"text": "x", "label": "biling"})])
    with pytest.raises(DataError, match="did you mean 'billing'"):
        load_file(path, TASK)


def test_skip_mode_counts_every_bad_row_by_reason(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "fine", "label": "bug"}), *BAD_ROWS.values()]
    result = load_file(write(tmp_path / "d.jsonl", lines), TASK, on_bad_rows="skip")
    assert len(result.examples) == 1
    assert result.rows_read == len(lines) == len(result.examples) + len(result.bad_rows)
    assert result.skipped_by_reason == {
        "malformed": 2,
        "empty_text": 1,
        "empty_label": 1,
        "label_not_in_set": 1,
        "unknown_format": 1,
        "missing_field": 1,
    }
    assert sorted(b.line for b in result.bad_rows) == list(range(2, len(lines) + 1))


def test_non_utf8_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "caf\u00e9", "label": "bug"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_file(path, TASK)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_file(tmp_path / "nope.jsonl", TASK)


def test_stratified_split_keeps_every_label_and_is_seeded(tmp_path: Path) -> None:
    rows = [{"text": f"bill {i}", "label": "billing"} for i in range(20)]
    rows += [{"text": f"bug {i}", "label": "bug"} for i in range(3)]
    examples = load_file(jsonl(tmp_path / "d.jsonl", rows), TASK).examples
    train, held = stratified_split(examples, 0.2, seed=1)
    assert sorted(ex.label for ex in held) == ["billing"] * 4 + ["bug"]
    assert len(train) + len(held) == len(examples)
    assert not {ex.text for ex in train} & {ex.text for ex in held}
    again_train, again_held = stratified_split(examples, 0.2, seed=1)
    assert content_hash(again_held) == content_hash(held) and content_hash(again_train) == content_hash(train)
    _, other_held = stratified_split(examples, 0.2, seed=2)
    assert content_hash(other_held) != content_hash(held)
