"""Files on disk, written so a crash never leaves half of one, and JSONL read with line numbers.

Every file taskling writes goes through `atomic_write` (temp file beside the target, fsync,
rename, fsync of the folder): a reader sees the old file or the new one, never a torn one.
Every JSONL file taskling reads goes through `read_jsonl`, so a bad line is reported with
its file and line number.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from taskling.errors import DataError


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too (POSIX only).
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on a clean exit fsync it and rename it over `path`.

    On an exception the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Per process and thread: two threads writing one path must not share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    binary = "b" in mode
    try:
        with open(tmp, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path, encoding=encoding) as fh:
        fh.write(text)


def write_json(path: str | Path, value: Any) -> None:
    """Write `value` as indented JSON, atomically."""
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_write(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a malformed one is a DataError naming the file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path, fix="save it as UTF-8"
        ) from exc
    except json.JSONDecodeError as exc:
        raise DataError(
            f"not valid JSON ({exc.msg})", path=path, line=exc.lineno, fix="fix that line, or rewrite the file"
        ) from exc


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line of a JSONL file: its parsed value, or why it could not be parsed."""

    line: int
    raw: str  # the line's text; bytes that are not UTF-8 show as U+FFFD
    value: Any = None
    reason: str = ""  # "" when the line parsed; else "not_utf8" or "malformed"
    detail: str = ""  # what is wrong with it, for an error or a bad-row report


_FIXES = {
    "not_utf8": "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove that line",
    "malformed": "each line must be one JSON object; fix or remove that line",
}


def scan_jsonl(path: str | Path) -> Iterator[JsonLine]:
    """Every non-blank line of a JSONL file, parsed or not: for readers that count bad rows
    instead of stopping at the first (`iter_jsonl` stops).

    Lines end at "\n" only: JSON strings may hold U+2028, \x1c and friends unescaped.
    """
    with Path(path).open("rb") as fh:
        for number, data in enumerate(fh, start=1):
            raw = data.decode("utf-8", "replace")
            if not raw.strip():
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                detail = f"not UTF-8 text (byte {data[err.start]:#04x} at column {err.start + 1})"
                yield JsonLine(number, raw, reason="not_utf8", detail=detail)
                continue
            try:
                yield JsonLine(number, raw, json.loads(text))
            except json.JSONDecodeError as err:
                yield JsonLine(
                    number, raw, reason="malformed", detail=f"not valid JSON ({err.msg} at column {err.colno})"
                )
            except RecursionError:
                yield JsonLine(number, raw, reason="malformed", detail="JSON nested too deeply")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed value) for each non-blank line of a JSONL file.

    A line that is not UTF-8 or not JSON raises DataError naming the file and the line.
    """
    for parsed in scan_jsonl(path):
        if parsed.reason:
            raise DataError(parsed.detail, path=path, line=parsed.line, fix=_FIXES[parsed.reason])
        yield parsed.line, parsed.value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file of objects; a row that is not an object is a DataError with its line."""
    rows = []
    for number, value in iter_jsonl(path):
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {type(value).__name__}", path=path, line=number)
        rows.append(value)
    return rows
