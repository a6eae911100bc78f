"""Batch inference over a file: one process, or a Ray cluster.

`predict_batch(run_dir, input, output, engine=...)` reads a table (Parquet, JSONL or CSV,
by suffix), classifies its text column with the run's `Classifier`, and writes the input
columns plus four result columns, in input order, to `output` (Parquet, JSONL or CSV, by
suffix):

    label          the predicted label (always one of the task's labels)
    probability    its probability
    margin         top probability minus the runner-up's
    probabilities  JSON object label -> probability, in the task's label order

A cascade run (one with `cascade.json`) adds a fifth, `stage`: the stage that decided the
row. With `abstain=True` a label is `unknown` under the run's `abstain.json` threshold
(`taskling calibrate`); a run without one is refused before the model loads.

Both engines read with the same Arrow readers and write with the same writer, so their
outputs have the same schema and, on the same input, the same rows. `engine="ray"` maps the
classifier over the input's blocks with Ray Data (`map_batches` with a callable class, so
each worker loads the model once) on the cluster `ray.init()` finds (`RAY_ADDRESS`), or on a
local one it starts; results stream back to the driver in input order and are appended to
the output file, so the driver never holds the whole table.

A row whose text is missing (null) stops the run with a `DataError` naming the row: a batch
job never drops a row silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskling.errors import DataError, TasklingError
from taskling.io import atomic_write

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
SUFFIXES = (".parquet", ".jsonl", ".csv")
RESULT_COLUMNS = ("label", "probability", "margin", "probabilities")


@dataclass
class BatchResult:
    output_path: Path
    rows: int
    seconds: float
    engine: str

    @property
    def rows_per_second(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def table_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"unsupported file type {suffix or '(none)'}",
            path=path,
            fix=f"use one of {', '.join(SUFFIXES)} (the suffix picks the format)",
        )
    return suffix[1:]


def read_table(path: str | Path) -> Any:
    """The whole input as a pandas DataFrame, read with the Arrow readers Ray Data uses too."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    path = Path(path)
    fmt = table_format(path)
    if not path.is_file():
        raise DataError("file does not exist", path=path, fix="check the input path")
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        elif fmt == "jsonl":
            table = pa_json.read_json(path)
        else:
            table = pa_csv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"cannot read the {fmt} file: {err}", path=path, fix=f"check that it is valid {fmt}") from None
    return table.to_pandas()


def check_texts(frame: Any, text_field: str, path: Path, first_row: int | None = 1) -> list[str]:
    """The text column as strings; a missing column or a null text raises, naming the row.

    `first_row` is the file row number of the frame's first row; None where it is unknown
    (inside a Ray block), and the error then gives the row within the block.
    """
    import pandas as pd

    if text_field not in frame.columns:
        raise DataError(
            f"no column {text_field!r} (columns: {', '.join(map(str, frame.columns))})",
            path=path,
            fix="name the text column with --text-field",
        )
    texts = []
    for offset, value in enumerate(frame[text_field].tolist()):
        if _is_null(pd, value):  # None, NaN, or pd.NA (Arrow-backed columns under Ray)
            where = f"row {first_row + offset}" if first_row is not None else f"row {offset + 1} of a Ray block"
            raise DataError(f"{where} has no text", path=path, fix="fill in or remove the row; none is dropped")
        texts.append(value if isinstance(value, str) else str(value))
    return texts


def _is_null(pd: Any, value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or array cell: not a null
        return False


def add_predictions(
    clf: Any, frame: Any, texts: list[str], batch_size: int, progress: Callable[[int, int], None] | None = None
) -> Any:
    """`frame` with the result columns appended (a copy; input order kept)."""
    preds = clf.predict(texts, batch_size=batch_size, **({"progress": progress} if progress else {}))
    out = frame.copy()
    for column in RESULT_COLUMNS:
        if column in out.columns:  # results win over an input column of the same name
            out = out.drop(columns=column)
    if "stage" in out.columns and getattr(clf, "stage_names", None):
        out = out.drop(columns="stage")
    labels = clf.task.labels
    out["label"] = [p.label for p in preds]
    out["probability"] = [float(p.probability) for p in preds]
    out["margin"] = [float(p.margin) if p.probabilities else 0.0 for p in preds]
    out["probabilities"] = [
        json.dumps({k: p.probabilities.get(k, 0.0) for k in labels}, ensure_ascii=False) for p in preds
    ]
    if getattr(clf, "stage_names", None):  # a cascade: which stage decided each row
        out["stage"] = [p.stage for p in preds]
    return out


def load_predictor(run_dir: str | Path, threads: int | None, abstain: bool) -> Any:
    """The run's predictor (a cascade run's cascade), answering `unknown` under abstain.json with `abstain`."""
    from taskling.serve.abstain import AbstainingClassifier, load_threshold
    from taskling.serve.classifier import Classifier

    threshold = load_threshold(run_dir) if abstain else None  # before the model loads
    clf = Classifier.from_run(run_dir, threads=threads)
    return clf if threshold is None else AbstainingClassifier(clf, threshold)


class TableWriter:
    """Appends DataFrames to one Parquet, JSONL or CSV file through `taskling.io.atomic_write`:
    readers see the old file or the whole new one, never part of it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fmt = table_format(self.path)
        self.rows = 0
        self._parquet: Any = None
        self._file = contextlib.ExitStack()
        self._fh: Any = self._file.enter_context(atomic_write(self.path, "wb" if self.fmt == "parquet" else "w"))

    def write(self, frame: Any) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = _plain_arrow(pa.Table.from_pandas(frame, preserve_index=False))
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self._fh, table.schema)
            self._parquet.write_table(table.cast(self._parquet.schema))
        elif self.fmt == "jsonl":
            for record in frame.to_dict(orient="records"):
                self._fh.write(json.dumps(_plain(record), ensure_ascii=False) + "\n")
        else:
            frame.to_csv(self._fh, index=False, header=self.rows == 0)
        self.rows += len(frame)

    def close(self) -> Path:
        """Finish the file and move it into place."""
        if self._parquet is not None:
            self._parquet.close()
        elif self.fmt == "parquet":  # no rows: still a valid, empty file
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({c: pa.array([], pa.string()) for c in RESULT_COLUMNS}), self._fh)
        self._file.close()
        return self.path

    def abort(self, error: BaseException | None = None) -> None:
        """Drop the partial file; the target is left as it was."""
        if self._parquet is not None:
            self._parquet.close()
        error = error or RuntimeError("batch aborted")
        self._file.__exit__(type(error), error, error.__traceback__)


def _plain_arrow(table: Any) -> Any:
    """One Arrow schema whichever engine made the frame: Ray's Arrow-backed pandas columns arrive
    as large_string with pandas metadata naming Arrow dtypes; the local path's as string."""
    import pyarrow as pa

    fields = []
    for f in table.schema:
        kind = pa.string() if pa.types.is_large_string(f.type) else f.type
        fields.append(pa.field(f.name, kind, f.nullable))
    return table.cast(pa.schema(fields)).replace_schema_metadata(None)


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars and arrays as JSON-ready Python values."""
    out = {}
    for key, value in record.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        elif isinstance(value, float) and value != value:
            value = None
        out[str(key)] = value
    return out


def predict_batch(
    run_dir: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    *,
    engine: str = "local",
    text_field: str = "text",
    batch_size: int = 32,
    workers: int | None = None,
    threads: int | None = 1,
    abstain: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """Classify every row of `input_path` and write `output_path` (see the module docstring).

    `workers` is the number of Ray actors (default: the cluster's CPUs / `threads`);
    `threads` the torch threads per classifier. `progress(done, total)` is called as rows
    are classified by the local engine (Ray Data shows its own progress). `abstain`: label
    `unknown` under the run's abstain.json threshold.
    """
    if engine not in ENGINES:
        raise TasklingError(f"unknown engine {engine!r}", fix=f"use one of {', '.join(ENGINES)}")
    input_path, output_path = Path(input_path), Path(output_path)
    table_format(input_path)
    table_format(output_path)
    if not input_path.is_file():
        raise DataError("file does not exist", path=input_path, fix="check the input path")
    if abstain:
        from taskling.serve.abstain import load_threshold

        load_threshold(run_dir)  # refuse a run without abstain.json before any work
    started = time.perf_counter()
    writer = TableWriter(output_path)
    try:
        if engine == "local":
            frames = _local_frames(run_dir, input_path, text_field, batch_size, threads, abstain, progress)
        else:
            frames = _ray_frames(run_dir, input_path, text_field, batch_size, workers, threads, abstain)
        for frame in frames:
            writer.write(frame)
    except BaseException as err:
        writer.abort(err)
        raise
    writer.close()
    seconds = time.perf_counter() - started
    log.info("%s: %d rows in %.1fs with the %s engine", output_path, writer.rows, seconds, engine)
    return BatchResult(output_path, writer.rows, seconds, engine)


def _local_frames(
    run_dir: str | Path,
    path: Path,
    text_field: str,
    batch_size: int,
    threads: int | None,
    abstain: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Any]:
    frame = read_table(path)
    texts = check_texts(frame, text_field, path)
    clf = load_predictor(run_dir, threads, abstain)
    yield add_predictions(clf, frame, texts, batch_size, progress)


class RayPredictor:
    """Ray Data callable class: loads the classifier once per worker, then maps batches."""

    def __init__(
        self, run_dir: str, text_field: str, batch_size: int, threads: int | None, path: str, abstain: bool = False
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.clf = load_predictor(run_dir, threads, abstain)
        self.text_field = text_field
        self.batch_size = batch_size
        self.path = Path(path)

    def __call__(self, frame: Any) -> Any:
        # File row numbers are not known inside a block; the error gives the row within it.
        texts = check_texts(frame, self.text_field, self.path, first_row=None)
        return add_predictions(self.clf, frame, texts, self.batch_size)


def _ray_frames(
    run_dir: str | Path,
    path: Path,
    text_field: str,
    batch_size: int,
    workers: int | None,
    threads: int | None,
    abstain: bool = False,
) -> Iterator[Any]:
    try:
        import ray
    except ImportError:
        raise TasklingError("the ray engine needs Ray Data", fix="pip install 'ray[data]'") from None
    started_here = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come back in input order
        fmt = table_format(path)
        readers = {"parquet": ray.data.read_parquet, "jsonl": ray.data.read_json, "csv": ray.data.read_csv}
        ds = readers[fmt](str(path.resolve()))
        # Reading the input needs a CPU too: workers holding every CPU would wait on it forever.
        spare = max(float(ray.cluster_resources().get("CPU", 1)) - 1, 0.5)
        size = workers or max(1, int(spare // (threads or 1)))
        cpus_per_worker = min(float(threads or 1), spare / size)
        ds = ds.map_batches(
            RayPredictor,
            fn_constructor_kwargs={
                "run_dir": str(Path(run_dir).resolve()),
                "text_field": text_field,
                "batch_size": batch_size,
                "threads": threads,
                "path": str(path),
                "abstain": abstain,
            },
            batch_size=max(batch_size * 8, 256),
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=cpus_per_worker,
        )
        yield from ds.iter_batches(batch_format="pandas", batch_size=None)
    except Exception as err:
        cause = _taskling_cause(err)
        if cause is None:
            raise
        raise TasklingError(cause.message, fix=cause.fix) from None
    finally:
        if started_here:
            ray.shutdown()


def _taskling_cause(err: BaseException) -> TasklingError | None:
    """The user error inside Ray's wrappers (task error -> UDF error -> our error), if any.

    Ray ships a worker's exception back as text inside its own exception types, so the
    last resort is the `taskling.errors.XError: message / fix: ...` lines of that text.
    """
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TasklingError):
            return current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    found = re.search(r"taskling\.errors\.\w+: (.+?)\n\s*fix: (.+?)(?:\n|$)", str(err))
    return TasklingError(found.group(1), fix=found.group(2)) if found else None
