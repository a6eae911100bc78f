"""Split train / validation / gold, freeze the gold set, and refuse leakage.

`split_dataset` writes, under an output folder:

    train.jsonl, validation.jsonl   the rows to train and early-stop on
    gold.jsonl                      the frozen gold set (written once, never rewritten)
    gold.manifest.json              its content hash, per-label counts and normalised-text hashes
    leaked.jsonl                    rows dropped because they copy a gold row (exact or near)
    split.json                      counts per split and per label

Near-duplicate rows are clustered first and a cluster goes wholly to one split, so a gold
row's paraphrase never sits in train. A label with 2+ clusters always gets at least one
gold row (`min_gold_per_label`), however rare it is.

Once `gold.manifest.json` exists, later runs reuse that gold set: new rows are split into
train/validation only, after removing rows that leak from gold. Training refuses leaking
rows too: set `data.gold_manifest` in the project config.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from taskling.data.clean import CleanConfig
from taskling.data.dedupe import DEDUPE_KEYS, DedupeConfig, UnionFind, duplicate_clusters, find_leaks, text_key
from taskling.data.load import Example, content_hash, label_counts, load_file, write_examples
from taskling.errors import DataError
from taskling.io import read_json, write_json, write_jsonl

log = logging.getLogger(__name__)

MANIFEST = "gold.manifest.json"
MANIFEST_FORMAT = "taskling-gold/1"


class SplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    gold_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    # A rare label still gets this many gold rows (as long as one row is left to train on).
    min_gold_per_label: int = Field(2, ge=1)
    seed: int = 0


@dataclass
class SplitResult:
    out_dir: Path
    train: list[Example]
    validation: list[Example]
    gold: list[Example]
    leaked: list[dict[str, Any]] = field(default_factory=list)
    gold_reused: bool = False
    labels_without_gold: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- leakage


def load_gold(manifest_path: str | Path) -> tuple[list[Example], dict[str, Any]]:
    """The frozen gold rows, after checking they still match the manifest's content hash."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise DataError("gold manifest does not exist", path=manifest_path, fix="run `taskling split` first")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError("not a taskling gold manifest", path=manifest_path, fix="point at gold.manifest.json")
    gold_path = manifest_path.parent / manifest["file"]
    gold = load_file(gold_path).examples
    if content_hash(gold) != manifest["content_hash"]:
        raise DataError(
            "the gold set changed after it was frozen (content hash differs from the manifest)",
            path=gold_path,
            fix="restore gold.jsonl from version control; a new gold set needs a new folder",
        )
    return gold, manifest


def manifest_clean_config(manifest: dict[str, Any]) -> CleanConfig:
    """The near-duplicate settings the gold set was frozen with."""
    return CleanConfig(**manifest.get("near_duplicates", {}), label_errors=False)


def refuse_refreeze(path: Path) -> None:
    """A gold set is frozen once: raise when its manifest already exists."""
    if path.exists():
        raise DataError(
            "a gold manifest is already here; gold sets are written once",
            path=path,
            fix="reuse it (split reads it), or write the new gold set to another folder",
        )


def write_gold_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write a gold manifest once, atomically; never over an existing one."""
    refuse_refreeze(path)
    write_json(path, manifest)


def dedupe_settings(config: DedupeConfig) -> dict[str, Any]:
    """The near-duplicate settings a gold manifest records."""
    return config.model_dump(include=set(DEDUPE_KEYS))


def assert_no_leakage(splits: dict[str, Sequence[Example]], manifest_path: str | Path, show: int = 5) -> None:
    """Raise a `DataError` listing examples when any split copies a frozen gold row."""
    gold, manifest = load_gold(manifest_path)
    config = manifest_clean_config(manifest)
    problems: list[str] = []
    total = 0
    for name, rows in splits.items():
        leaks = find_leaks(rows, gold, config)
        total += len(leaks)
        problems.extend(f"  {name}: {leak['detail']}" for leak in leaks[: max(0, show - len(problems))])
    if total:
        raise DataError(
            f"{total} training/validation rows leak from the frozen gold set {manifest_path}:\n" + "\n".join(problems),
            fix="remove them (`taskling split` drops them and lists them in leaked.jsonl) or use another gold set",
        )


# ---------------------------------------------------------------- splitting


def _clusters(examples: Sequence[Example], config: DedupeConfig) -> list[list[int]]:
    uf = UnionFind(len(examples))
    for group in duplicate_clusters([ex.text for ex in examples], config):
        for i in group[1:]:
            uf.union(group[0], i)
    return uf.groups()


def _stratified_clusters(
    examples: Sequence[Example], clusters: list[list[int]], fraction: float, minimum: int, rng: random.Random
) -> tuple[list[int], list[int], list[str]]:
    """Pick whole clusters per label until `fraction` of its rows (at least `minimum` clusters)."""
    by_label: dict[str, list[list[int]]] = defaultdict(list)
    for cluster in clusters:
        by_label[examples[cluster[0]].label].append(cluster)
    held: list[int] = []
    kept: list[int] = []
    starved: list[str] = []
    for label in sorted(by_label):
        groups = by_label[label]
        rng.shuffle(groups)
        target = fraction * sum(len(g) for g in groups)
        # Always leave one cluster to train on; a single-cluster label gets no held rows.
        n_min = min(minimum, len(groups) - 1)
        taken = 0
        for k, group in enumerate(groups):
            if k < len(groups) - 1 and (k < n_min or taken + len(group) / 2 <= target):
                held.extend(group)
                taken += len(group)
            else:
                kept.extend(group)
        if n_min == 0 and minimum > 0:
            starved.append(label)
    return kept, held, starved


def split_dataset(
    examples: Sequence[Example],
    out_dir: str | Path,
    config: SplitConfig | None = None,
    clean_config: CleanConfig | None = None,
) -> SplitResult:
    """Split into train/validation/gold; reuse a gold set already frozen in `out_dir`."""
    config = config or SplitConfig()
    clean_config = (clean_config or CleanConfig()).model_copy(update={"label_errors": False})
    out = Path(out_dir)
    rng = random.Random(config.seed)
    manifest_path = out / MANIFEST
    leaked: list[dict[str, Any]] = []
    starved: list[str] = []
    if manifest_path.exists():
        gold, manifest = load_gold(manifest_path)
        clean_config = manifest_clean_config(manifest)
        leaked = find_leaks(examples, gold, clean_config)
        drop = {leak["index"] for leak in leaked}
        pool = [ex for i, ex in enumerate(examples) if i not in drop]
        reused = True
        log.info("reusing frozen gold set %s (%d rows); %d rows leak", manifest_path, len(gold), len(leaked))
    else:
        clusters = _clusters(examples, clean_config)
        kept, held, starved = _stratified_clusters(
            examples, clusters, config.gold_fraction, config.min_gold_per_label, rng
        )
        gold = [examples[i] for i in sorted(held)]
        pool = [examples[i] for i in sorted(kept)]
        reused = False
        freeze_gold(out, gold, config, clean_config)
    pool_clusters = _clusters(pool, clean_config)
    val_fraction = config.validation_fraction / max(1e-9, 1 - (0 if reused else config.gold_fraction))
    kept, held, _ = _stratified_clusters(pool, pool_clusters, min(val_fraction, 0.5), 0, rng)
    train = [pool[i] for i in kept]
    rng.shuffle(train)
    validation = [pool[i] for i in sorted(held)]
    write_examples(out / "train.jsonl", train)
    write_examples(out / "validation.jsonl", validation)
    write_jsonl(out / "leaked.jsonl", ({k: v for k, v in leak.items() if k != "index"} for leak in leaked))
    summary = {
        "seed": config.seed,
        "gold_reused": reused,
        "rows": {"input": len(examples), "train": len(train), "validation": len(validation), "leaked": len(leaked)},
        "gold_rows": len(gold),
        "labels_without_gold": starved,
        "label_counts": {
            "train": label_counts(train),
            "validation": label_counts(validation),
            "gold": label_counts(gold),
        },
    }
    write_json(out / "split.json", summary)
    if starved:
        log.warning("labels with a single row (or cluster) get no gold rows: %s", ", ".join(starved))
    return SplitResult(out, train, validation, gold, leaked, reused, starved)


def freeze_gold(out: Path, gold: list[Example], config: SplitConfig, clean_config: CleanConfig) -> None:
    refuse_refreeze(out / MANIFEST)
    write_examples(out / "gold.jsonl", gold)
    manifest = {
        "format": MANIFEST_FORMAT,
        "file": "gold.jsonl",
        "rows": len(gold),
        "content_hash": content_hash(gold),
        "label_counts": label_counts(gold),
        "seed": config.seed,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "near_duplicates": dedupe_settings(clean_config),
        "text_hashes": sorted({text_key(g.text) for g in gold}),
    }
    write_gold_manifest(out / MANIFEST, manifest)
