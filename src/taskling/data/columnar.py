"""Row sources that are tables, not text: Parquet files and Hugging Face `datasets`.

- a Parquet file (`.parquet`, `.pq`), read in record batches with pyarrow;
- a folder written by `Dataset.save_to_disk` (`state.json` + `dataset_info.json`), or by
  `DatasetDict.save_to_disk` (`dataset_dict.json`; one split, or name it: `FOLDER/train`);
- a Hub dataset for users online: `hf:ORG/NAME`, `hf:ORG/NAME:SPLIT` or
  `hf:ORG/NAME/CONFIG:SPLIT` (the split defaults to `train`), through `datasets.load_dataset`.

Each yields `(row number, row dict)` with rows numbered from 1, so `load.py` applies the
same row formats and bad-row accounting as for JSONL, naming rows instead of lines.
Integer labels stored as a `ClassLabel` (in a dataset's features, or in the `huggingface`
metadata `datasets` writes into Parquet files) come back as their names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from taskling.errors import DataError
from taskling.extras import require

log = logging.getLogger(__name__)

TABLE_FORMATS = ("parquet", "datasets")
PARQUET_SUFFIXES = (".parquet", ".pq")
HUB_PREFIX = "hf:"
BATCH_ROWS = 4096


def table_format(path: Path, fmt: str) -> str | None:
    """The table format ("parquet" or "datasets") when `path` is (or `fmt` forces) a table source, else None."""
    if fmt in TABLE_FORMATS:
        return fmt
    if fmt == "csv":
        return None
    # A forced row shape (chat, alpaca, ...) still reads a Parquet file or dataset as a table.
    if is_hub_id(path):
        return "datasets"
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return "parquet"
    if path.is_dir() and (is_saved_dataset(path) or (path / "dataset_dict.json").is_file()):
        return "datasets"
    return None


def is_hub_id(path: str | Path) -> bool:
    return str(path).startswith(HUB_PREFIX)


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def iter_table(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every row of a Parquet file or a dataset, numbered from 1."""
    rows = iter_parquet(path) if fmt == "parquet" else iter_dataset(path)
    yield from enumerate(rows, start=1)


def iter_parquet(path: Path) -> Iterator[dict[str, Any]]:
    pq = require("pyarrow.parquet", extra="data")
    if not path.is_file():
        raise DataError("file does not exist", path=path, fix="check the path in data.train / data.validation")
    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
        raise DataError(
            f"not a readable Parquet file: {err}",
            path=path,
            fix="write it with pandas.DataFrame.to_parquet / pyarrow, or set data.format to the file's real format",
        ) from None
    names = _parquet_class_names(reader.schema_arrow.metadata)
    for batch in reader.iter_batches(batch_size=BATCH_ROWS):
        yield from _decoded(batch.to_pylist(), names)


def _parquet_class_names(metadata: dict[bytes, bytes] | None) -> dict[str, list[str]]:
    """ClassLabel names from the `huggingface` schema metadata that `datasets` writes."""
    raw = (metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {
        col: list(feat["names"])
        for col, feat in features.items()
        if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and isinstance(feat.get("names"), list)
    }


def _decoded(rows: Iterable[dict[str, Any]], names: dict[str, list[str]]) -> Iterator[dict[str, Any]]:
    for row in rows:
        for col, labels in names.items():
            value = row.get(col)
            if isinstance(value, int) and 0 <= value < len(labels):
                row[col] = labels[value]
        yield row


def iter_dataset(path: Path) -> Iterator[dict[str, Any]]:
    ds = open_hub_dataset(str(path)) if is_hub_id(path) else open_saved_dataset(path)
    names = {col: list(feat.names) for col, feat in ds.features.items() if type(feat).__name__ == "ClassLabel"}
    for batch in ds.iter(batch_size=BATCH_ROWS):
        columns = list(batch)
        rows = (dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True))
        yield from _decoded(rows, names)


def open_saved_dataset(folder: Path) -> Any:
    """A `save_to_disk` folder as a `datasets.Dataset`; a DatasetDict must have one split."""
    datasets = require("datasets", extra="data")
    if not folder.is_dir():
        raise DataError(
            "no such dataset folder", path=folder, fix="give a folder written by Dataset.save_to_disk, or hf:ORG/NAME"
        )
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:  # FileNotFoundError, a version mismatch, a corrupt arrow file
        raise DataError(
            f"cannot load the saved dataset: {err}", path=folder, fix="re-save it with Dataset.save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            raise DataError(
                f"a DatasetDict with splits {splits}: which one?",
                path=folder,
                fix=f"point at one split's folder, e.g. {folder / (splits[0] if splits else 'train')}",
            )
        return loaded[splits[0]]
    return loaded


def parse_hub_id(spec: str) -> tuple[str, str | None, str]:
    """`hf:ORG/NAME[/CONFIG][:SPLIT]` -> (repo id, config or None, split)."""
    name, _, split = spec.removeprefix(HUB_PREFIX).partition(":")
    parts = [p for p in name.split("/") if p]
    if not 1 <= len(parts) <= 3:
        raise DataError(
            f"{spec!r} is not a Hub dataset id",
            fix="write hf:ORG/NAME, hf:ORG/NAME:SPLIT or hf:ORG/NAME/CONFIG:SPLIT",
        )
    config = parts[2] if len(parts) == 3 else None
    return "/".join(parts[:2]), config, split or "train"


def open_hub_dataset(spec: str) -> Any:
    """A Hub dataset split through `datasets.load_dataset` (needs the network, or its cache)."""
    repo, config, split = parse_hub_id(spec)
    datasets = require("datasets", extra="data")
    log.info("loading Hub dataset %s (config %s, split %s)", repo, config, split)
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as err:  # offline, no such repo or split, gated: the library's message says which
        raise DataError(
            f"cannot load Hub dataset {repo!r} (config {config}, split {split!r}): {err}",
            path=spec,
            fix="check the id, config and split on huggingface.co; be online (HF_HUB_OFFLINE unset) "
            "or save it locally with save_to_disk and point at that folder",
        ) from None
