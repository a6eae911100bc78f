"""SQL execution checks: read-only, no query hangs, results compared like the gold query asks."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from taskling.errors import DataError
from taskling.generate.sql import SqlDatabase, has_order_by, is_query

RECURSIVE_FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
WRITES = [
    "INSERT INTO item VALUES (9, 'nine', 9.0)",
    "UPDATE item SET price = 0",
    "DELETE FROM item",
    "DROP TABLE item",
    "CREATE TABLE t (a)",
    "CREATE TEMP TABLE t (a)",
    "ALTER TABLE item ADD COLUMN c",
    "ATTACH DATABASE 'other.sqlite' AS other",
    "PRAGMA writable_schema = ON",
    "PRAGMA query_only = OFF",
    "BEGIN",
    "VACUUM",
    "REINDEX",
    "WITH x AS (SELECT 1) INSERT INTO item SELECT 5, 'five', 5.0 FROM x",
    "SELECT 1; DROP TABLE item",
]


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    path = tmp_path / "shop.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, price REAL);"
        "INSERT INTO item VALUES (1, 'pen', 1.5), (2, 'book', 12.0), (3, 'lamp', 30.0), (4, 'mug', 12.0);"
    )
    conn.commit()
    conn.close()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_returns_rows_and_errors(shop: Path) -> None:
    with SqlDatabase(shop) as db:
        assert db.run("SELECT name FROM item WHERE price > 10 ORDER BY id").rows == [("book",), ("lamp",), ("mug",)]
        bad = db.run("SELECT nope FROM item")
        assert bad.rows is None and bad.error is not None and "nope" in bad.error and not bad.refused
        assert db.stats.queries == 2 and db.stats.errors == 1


@pytest.mark.parametrize("sql", WRITES)
def test_writing_queries_are_refused_and_the_file_is_unchanged(shop: Path, sql: str) -> None:
    before = digest(shop)
    with SqlDatabase(shop) as db:
        result = db.run(sql)
        assert result.rows is None and result.error
        assert result.refused or "one statement" in result.error
        assert not db.valid(sql)
        assert db.run("SELECT count(*) FROM item").rows == [(4,)]
    assert digest(shop) == before
    assert sorted(p.name for p in shop.parent.iterdir()) == ["shop.sqlite"]  # no journal, no attached file


def test_an_endless_recursive_query_times_out_within_its_timeout(shop: Path) -> None:
    with SqlDatabase(shop, timeout_s=0.3) as db:
        start = time.monotonic()
        result = db.run(RECURSIVE_FOREVER)
        took = time.monotonic() - start
        assert result.timed_out and result.rows is None and "timed out after 0.3 s" in (result.error or "")
        assert 0.3 <= took < 2.0  # the timeout plus slack for a busy machine
        assert db.stats.timed_out == 1
        assert not db.execution_match("SELECT 1", RECURSIVE_FOREVER, timeout_s=0.2)
        assert db.run("SELECT 2").rows == [(2,)]  # the connection is usable after an interrupt
        assert db.valid(RECURSIVE_FOREVER)  # it compiles; valid() never runs it


def test_execution_match_compares_multisets_or_order(shop: Path) -> None:
    with SqlDatabase(shop) as db:
        gold = "SELECT name FROM item WHERE price = 12"
        assert db.execution_match(gold, "SELECT name FROM item WHERE price >= 12 AND price < 13 ORDER BY name DESC")
        assert not db.execution_match(gold, "SELECT name FROM item WHERE price >= 12")  # lamp too
        assert not db.execution_match(gold, "SELECT name, price FROM item WHERE price = 12")  # extra column
        assert not db.execution_match(gold, "SELECT DISTINCT price FROM item WHERE price = 12")
        ordered = "SELECT name FROM item ORDER BY price, id"
        assert db.execution_match(ordered, "SELECT name AS n FROM item ORDER BY price ASC, id")
        assert not db.execution_match(ordered, "SELECT name FROM item ORDER BY price DESC, id")
        # Multisets: a duplicate row counts.
        assert not db.execution_match("SELECT price FROM item", "SELECT DISTINCT price FROM item")
        assert db.execution_match("SELECT avg(price) FROM item", "SELECT sum(price) / count(*) FROM item")
        assert not db.execution_match(gold, "DELETE FROM item")
        assert not db.execution_match(gold, "not sql at all")


def test_a_gold_query_that_fails_is_a_data_error(shop: Path) -> None:
    with SqlDatabase(shop) as db, pytest.raises(DataError, match="gold query fails") as err:
        db.execution_match("SELECT missing FROM item", "SELECT 1")
    assert str(shop) in str(err.value) and err.value.fix


def test_valid_means_one_read_only_statement_that_compiles(shop: Path) -> None:
    with SqlDatabase(shop) as db:
        assert db.valid("SELECT name FROM item;")
        assert db.valid("WITH cheap AS (SELECT * FROM item WHERE price < 5) SELECT count(*) FROM cheap")
        for sql in (
            "",
            "   ",
            "SELECT",
            "SELECT name FROM nowhere",
            "SELECT 1; SELECT 2",
            "hello",
            "PRAGMA table_info(item)",
        ):
            assert not db.valid(sql), sql
        assert db.stats.queries == 0  # valid() runs nothing


def test_order_by_is_found_only_on_the_outer_query() -> None:
    assert has_order_by("select a from t order  by a")
    assert has_order_by("SELECT a FROM t\nORDER\nBY a DESC LIMIT 3")
    assert not has_order_by("select * from (select a from t order by a)")
    assert not has_order_by("select 'order by' from t -- order by a")
    assert is_query("  (SELECT 1)") and is_query("values (1)") and not is_query("/* select */ vacuum")


def test_a_missing_or_unreadable_database_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        SqlDatabase(tmp_path / "nope.sqlite")
    assert "nope.sqlite" in str(err.value) and err.value.fix
    with pytest.raises(DataError, match="not a file"):
        SqlDatabase(tmp_path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database, just some bytes" * 200)
    with pytest.raises(DataError, match="read-only SQLite database") as err:
        SqlDatabase(junk)
    assert "junk.sqlite" in str(err.value)
