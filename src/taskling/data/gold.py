"""Gold set versions: `GOLD_ROOT/v1`, `GOLD_ROOT/v2`, ... each frozen, none ever rewritten.

A version folder holds `gold.jsonl` and `gold.manifest.json` in the same format the split
stage writes (`split.py`, `taskling-gold/1`), so `split.load_gold` and the leakage check
read any version. The manifest adds `version`, `parent` and how many rows were added.

`add_gold` makes the next version: every row of the latest version plus the new rows,
minus new rows that repeat a gold row already there or copy a training row (a gold row the
model trained on would flatter every score). Dropped rows are counted and written to the
version's `rejected.jsonl`, never dropped silently. Old versions stay for comparison, and
every score written by `taskling.monitor.retrain.score_on_gold` names the version and content hash it used.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskling.data.clean import CleanConfig
from taskling.data.dedupe import find_leaks, normalize, text_key
from taskling.data.load import Example, content_hash, label_counts, load_file, write_examples
from taskling.data.split import MANIFEST, MANIFEST_FORMAT, dedupe_settings, load_gold, write_gold_manifest
from taskling.errors import DataError
from taskling.io import write_jsonl
from taskling.task import Task

log = logging.getLogger(__name__)

_VERSION = re.compile(r"v(\d+)")


def versions(gold_root: str | Path) -> list[str]:
    """Version names under `gold_root`, oldest first (v1, v2, ...)."""
    root = Path(gold_root)
    found = [p.name for p in root.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda name: int(name[1:]))


def resolve(gold_root: str | Path, version: str | None = None) -> Path:
    """The folder of `version` (default: the latest)."""
    names = versions(gold_root)
    if not names:
        raise DataError("no gold versions", path=gold_root, fix="create one: taskling gold add GOLD_ROOT gold.jsonl")
    name = version or names[-1]
    if name not in names:
        raise DataError(f"no gold version {name} (have {', '.join(names)})", path=gold_root)
    return Path(gold_root) / name


@dataclass
class GoldVersion:
    name: str
    path: Path
    rows: list[Example]
    content_hash: str
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """`v2@1a2b3c4d5e6f`: what every score records."""
        return f"{self.name}@{self.content_hash[:12]}"


def load_version(gold_root: str | Path, version: str | None = None) -> GoldVersion:
    folder = resolve(gold_root, version)
    rows, manifest = load_gold(folder / MANIFEST)  # checks the content hash
    return GoldVersion(folder.name, folder, rows, manifest["content_hash"], manifest)


def all_gold_rows(gold_roots: Sequence[str | Path]) -> list[Example]:
    """Every row of every version under each root: what a training set must never copy."""
    seen: set[str] = set()
    rows: list[Example] = []
    for root in gold_roots:
        for name in versions(root):
            for ex in load_version(root, name).rows:
                if text_key(ex.text) not in seen:
                    seen.add(text_key(ex.text))
                    rows.append(ex)
    return rows


@dataclass
class AddResult:
    version: GoldVersion
    added: int
    rejected: list[dict[str, Any]]


def add_gold(
    gold_root: str | Path,
    files: Sequence[str | Path],
    labels: Sequence[str],
    *,
    train: Sequence[Example] = (),
    clean_config: CleanConfig | None = None,
) -> AddResult:
    """Write the next gold version: the latest one's rows plus the new rows from `files`."""
    root = Path(gold_root)
    task = Task(labels=tuple(labels))
    new: list[Example] = []
    for file in files:
        new.extend(load_file(file, task).examples)  # a label outside the set is an error, with its line
    names = versions(root)
    parent = load_version(root) if names else None
    base = list(parent.rows) if parent else []
    config = clean_config or (CleanConfig() if parent is None else CleanConfig(**parent.manifest["near_duplicates"]))
    config = config.model_copy(update={"label_errors": False})
    rejected: list[dict[str, Any]] = []
    have = {normalize(ex.text) for ex in base}
    kept: list[Example] = []
    for ex in new:
        if normalize(ex.text) in have:
            rejected.append(
                {"text": ex.text, "label": ex.label, "reason": "already_in_gold", "where": f"{ex.source}:{ex.line}"}
            )
            continue
        have.add(normalize(ex.text))
        kept.append(ex)
    if train and kept:
        # A new gold row that copies a training row is not held out: reject it.
        leaks = find_leaks(kept, train, config)
        drop = {leak["index"] for leak in leaks}
        rejected.extend(
            {
                "text": leak["text"],
                "label": kept[leak["index"]].label,
                "reason": f"copies_training_row_{leak['kind']}",
                "detail": leak["detail"],
            }
            for leak in leaks
        )
        kept = [ex for i, ex in enumerate(kept) if i not in drop]
    if not kept:
        raise DataError(
            f"none of the {len(new)} new rows can be added ({len(rejected)} rejected)",
            path=files[0] if files else root,
            fix="add rows that are neither in the gold set already nor in the training data",
        )
    number = int(names[-1][1:]) + 1 if names else 1
    rows = [Example(ex.text, ex.label) for ex in [*base, *kept]]
    folder = root / f"v{number}"
    folder.mkdir(parents=True, exist_ok=False)  # a version is written once
    write_examples(folder / "gold.jsonl", rows)
    write_jsonl(folder / "rejected.jsonl", rejected)
    manifest = {
        "format": MANIFEST_FORMAT,
        "file": "gold.jsonl",
        "version": folder.name,
        "parent": parent.tag if parent else None,
        "added_rows": len(kept),
        "added_from": [str(f) for f in files],
        "rejected_rows": len(rejected),
        "rows": len(rows),
        "content_hash": content_hash(rows),
        "label_counts": label_counts(rows),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "near_duplicates": dedupe_settings(config),
        "text_hashes": sorted({text_key(ex.text) for ex in rows}),
    }
    write_gold_manifest(folder / MANIFEST, manifest)
    log.info("gold %s: %d rows (%d added, %d rejected)", folder, len(rows), len(kept), len(rejected))
    return AddResult(load_version(root, folder.name), len(kept), rejected)
