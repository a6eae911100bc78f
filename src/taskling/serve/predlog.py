"""The prediction log: every answer the specialist gives, in a real database.

One row per prediction: time, request id, adapter name, model version, input text, label,
its probability, all label probabilities (JSON), latency and the cascade stage that decided
(NULL outside a cascade). A log written before the `stage` column existed gets it added
(`ALTER TABLE`) when it is opened. The default store is SQLite
in WAL mode at `RUN_DIR/predictions.db`; any SQLAlchemy URL works, e.g.
`postgresql+psycopg://user@host/db` (install the driver, e.g. `pip install psycopg`).

Writes are batched off the request path with a group commit: callers `submit` rows and get
a future; one writer thread gathers whatever rows are waiting (up to `batch_size`, or what
arrives within `max_wait_s` of the first), inserts them in one transaction, commits, and
only then resolves the futures. A server answers a request after its future resolves, so
every acknowledged prediction is on disk when the server is killed, SIGKILL included.
SQLite runs with `synchronous=FULL`, so a commit also survives the machine losing power.

The log holds raw user text, so it is private and does not grow forever: a SQLite file is
created readable by its owner only (0600; SQLite gives its `-wal` and `-shm` files the same
mode), an existing one that others can read is tightened, deleted rows are overwritten
(`secure_delete`), and with `retain_days` rows older than that are deleted when the log
opens and then every `purge_every_s` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskling.extras import needs

with needs("serve"):  # the prediction log is part of the `serve` extra
    from sqlalchemy import (
        Column,
        Engine,
        Float,
        Integer,
        MetaData,
        String,
        Table,
        Text,
        create_engine,
        delete,
        event,
        insert,
        select,
    )

from taskling.errors import TasklingError
from taskling.io import atomic_write
from taskling.rundir import RunDir

log = logging.getLogger(__name__)

DAY_S = 86_400.0
PRIVATE = 0o600

metadata = MetaData()
predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False, index=True),  # unix seconds, UTC
    Column("request_id", String(64), nullable=False, index=True),
    Column("adapter", String(128), nullable=False),
    Column("model_version", String(128), nullable=False),
    Column("text", Text, nullable=False),
    Column("label", String(256), nullable=False, index=True),
    Column("probability", Float, nullable=False),
    Column("probabilities", Text, nullable=False),  # JSON object label -> probability
    Column("latency_ms", Float, nullable=False),
    Column("stage", String(64), nullable=True, index=True),  # the cascade stage that decided; NULL outside one
)
ADDED_COLUMNS = {"stage": "VARCHAR(64)"}  # columns newer than the first schema, added to old logs on open


class LogError(TasklingError):
    """The prediction log cannot be opened, written or read."""


@dataclass
class LogRow:
    request_id: str
    adapter: str
    model_version: str
    text: str
    label: str
    probability: float
    probabilities: dict[str, float]
    latency_ms: float
    time: float = field(default_factory=time.time)
    stage: str | None = None  # the cascade stage that decided; None outside a cascade

    def to_db(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "request_id": self.request_id,
            "adapter": self.adapter,
            "model_version": self.model_version,
            "text": self.text,
            "label": self.label,
            "probability": self.probability,
            "probabilities": json.dumps(self.probabilities),
            "latency_ms": self.latency_ms,
            "stage": self.stage,
        }


def default_url(run_dir: str | Path) -> str:
    return f"sqlite:///{RunDir(Path(run_dir).resolve()).prediction_log}"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def make_private(path: Path) -> None:
    """Create the SQLite file owner-only before SQLite does (its -wal/-shm copy the mode); tighten an old one."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE))
        return
    except FileExistsError:
        pass
    except OSError:
        return  # no such folder: SQLite reports it, with the URL
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = file.stat().st_mode & 0o777
            if mode & 0o077:
                file.chmod(mode & 0o700)
                log.warning("%s was readable by others (mode %o); now %o", file, mode, mode & 0o700)
        except OSError:
            continue


def open_engine(url: str) -> Engine:
    """An engine for `url` with the schema in place; SQLite gets WAL, full sync, secure delete, mode 0600."""
    try:
        file = sqlite_file(url)
        if file is not None:
            make_private(file)
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

            @event.listens_for(engine, "connect")
            def _pragmas(conn: Any, _record: Any) -> None:
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                # Deleted text is overwritten, not left in free pages (the default of some SQLite builds only).
                cur.execute("PRAGMA secure_delete=ON")
                cur.close()

        else:
            engine = create_engine(url, pool_pre_ping=True)
        metadata.create_all(engine)
        add_missing_columns(engine)
    except Exception as err:  # driver missing, bad URL, unreachable server
        raise LogError(
            f"cannot open the prediction log {redact(url)}: {err}",
            fix="check the URL (sqlite:///path.db or postgresql+psycopg://user@host/db) and that its driver is there",
        ) from None
    return engine


def add_missing_columns(engine: Engine) -> None:
    """Bring a log from an older taskling up to the current schema (`ALTER TABLE ... ADD COLUMN`)."""
    from sqlalchemy import inspect, text

    present = {c["name"] for c in inspect(engine).get_columns(predictions.name)}
    for name, kind in ADDED_COLUMNS.items():
        if name not in present:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {predictions.name} ADD COLUMN {name} {kind}"))
            log.info("prediction log: added the %s column to an older log", name)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


class PredictionLog:
    """Group-committing writer: `submit` returns a future resolved once the rows are committed."""

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 512,
        max_wait_s: float = 0.002,
        retain_days: float | None = None,
        purge_every_s: float = 3600.0,
    ) -> None:
        self.url = url
        self.engine = open_engine(url)
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.retain_days = retain_days
        self.purge_every_s = purge_every_s
        self.purged_rows = 0
        self._last_purge = 0.0
        self.purge()
        self._queue: queue.Queue[tuple[list[dict[str, Any]], Future[int]] | None] = queue.Queue()
        self.committed_rows = 0
        self.commits = 0
        self._thread = threading.Thread(target=self._run, name="taskling-predlog", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, rows: Sequence[LogRow]) -> Future[int]:
        """Queue `rows` for the next group commit; the future gives the row count once durable."""
        fut: Future[int] = Future()
        if self._closed:
            fut.set_exception(LogError("the prediction log is closed"))
            return fut
        self._queue.put(([r.to_db() for r in rows], fut))
        return fut

    def write(self, rows: Sequence[LogRow]) -> int:
        """Submit and wait for the commit."""
        return self.submit(rows).result()

    def _gather(self, first: tuple[list[dict[str, Any]], Future[int]]) -> tuple[list[Any], bool]:
        batch = [first]
        size = len(first[0])
        deadline = time.monotonic() + self.max_wait_s
        stop = False
        while size < self.batch_size:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
            size += len(item[0])
        return batch, stop

    def purge(self) -> int:
        """Delete rows older than `retain_days` (nothing without it); the number deleted."""
        if self.retain_days is None:
            return 0
        self._last_purge = time.monotonic()
        cutoff = time.time() - self.retain_days * DAY_S
        with self.engine.begin() as conn:
            deleted = conn.execute(delete(predictions).where(predictions.c.time < cutoff)).rowcount or 0
        self.purged_rows += deleted
        if deleted:
            log.info("prediction log: deleted %d rows older than %g days", deleted, self.retain_days)
        return deleted

    def _next(self) -> tuple[list[dict[str, Any]], Future[int]] | None:
        """The next queued write; first, busy or idle, purge expired rows whenever that is due."""
        while True:
            wait = None
            if self.retain_days is not None:
                wait = max(self._last_purge + self.purge_every_s - time.monotonic(), 0.0)
                if wait == 0.0:
                    self._purge_quietly()
                    continue
            try:
                return self._queue.get(timeout=wait)
            except queue.Empty:
                continue

    def _purge_quietly(self) -> None:
        try:
            self.purge()
        except Exception as err:  # a failed purge must not stop the writer; it is retried later
            log.error("prediction log purge failed: %s", err)
            self._last_purge = time.monotonic()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._next()
            if first is None:
                break
            batch, stop = self._gather(first)
            rows = [row for rows, _ in batch for row in rows]
            try:
                with self.engine.begin() as conn:  # one transaction, one commit (and fsync)
                    if rows:
                        conn.execute(insert(predictions), rows)
            except Exception as err:
                log.error("prediction log write failed (%d rows not acknowledged): %s", len(rows), err)
                for _, fut in batch:
                    fut.set_exception(LogError(f"prediction log write failed: {err}"))
                continue
            self.committed_rows += len(rows)
            self.commits += 1
            for item_rows, fut in batch:
                fut.set_result(len(item_rows))
        # Drain what arrived after the stop signal so no caller waits forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].set_exception(LogError("the prediction log closed before this write"))

    def close(self) -> None:
        """Commit everything submitted so far, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self.engine.dispose()

    @property
    def pending(self) -> int:
        return self._queue.qsize()


def read_rows(
    url: str,
    *,
    limit: int | None = None,
    label: str | None = None,
    adapter: str | None = None,
    stage: str | None = None,
    since: float | None = None,
    max_probability: float | None = None,
    newest: bool = False,
) -> Iterator[dict[str, Any]]:
    """Logged predictions, oldest first, filtered; `probabilities` decoded from JSON.

    With `newest`, `limit` keeps the latest rows (still yielded oldest first).
    """
    engine = open_engine(url)
    query = select(predictions).order_by(predictions.c.id.desc() if newest else predictions.c.id)
    if label is not None:
        query = query.where(predictions.c.label == label)
    if adapter is not None:
        query = query.where(predictions.c.adapter == adapter)
    if stage is not None:
        query = query.where(predictions.c.stage == stage)
    if since is not None:
        query = query.where(predictions.c.time >= since)
    if max_probability is not None:
        query = query.where(predictions.c.probability <= max_probability)
    if limit is not None:
        query = query.limit(limit)
    try:
        with engine.connect() as conn:
            result = conn.execute(query).mappings()
            for row in reversed(list(result)) if newest else result:
                out = dict(row)
                out["probabilities"] = json.loads(out["probabilities"])
                yield out
    finally:
        engine.dispose()


def count_rows(url: str) -> int:
    from sqlalchemy import func

    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(predictions)).scalar_one())
    finally:
        engine.dispose()


def count_by_stage(url: str) -> dict[str | None, int]:
    """Logged rows per cascade stage (None: rows answered outside a cascade)."""
    from sqlalchemy import func

    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            query = select(predictions.c.stage, func.count()).group_by(predictions.c.stage)
            return {stage: int(n) for stage, n in conn.execute(query)}
    finally:
        engine.dispose()


def export_jsonl(rows: Iterator[dict[str, Any]], path: str | Path) -> int:
    """Write rows as JSONL ready for relabeling: `text` and `label` first (a taskling data file).

    Correct the `label` of the rows that need it and the file trains directly.
    """
    n = 0
    with atomic_write(path) as out:
        for row in rows:
            record = {
                "text": row["text"],
                "label": row["label"],
                "probability": row["probability"],
                "probabilities": row["probabilities"],
                "model_version": row["model_version"],
                "adapter": row["adapter"],
                "stage": row.get("stage"),
                "time": row["time"],
                "request_id": row["request_id"],
                "id": row["id"],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n
