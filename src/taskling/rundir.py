"""The run directory: the one module that knows its file names.

Stages talk to each other through files in `RUN_DIR`, and only this module spells their
names. Every other module asks a `RunDir` for a path (`RunDir(path).adapter`) or uses the
helpers here to read the manifest and name the adapter's version. The layout:

    config.yaml             the resolved config the run was trained with
    run.json                manifest: kind, base model, chat template, task, data hashes, versions
    data/train.jsonl        the rows trained on          data/validation.jsonl  the rows validated on
    data/bad_rows.jsonl     every skipped input row, with file, line and reason
    tokenizer/              the tokenizer with the exact chat template used
    adapter/                the best LoRA adapter (safetensors)
    checkpoint/             the latest resumable state
    history.jsonl           training loss per step, validation loss per evaluation
    train_summary.json      steps, best validation loss, tokens/s, row counts
    metrics.json            predictions.jsonl        written by `taskling eval`
    baseline.json           gate.json                the pinned bar and the last verdict
    report.html             abstain.json             the report card; the `unknown` threshold
    predictions.db          the prediction log (SQLite) of `taskling serve` / `classify`
    monitor/                drift.json and drift.html from `taskling monitor`
    exports/                one folder per `taskling export` format (merged, gguf-f16, ...)
    pairs.jsonl  dpo.json   `taskling pairs` / `taskling dpo`: preference pairs; the DPO run's summary
    dpo_report.json compare/ the DPO run scored against its SFT parent
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskling.errors import RunError
from taskling.io import read_json, write_json

CLASSIFICATION = "classification"
EXTRACTION = "extraction"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory. Creating one touches nothing on disk."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / "config.yaml")
    manifest = property(lambda self: self.root / "run.json")
    data = property(lambda self: self.root / "data")
    train_data = property(lambda self: self.root / "data" / "train.jsonl")
    validation_data = property(lambda self: self.root / "data" / "validation.jsonl")
    bad_rows = property(lambda self: self.root / "data" / "bad_rows.jsonl")
    tokenizer = property(lambda self: self.root / "tokenizer")
    adapter = property(lambda self: self.root / "adapter")
    adapter_weights = property(lambda self: self.root / "adapter" / ADAPTER_WEIGHTS)
    checkpoint = property(lambda self: self.root / "checkpoint")
    history = property(lambda self: self.root / "history.jsonl")
    summary = property(lambda self: self.root / "train_summary.json")
    metrics = property(lambda self: self.root / "metrics.json")
    predictions = property(lambda self: self.root / "predictions.jsonl")
    baseline = property(lambda self: self.root / "baseline.json")
    gate = property(lambda self: self.root / "gate.json")
    report = property(lambda self: self.root / "report.html")
    abstain = property(lambda self: self.root / "abstain.json")
    prediction_log = property(lambda self: self.root / "predictions.db")
    monitor = property(lambda self: self.root / "monitor")
    source = property(lambda self: self.root / "source")  # `taskling demo`'s data and config
    exports = property(lambda self: self.root / "exports")
    # Added with the evaluate/monitor split: the ladder, a rung's label set, per-field and
    # per-gold-version scores, and the monitor's own files.
    ladder = property(lambda self: self.root / "ladder.json")
    labels = property(lambda self: self.root / "labels.json")
    fields = property(lambda self: self.root / "fields")
    evals = property(lambda self: self.root / "evals")
    calibration = property(lambda self: self.root / "monitor" / "calibration.json")
    drift_report = property(lambda self: self.root / "monitor" / "drift.json")
    drift_page = property(lambda self: self.root / "monitor" / "drift.html")
    # Added with the train/ split: DPO's pairs, summary, and its before/after comparison.
    pairs = property(lambda self: self.root / "pairs.jsonl")
    dpo_summary = property(lambda self: self.root / "dpo.json")
    dpo_report = property(lambda self: self.root / "dpo_report.json")
    comparison = property(lambda self: self.root / "compare")

    def gold_evals(self, version: str) -> Path:
        """`evals/gold-VERSION/`: the run scored on one gold version (metrics, predictions, gate)."""
        return self.root / "evals" / f"gold-{version}"

    def embedding_cache(self, split: str, embedder: str) -> Path:
        """`monitor/SPLIT-EMBEDDER.npz`: the monitor's cached embeddings of the run's training data."""
        return self.root / "monitor" / f"{split}-{embedder}.npz"

    def is_finished(self) -> bool:
        """True when the run has a manifest and a saved adapter."""
        return self.manifest.is_file() and self.adapter_weights.is_file()

    def kind(self) -> str | None:
        """`classification` or `extraction`, or None where there is no manifest."""
        if not self.manifest.is_file():
            return None
        return str(read_json(self.manifest).get("kind", CLASSIFICATION))


def read_manifest(run_dir: str | Path, kind: str | None = CLASSIFICATION) -> dict[str, Any]:
    """The manifest of a finished run, checked to be of `kind` (None: any kind)."""
    run = RunDir(run_dir)
    if not run.manifest.is_file() or not run.adapter.is_dir():
        raise RunError(
            f"{run.root} is not a finished run (no run.json or adapter/)",
            fix="train first (taskling train CONFIG.yaml), or point at the run directory it wrote",
        )
    if not run.adapter_weights.is_file():
        # peft would fall back to a pickled adapter_model.bin; taskling loads weights from safetensors only.
        raise RunError(
            f"{run.adapter} holds no {ADAPTER_WEIGHTS}",
            fix="re-save the adapter with safe_serialization=True; pickled .bin weights are not loaded",
        )
    manifest = read_json(run.manifest)
    if not isinstance(manifest, dict):
        raise RunError(f"{run.manifest} is not a JSON object", fix="re-train the run; the manifest is damaged")
    found = str(manifest.get("kind", CLASSIFICATION))
    if kind is not None and found != kind:
        command = "taskling extract / extract-eval" if found == EXTRACTION else "taskling classify / eval"
        raise RunError(f"{run.root} is an {found} run, not a {kind} run", fix=f"use {command} for it")
    return dict(manifest)


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write run.json atomically."""
    write_json(RunDir(run_dir).manifest, manifest)


def adapter_version(run_dir: str | Path) -> str:
    """`RUN_NAME@HASH`: the run's directory name and the first 12 hex of its adapter weights' sha256."""
    run = RunDir(run_dir)
    digest = hashlib.sha256()
    for path in sorted(run.adapter.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return f"{run.root.resolve().name}@{digest.hexdigest()[:12]}"
