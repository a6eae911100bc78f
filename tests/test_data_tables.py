"""Parquet files and Hugging Face `datasets` load like JSONL: same examples, rows counted."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taskling.config import build_config, resolve_paths
from taskling.data.columnar import parse_hub_id
from taskling.data.load import bad_rows_report, load_file, load_files
from taskling.errors import DataError
from taskling.task import Task

TASK = Task(labels=("billing", "bug", "other"))
PAIRS = [("my card was charged twice", "billing"), ("the app crashes on start", "bug")]
BAD = ("please refund me", "refunds")  # a label outside the set: row 3
FIXTURES = Path(__file__).parent / "fixtures"


def rows(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"text": t, "label": lab} for t, lab in pairs]


def class_label_dataset(pairs: list[tuple[str, str]]) -> datasets.Dataset:
    """Labels stored as ClassLabel integers, as most Hub classification datasets are."""
    names = ["billing", "bug", "refunds"]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {"text": [t for t, _ in pairs], "label": [names.index(lab) for _, lab in pairs]}, features=features
    )


def parquet_file(tmp: Path, pairs: list[tuple[str, str]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows(pairs)), tmp / "d.parquet")
    return tmp / "d.parquet"


def parquet_chat(tmp: Path, pairs: list[tuple[str, str]]) -> Path:
    chats = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": lab}]} for t, lab in pairs]
    pq.write_table(pa.Table.from_pylist(chats), tmp / "chat.pq")
    return tmp / "chat.pq"


def parquet_from_datasets(tmp: Path, pairs: list[tuple[str, str]]) -> Path:
    class_label_dataset(pairs).to_parquet(str(tmp / "hub.parquet"))
    return tmp / "hub.parquet"


def saved_dataset(tmp: Path, pairs: list[tuple[str, str]]) -> Path:
    class_label_dataset(pairs).save_to_disk(str(tmp / "ds"))
    return tmp / "ds"


def saved_dict_one_split(tmp: Path, pairs: list[tuple[str, str]]) -> Path:
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(pairs))}).save_to_disk(str(tmp / "dd"))
    return tmp / "dd"


def saved_dict_split_folder(tmp: Path, pairs: list[tuple[str, str]]) -> Path:
    ds = datasets.Dataset.from_list(rows(pairs))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp / "dd2"))
    return tmp / "dd2" / "test"


WRITERS: dict[str, Callable[[Path, list[tuple[str, str]]], Path]] = {
    "parquet": parquet_file,
    "parquet_chat_rows": parquet_chat,
    "parquet_written_by_datasets": parquet_from_datasets,
    "save_to_disk": saved_dataset,
    "datasetdict_one_split": saved_dict_one_split,
    "datasetdict_split_folder": saved_dict_split_folder,
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_table_source_gives_the_same_examples(tmp_path: Path, kind: str) -> None:
    result = load_file(WRITERS[kind](tmp_path, PAIRS), TASK)
    assert [(ex.text, ex.label) for ex in result.examples] == PAIRS
    assert [ex.line for ex in result.examples] == [1, 2]  # row numbers, from 1
    assert result.rows_read == 2 and not result.bad_rows


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_bad_row_is_named_by_row_or_counted(tmp_path: Path, kind: str) -> None:
    source = WRITERS[kind](tmp_path, [*PAIRS, BAD])
    with pytest.raises(DataError) as err:
        load_file(source, TASK)
    assert err.value.row == 3 and err.value.line is None
    assert f"{source}, row 3: label 'refunds' is not in the task's label set" in str(err.value)
    assert err.value.fix and "data.on_bad_rows=skip" in err.value.fix

    skipped = load_file(source, TASK, on_bad_rows="skip")
    assert [(ex.text, ex.label) for ex in skipped.examples] == PAIRS
    assert skipped.rows_read == 3
    assert bad_rows_report(skipped.bad_rows) == [
        {
            "path": str(source),
            "row": 3,
            "reason": "label_not_in_set",
            "detail": "label 'refunds' is not in the task's label set",
        }
    ]
    assert str(skipped.bad_rows[0]).startswith(f"{source}, row 3: label_not_in_set")


def test_empty_cells_and_missing_columns_are_bad_rows(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([{"text": "ok then", "label": "bug"}, {"text": None, "label": "bug"}])
    pq.write_table(table, tmp_path / "nulls.parquet")
    result = load_file(tmp_path / "nulls.parquet", TASK, on_bad_rows="skip")
    assert [(b.line, b.reason, b.unit) for b in result.bad_rows] == [(2, "empty_text", "row")]

    pq.write_table(pa.Table.from_pylist([{"body": "x", "label": "bug"}]), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols.parquet, row 1: keys \['body', 'label'\] match no known format"):
        load_file(tmp_path / "cols.parquet", TASK)
    # ... and data.text_field names the column.
    assert load_file(tmp_path / "cols.parquet", TASK, text_field="body").examples[0].text == "x"


def test_format_forces_the_reader_whatever_the_extension(tmp_path: Path) -> None:
    path = parquet_file(tmp_path, PAIRS).rename(tmp_path / "export.bin")
    with pytest.raises(DataError, match=r"export\.bin:1"):  # read as JSONL: not UTF-8
        load_file(path, TASK)
    assert [ex.text for ex in load_file(path, TASK, fmt="parquet").examples] == [t for t, _ in PAIRS]
    # A forced row shape still reads a .parquet file as a table.
    chat = parquet_chat(tmp_path, PAIRS)
    assert [ex.label for ex in load_file(chat, TASK, fmt="chat").examples] == ["billing", "bug"]


def test_unreadable_sources_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_text("not parquet at all", encoding="utf-8")
    with pytest.raises(DataError, match="not a readable Parquet file") as err:
        load_file(tmp_path / "broken.parquet", TASK)
    assert err.value.path == str(tmp_path / "broken.parquet")

    ds = datasets.Dataset.from_list(rows(PAIRS))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]: which one\?") as err:
        load_file(tmp_path / "dd", TASK)
    assert err.value.fix and str(tmp_path / "dd" / "train") in err.value.fix

    with pytest.raises(DataError, match="no such dataset folder"):
        load_file(tmp_path / "nothing", TASK, fmt="datasets")


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("hf:acme/tickets", ("acme/tickets", None, "train")),
        ("hf:acme/tickets:test", ("acme/tickets", None, "test")),
        ("hf:clinc/clinc_oos/plus:validation", ("clinc/clinc_oos", "plus", "validation")),
        ("hf:imdb", ("imdb", None, "train")),
    ],
)
def test_hub_ids_parse(spec: str, expected: tuple[str, str | None, str]) -> None:
    assert parse_hub_id(spec) == expected


def test_hub_dataset_goes_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(repo: str, config: str | None, *, split: str) -> datasets.Dataset:
        calls.append((repo, config, split))
        return class_label_dataset([*PAIRS, BAD])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_file("hf:acme/tickets/v2:test", TASK, on_bad_rows="skip")
    assert calls == [("acme/tickets", "v2", "test")]
    assert [(ex.text, ex.label, ex.source) for ex in result.examples] == [
        (t, lab, "hf:acme/tickets/v2:test") for t, lab in PAIRS
    ]
    assert bad_rows_report(result.bad_rows)[0]["row"] == 3


def test_hub_dataset_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'acme/tickets' on the Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load Hub dataset 'acme/tickets'.*offline mode") as err:
        load_file("hf:acme/tickets", TASK)
    assert err.value.fix and "save_to_disk" in err.value.fix


def test_config_keeps_hub_ids_and_accepts_table_formats(tmp_path: Path) -> None:
    raw = {"data": {"train": ["hf:acme/tickets:train", "local.parquet"], "format": "parquet"}}
    resolved = resolve_paths(raw, tmp_path)
    assert resolved["data"]["train"] == ["hf:acme/tickets:train", str(tmp_path / "local.parquet")]
    config = build_config({**resolved, "task": {"labels": ["a", "b"]}})
    assert config.data.format == "parquet"


def test_train_on_parquet_skips_and_records_bad_rows(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    from taskling.rundir import RunDir
    from taskling.train.sft import train

    source = [json.loads(line) for line in (FIXTURES / "clinc8_train.jsonl").read_text().splitlines()][:40]
    table = [*source[:5], {"text": "order me a pizza", "label": "pizza"}, *source[5:]]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "train.parquet")
    tiny_config["data"] = {"train": [str(tmp_path / "train.parquet")], "on_bad_rows": "skip"}
    tiny_config["train"]["max_steps"] = 2
    train(build_config(tiny_config))
    records = [json.loads(line) for line in RunDir(tiny_config["run_dir"]).bad_rows.read_text().splitlines()]
    assert records == [
        {
            "path": str(tmp_path / "train.parquet"),
            "row": 6,
            "reason": "label_not_in_set",
            "detail": "label 'pizza' is not in the task's label set",
        }
    ]


def test_gold_from_a_saved_dataset_scores_like_the_jsonl(trained_run: Path, tmp_path: Path) -> None:
    from taskling.evaluate.metrics import evaluate

    gold = FIXTURES / "clinc8_gold.jsonl"
    datasets.Dataset.from_json(str(gold)).save_to_disk(str(tmp_path / "gold"))
    from_jsonl = evaluate(trained_run, gold, out_dir=tmp_path / "a")
    from_dataset = evaluate(trained_run, tmp_path / "gold", out_dir=tmp_path / "b")
    assert from_dataset.metrics.to_dict() == from_jsonl.metrics.to_dict()
    assert load_files([tmp_path / "gold"]).rows_read == 80


def test_data_report_reads_a_saved_dataset(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from taskling.cli import app

    source = saved_dataset(tmp_path, [*PAIRS, BAD])
    (tmp_path / "task.yaml").write_text("labels: [billing, bug, other]\n")
    args = ["data", "report", str(source), "--task", str(tmp_path / "task.yaml"), "--json", str(tmp_path / "r.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rows_read"] == 3
