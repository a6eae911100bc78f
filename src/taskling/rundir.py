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
    review.jsonl review/    `taskling review`: the worst rows to mark; review/{gold,train,pairs}.jsonl from the marks
    cascade.json cascade/   `taskling cascade`: stages, thresholds, the curve; cascade/NAME.joblib stage models
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
GENERATION = "generation"  # task.kind: generate (taskling.generate)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class _At:
    """A read-only attribute of a RunDir: the path `parts` below the run's root."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, run: RunDir, owner: type | None = None) -> Path:
        return run.root.joinpath(*self.parts)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory. Creating one touches nothing on disk."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    config = _At("config.yaml")
    manifest = _At("run.json")
    data = _At("data")
    train_data = _At("data", "train.jsonl")
    validation_data = _At("data", "validation.jsonl")
    bad_rows = _At("data", "bad_rows.jsonl")
    tokenizer = _At("tokenizer")
    adapter = _At("adapter")
    adapter_weights = _At("adapter", ADAPTER_WEIGHTS)
    checkpoint = _At("checkpoint")
    history = _At("history.jsonl")
    summary = _At("train_summary.json")
    metrics = _At("metrics.json")
    predictions = _At("predictions.jsonl")
    baseline = _At("baseline.json")
    gate = _At("gate.json")
    report = _At("report.html")
    abstain = _At("abstain.json")
    cascade = _At("cascade.json")  # `taskling cascade`: stages, thresholds, the curve
    prediction_log = _At("predictions.db")
    monitor = _At("monitor")
    source = _At("source")  # `taskling demo`'s data and config
    exports = _At("exports")
    # The ladder, a rung's label set, per-field and per-gold-version scores, the monitor's files.
    ladder = _At("ladder.json")
    labels = _At("labels.json")
    fields = _At("fields")
    evals = _At("evals")
    calibration = _At("monitor", "calibration.json")
    drift_report = _At("monitor", "drift.json")
    drift_page = _At("monitor", "drift.html")
    # DPO's pairs, summary, and its before/after comparison.
    pairs = _At("pairs.jsonl")
    dpo_summary = _At("dpo.json")
    dpo_report = _At("dpo_report.json")
    comparison = _At("compare")
    # Experiment-tracker files (`train.report_to`): TensorBoard events, W&B's folder.
    tracking = _At("tracking")
    # `taskling review`: the worst gold rows to mark; what `--apply` made of the marks.
    review = _At("review.jsonl")
    reviewed_gold = _At("review", "gold.jsonl")
    reviewed_train = _At("review", "train.jsonl")
    reviewed_pairs = _At("review", "pairs.jsonl")
    # `taskling cascade`: the stages, thresholds and curve; the cheap stages' fitted models.
    cascade = _At("cascade.json")
    cascade_dir = _At("cascade")

    def gold_evals(self, version: str) -> Path:
        """`evals/gold-VERSION/`: the run scored on one gold version (metrics, predictions, gate)."""
        return self.root / "evals" / f"gold-{version}"

    def embedding_cache(self, split: str, embedder: str) -> Path:
        """`monitor/SPLIT-EMBEDDER.npz`: the monitor's cached embeddings of the run's training data."""
        return self.root / "monitor" / f"{split}-{embedder}.npz"

    def cascade_stage(self, name: str) -> Path:
        """`cascade/NAME.joblib`: one cheap cascade stage's fitted model."""
        return self.root / "cascade" / f"{name}.joblib"

    def is_finished(self) -> bool:
        """True when the run has a manifest and a saved adapter."""
        return self.manifest.is_file() and self.adapter_weights.is_file()

    def kind(self) -> str | None:
        """`classification`, `extraction` or `generation`, or None where there is no manifest."""
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
        commands = {EXTRACTION: "taskling extract / extract-eval", GENERATION: "taskling generate / eval"}
        command = commands.get(found, "taskling classify / eval")
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
