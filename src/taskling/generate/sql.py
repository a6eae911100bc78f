"""SQL execution checks on a SQLite database that no query can change or hang.

    db = SqlDatabase("shop.sqlite", timeout_s=2.0)
    db.run("SELECT name FROM customers")            # SqlResult(rows=[...], error=None)
    db.execution_match(gold_sql, predicted_sql)     # same result rows as the gold query?
    db.valid(predicted_sql)                          # one read-only statement that compiles

Three locks keep the file's bytes as they were: the connection is opened read-only
(`file:...?mode=ro`), `PRAGMA query_only=ON`, and an authorizer that allows only reading
(SELECT, reading columns, functions, recursive CTEs) and denies everything else: writes, DDL,
ATTACH, transactions, every PRAGMA. A progress handler stops any query running past its
timeout, so a `WITH RECURSIVE` that never ends comes back as an error after `timeout_s`.
`stats` counts queries, errors, refused statements, timeouts and queries that ran on past
their timeout (`hung`; bench/generate.py reports "queries that wrote: 0, hung: 0").
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskling.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
MAX_ROWS = 10_000
# A query still running this long after its timeout was not stopped: it "hung".
HANG_SLACK_S = 1.0
# Virtual-machine steps between timeout checks: a few microseconds of work each.
_PROGRESS_STEPS = 1_000
_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_QUERY_WORDS = {"select", "with", "values"}
_NOT_A_QUERY = "not authorized: only queries (SELECT, WITH, VALUES) run"
_FIX_OPEN = "pass the path of an existing, readable SQLite database file (.sqlite / .db)"


@dataclass(frozen=True)
class SqlResult:
    """What one query returned: `rows`, or an `error` (refused, timed out, or failed)."""

    rows: list[tuple[Any, ...]] | None
    error: str | None = None
    refused: bool = False  # the authorizer denied a write, DDL, ATTACH or PRAGMA
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SqlStats:
    queries: int = 0
    errors: int = 0
    refused: int = 0
    timed_out: int = 0
    hung: int = 0  # ran past timeout + HANG_SLACK_S (the progress handler failed to stop it)
    slowest_s: float = 0.0
    by_error: Counter[str] = field(default_factory=Counter)


def _authorize(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def _strip_literals(sql: str) -> str:
    """`sql` with its string literals, quoted names and comments blanked out."""
    return re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", " ", sql, flags=re.S)


def is_query(sql: str) -> bool:
    """Whether `sql` starts like a query (SELECT, WITH or VALUES), not a command such as VACUUM."""
    words = _strip_literals(sql).replace("(", " ").split()
    return bool(words) and words[0].lower() in _QUERY_WORDS


def has_order_by(sql: str) -> bool:
    """Whether the outermost query sorts its rows (an ORDER BY outside every parenthesis)."""
    text = _strip_literals(sql)
    depth, outer = 0, []
    for char in text:
        depth += char == "("
        outer.append(char if depth == 0 else " ")
        depth -= char == ")"
    return re.search(r"\border\s+by\b", "".join(outer), re.I) is not None


def _comparable(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    # AVG and SUM of floats differ in the last digits with the order rows are summed in.
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


class SqlDatabase:
    """A strictly read-only SQLite connection with a per-query timeout."""

    def __init__(self, path: str | Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.stats = SqlStats()
        self._lock = threading.Lock()
        self._deadline = float("inf")
        self._gold: dict[str, SqlResult] = {}
        self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise DataError("SQL database not found", path=self.path, fix=_FIX_OPEN)
        if not self.path.is_file():
            raise DataError("SQL database is not a file", path=self.path, fix=_FIX_OPEN)
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as err:
            raise DataError(
                f"cannot open as a read-only SQLite database ({err})", path=self.path, fix=_FIX_OPEN
            ) from err
        conn.set_authorizer(_authorize)
        conn.set_progress_handler(self._past_deadline, _PROGRESS_STEPS)
        return conn

    def _past_deadline(self) -> int:
        return int(time.monotonic() > self._deadline)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SqlDatabase:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def run(self, sql: str, *, timeout_s: float | None = None, max_rows: int = MAX_ROWS) -> SqlResult:
        """Run one statement; its rows, or the error (refused, timed out, failed, too many rows)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        if not is_query(sql):
            result = SqlResult(None, _NOT_A_QUERY, refused=True)
            self._count(result)
            return result
        with self._lock:
            start = time.monotonic()
            self._deadline = start + limit
            try:
                cursor = self._conn.execute(sql)
                rows = cursor.fetchmany(max_rows + 1)
                cursor.close()
                result = (
                    SqlResult(rows, seconds=time.monotonic() - start)
                    if len(rows) <= max_rows
                    else SqlResult(None, f"more than {max_rows} rows", seconds=time.monotonic() - start)
                )
            except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as err:
                result = self._failure(err, start, limit)
            finally:
                self._deadline = float("inf")
        self._count(result)
        self.stats.hung += result.seconds > limit + HANG_SLACK_S
        return result

    def _failure(self, err: Exception, start: float, limit: float) -> SqlResult:
        seconds = time.monotonic() - start
        text = str(err)
        timed_out = text == "interrupted" and seconds >= limit
        if timed_out:
            text = f"timed out after {limit:g} s"
        return SqlResult(
            None,
            text,
            refused="not authorized" in text or "authorization denied" in text,
            timed_out=timed_out,
            seconds=seconds,
        )

    def _count(self, result: SqlResult) -> None:
        s = self.stats
        s.queries += 1
        s.slowest_s = max(s.slowest_s, result.seconds)
        if result.error is not None:
            s.errors += 1
            s.refused += result.refused
            s.timed_out += result.timed_out
            s.by_error["refused" if result.refused else "timed out" if result.timed_out else "error"] += 1

    def valid(self, sql: str) -> bool:
        """Whether `sql` is one statement that compiles and only reads (it is not run)."""
        if not is_query(sql):
            return False
        with self._lock:
            try:
                # EXPLAIN compiles the statement (the authorizer runs at compile time) without running it.
                self._conn.execute("EXPLAIN " + sql).fetchall()
            except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
                return False
        return True

    def gold_rows(self, gold_sql: str, *, timeout_s: float | None = None) -> list[tuple[Any, ...]]:
        """The gold query's rows (cached); a gold query that fails is a DataError."""
        if gold_sql not in self._gold:
            self._gold[gold_sql] = self.run(gold_sql, timeout_s=timeout_s)
        result = self._gold[gold_sql]
        if result.rows is None:
            raise DataError(
                f"the gold query fails on this database ({result.error}): {gold_sql}",
                path=self.path,
                fix="correct the gold SQL (run it with sqlite3 on this file) or drop the row",
            )
        return result.rows

    def execution_match(self, gold_sql: str, predicted_sql: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
        """Whether `predicted_sql` returns the gold query's rows.

        Rows are compared as multisets, or in order when the gold query has an outer ORDER BY;
        column names do not matter, floats are compared to 6 decimals. A predicted query that
        fails, is refused or times out does not match.
        """
        gold = _comparable(self.gold_rows(gold_sql, timeout_s=timeout_s))
        got = self.run(predicted_sql, timeout_s=timeout_s)
        if got.rows is None:
            return False
        predicted = _comparable(got.rows)
        if has_order_by(gold_sql):
            return predicted == gold
        return Counter(predicted) == Counter(gold)
