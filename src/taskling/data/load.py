"""Load examples from the formats people actually have, and account for every row.

Formats (detected per file, or forced with `DataConfig.format`):

- `{"text": ..., "label": ...}` JSONL (field names configurable)
- `{"instruction": ..., "response": ...}` JSONL: the instruction is the text
- Alpaca `{"instruction", "input", "output"}` as JSONL or a JSON list: the input is the
  text (the instruction when the input is empty)
- chat `{"messages": [{"role", "content"}, ...]}` (OpenAI) or
  `{"conversations": [{"from", "value"}, ...]}` (ShareGPT): the last user turn is the
  text, the last assistant turn the label
- CSV with a header row naming the text and label columns
- tables (`columnar.py`): Parquet files, `datasets` folders from `save_to_disk`, and
  Hub datasets (`hf:ORG/NAME:SPLIT`); each row is a record in any of the shapes above

A row that cannot be used is a `BadRow` with its file, line (row, for tables) and reason. With
`on_bad_rows="error"` the first one stops the load with a `DataError`; with `"skip"` it is
counted and reported. No row disappears without a trace.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskling.data.columnar import TABLE_FORMATS, iter_table, table_format
from taskling.errors import DataError
from taskling.io import scan_jsonl, write_jsonl
from taskling.task import Task

log = logging.getLogger(__name__)

FORMATS = ("auto", "text_label", "instruction", "alpaca", "chat", "csv", *TABLE_FORMATS)
_USER_ROLES = {"user", "human"}
_ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot"}


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    source: str = ""
    line: int = 0


@dataclass(frozen=True)
class BadRow:
    path: str
    line: int
    reason: str
    detail: str
    unit: str = "line"  # "row" for tables (Parquet, `datasets`): `line` holds the row number

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path}, row {self.line}"
        return f"{where}: {self.reason}: {self.detail}"


@dataclass
class LoadResult:
    examples: list[Example] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    rows_read: int = 0

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(b.reason for b in self.bad_rows))

    def extend(self, other: LoadResult) -> None:
        self.examples.extend(other.examples)
        self.bad_rows.extend(other.bad_rows)
        self.rows_read += other.rows_read


class _RowError(Exception):
    def __init__(self, reason: str, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.fix = reason, detail, fix


def _turns(row: dict[str, Any]) -> list[tuple[str, str]]:
    if "messages" in row:
        raw, role_key, text_key = row["messages"], "role", "content"
    else:
        raw, role_key, text_key = row["conversations"], "from", "value"
    if not isinstance(raw, list):
        raise _RowError("malformed", "messages must be a list", "write messages as a JSON list of turns")
    turns = []
    for turn in raw:
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise _RowError(
                "malformed",
                f"each turn needs '{role_key}' and '{text_key}'",
                f'write turns like {{"{role_key}": "user", "{text_key}": "..."}}',
            )
        turns.append((str(turn[role_key]).lower(), _as_text(turn[text_key])))
    return turns


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        return "".join(_as_text(p.get("text")) for p in value if isinstance(p, dict))
    if value is None:
        return ""
    return str(value)


def _detect(row: dict[str, Any], text_field: str, label_field: str) -> str:
    if "messages" in row or "conversations" in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "instruction" in row and "response" in row:
        return "instruction"
    if text_field in row and label_field in row:
        return "text_label"
    raise _RowError(
        "unknown_format",
        f"keys {sorted(map(str, row))} match no known format",  # a CSV row's extra cells sit under None
        f"use {{'{text_field}', '{label_field}'}}, {{'instruction', 'response'}}, "
        "{'instruction', 'input', 'output'} or {'messages': [...]}, "
        "or set data.text_field / data.label_field to your column names",
    )


def row_to_pair(row: Any, fmt: str, text_field: str = "text", label_field: str = "label") -> tuple[str, str]:
    """Extract (text, label) from one parsed row; raises `_RowError` on a bad row."""
    if not isinstance(row, dict):
        raise _RowError("malformed", f"expected a JSON object, got {type(row).__name__}", "write one object a line")
    if fmt in ("auto", "csv", *TABLE_FORMATS):
        fmt = _detect(row, text_field, label_field)
    if fmt == "text_label":
        missing = [k for k in (text_field, label_field) if k not in row]
        if missing:
            raise _RowError("missing_field", f"missing {missing}", f"add {missing} or set data.text_field/label_field")
        return _as_text(row[text_field]), _as_text(row[label_field])
    if fmt == "instruction":
        if "instruction" not in row or "response" not in row:
            raise _RowError("missing_field", "needs 'instruction' and 'response'", "add both keys")
        return _as_text(row["instruction"]), _as_text(row["response"])
    if fmt == "alpaca":
        if "output" not in row or "instruction" not in row:
            raise _RowError("missing_field", "needs 'instruction' and 'output'", "add both keys")
        text = _as_text(row.get("input")) or _as_text(row["instruction"])
        return text, _as_text(row["output"])
    if fmt == "chat":
        if "messages" not in row and "conversations" not in row:
            raise _RowError("missing_field", "needs 'messages'", 'add "messages": [...]')
        turns = _turns(row)
        users = [t for role, t in turns if role in _USER_ROLES]
        answers = [t for role, t in turns if role in _ASSISTANT_ROLES]
        if not users or not answers:
            raise _RowError(
                "missing_field", "needs a user turn and an assistant turn", "add the assistant's label as the last turn"
            )
        return users[-1], answers[-1]
    raise _RowError("unknown_format", f"unknown format {fmt!r}", f"use one of {FORMATS}")


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_pair(text: str, label: str, task: Task | None) -> tuple[str, str]:
    text, label = text.strip(), label.strip()
    if not is_unicode(text) or not is_unicode(label):
        raise _RowError("malformed", "an unpaired surrogate escape (not valid Unicode)", "fix the \\ud8xx escapes")
    if not text:
        raise _RowError("empty_text", "the text is empty", "remove the row or fill in the text")
    if not label:
        raise _RowError("empty_label", "the label is empty", "fill in the label")
    if task is not None and label not in task.label_index:
        close = difflib.get_close_matches(label, task.labels, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise _RowError(
            "label_not_in_set",
            f"label {label!r} is not in the task's label set",
            f"{hint}fix the label, add it to task.labels, or set data.on_bad_rows=skip",
        )
    return text, label


def _undecodable(path: Path, data: bytes, err: UnicodeDecodeError) -> DataError:
    line = data[: err.start].count(b"\n") + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return DataError(
        f"not UTF-8 text (byte {data[err.start]:#04x} at column {column})",
        path=path,
        line=line,
        fix="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or fix that line",
    )


def read_utf8(path: Path) -> str:
    """The whole file as text; bytes that are not UTF-8 raise a DataError naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _undecodable(path, data, err) from None


def _iter_rows(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed row); a row that fails to parse yields the exception."""
    suffix = path.suffix.lower()
    if fmt == "csv" or (fmt == "auto" and suffix in (".csv", ".tsv")):
        text = read_utf8(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        for row in reader:
            yield reader.line_num, row
        return
    text = read_utf8(path) if suffix == ".json" else ""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            yield err.lineno, _RowError("malformed", f"invalid JSON: {err.msg}", "fix the JSON syntax")
            return
        except RecursionError:
            yield 1, _RowError("malformed", "JSON nested too deeply", "flatten the rows")
            return
        for i, row in enumerate(rows, start=1):
            yield i, row  # a JSON list has no line per row: number rows from 1
        return
    for parsed in scan_jsonl(path):
        if parsed.reason == "not_utf8":
            yield parsed.line, _RowError(parsed.reason, parsed.detail, "re-save the file as UTF-8, or fix that line")
        elif parsed.reason:
            yield parsed.line, _RowError(parsed.reason, parsed.detail, "write one JSON object a line")
        else:
            yield parsed.line, parsed.value


def load_file(
    path: str | Path,
    task: Task | None = None,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    label_field: str = "label",
    on_bad_rows: str = "error",
) -> LoadResult:
    """Load one file, `datasets` folder or `hf:` Hub dataset. Bad rows raise
    (`on_bad_rows="error"`) or are counted (`"skip"`)."""
    path = Path(path)
    table = table_format(path, fmt)
    if table is None and not path.is_file():
        raise DataError("file does not exist", path=path, fix="check the path in data.train / data.validation")
    unit = "line" if table is None else "row"
    rows = _iter_rows(path, fmt) if table is None else iter_table(path, table)
    result = LoadResult()
    try:
        for line, row in rows:
            result.rows_read += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                text, label = _check_pair(*row_to_pair(row, fmt, text_field, label_field), task)
            except _RowError as err:
                if on_bad_rows == "error":
                    if table is not None:
                        raise DataError(err.detail, path=path, row=line, fix=err.fix) from None
                    raise DataError(err.detail, path=path, line=line, fix=err.fix) from None
                result.bad_rows.append(BadRow(str(path), line, err.reason, err.detail, unit))
                continue
            result.examples.append(Example(text, label, str(path), line))
    except csv.Error as err:
        raise DataError(f"CSV error: {err}", path=path, fix="check quoting in the CSV file") from None
    if result.bad_rows:
        log.warning("%s: skipped %d bad rows %s", path, len(result.bad_rows), result.skipped_by_reason)
    return result


def load_files(paths: Iterable[str | Path], task: Task | None = None, **kwargs: Any) -> LoadResult:
    total = LoadResult()
    for path in paths:
        total.extend(load_file(path, task, **kwargs))
    return total


def stratified_split(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off `fraction` of each label (at least one row of any label with 2+ rows)."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex.label].append(ex)
    rng = random.Random(seed)
    kept: list[Example] = []
    held: list[Example] = []
    for label in sorted(by_label):
        rows = list(by_label[label])
        rng.shuffle(rows)
        n = round(len(rows) * fraction)
        if fraction > 0 and n == 0 and len(rows) >= 2:
            n = 1
        held.extend(rows[:n])
        kept.extend(rows[n:])
    rng.shuffle(kept)
    return kept, held


def label_counts(examples: Iterable[Example]) -> dict[str, int]:
    return dict(sorted(Counter(ex.label for ex in examples).items()))


def write_examples(path: str | Path, examples: Iterable[Example]) -> None:
    write_jsonl(path, ({"text": ex.text, "label": ex.label} for ex in examples))


def content_hash(examples: Iterable[Example]) -> str:
    """sha256 over the (text, label) pairs in order: identifies a dataset by content."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.text, ex.label], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def bad_rows_report(bad_rows: Sequence[BadRow]) -> list[dict[str, Any]]:
    """bad_rows.jsonl records: {path, line, reason, detail}; tables name the `row` instead."""
    return [{"path": b.path, b.unit: b.line, "reason": b.reason, "detail": b.detail} for b in bad_rows]
