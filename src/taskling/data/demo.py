"""The embedded default job: CLINC150 intents on the bundled SmolLM2-135M.

`prepare_demo` writes a CLINC150 subset (train, validation, gold from the official test
split, so gold never touches training) and a config for it into a run directory's
`source/` folder; `taskling demo` then trains, evaluates and prints the report card.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from taskling.config import ProjectConfig, build_config
from taskling.errors import DataError
from taskling.io import read_jsonl, write_jsonl, write_text
from taskling.model.bundled import check_installed
from taskling.rundir import RunDir

CLINC_ENV = "TASKLING_CLINC_DIR"
INSTRUCTION = "Classify the banking, travel or assistant request into its intent. Answer with the intent name only."


def find_clinc(explicit: str | Path | None = None) -> Path:
    """Locate CLINC150: an explicit path, $TASKLING_CLINC_DIR, or ../shared/data/clinc150."""
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get(CLINC_ENV):
        candidates.append(Path(os.environ[CLINC_ENV]))
    here = Path.cwd()
    candidates += [p / "shared" / "data" / "clinc150" for p in (here, here.parent, *here.parents)]
    for path in candidates:
        if (path / "train.jsonl").is_file() and (path / "LABELS.txt").is_file():
            return path
    raise DataError(
        "CLINC150 not found",
        path=candidates[0] if candidates else None,
        fix=f"pass --data-dir or set {CLINC_ENV} to the folder holding train.jsonl and LABELS.txt",
    )


def _rows_by_label(path: Path) -> dict[str, list[dict[str, str]]]:
    grouped: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in read_jsonl(path):
        grouped[row["label"]].append({"text": row["text"], "label": row["label"]})
    return grouped


def pick_intents(clinc: Path, n: int) -> list[str]:
    """`n` intents spread evenly over the alphabetical list, so several domains are mixed."""
    labels = [x.strip() for x in (clinc / "LABELS.txt").read_text().splitlines() if x.strip()]
    step = max(1, len(labels) // n)
    return labels[::step][:n]


def prepare_demo(
    run_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    intents: int = 20,
    train_per_intent: int = 40,
    validation_per_intent: int = 5,
    gold_per_intent: int = 30,
    epochs: float = 2.0,
    base: str = "bundled:smollm2-135m",
) -> tuple[ProjectConfig, Path]:
    """Write the demo's data files and return its config and the gold file's path."""
    check_installed(base)  # before any file is written: the error is the one install command
    clinc = find_clinc(data_dir)
    labels = pick_intents(clinc, intents)
    run_dir = Path(run_dir)
    source = RunDir(run_dir).source
    splits = {
        "train": (clinc / "train.jsonl", train_per_intent),
        "validation": (clinc / "validation.jsonl", validation_per_intent),
        "gold": (clinc / "test.jsonl", gold_per_intent),
    }
    for name, (path, per_label) in splits.items():
        grouped = _rows_by_label(path)
        write_jsonl(source / f"{name}.jsonl", (row for label in labels for row in grouped[label][:per_label]))
    raw = {
        "task": {"name": f"clinc{intents}", "labels": labels, "instruction": INSTRUCTION},
        "data": {"train": [str(source / "train.jsonl")], "validation": [str(source / "validation.jsonl")]},
        "model": {"base": base, "max_length": 96},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"epochs": epochs, "batch_size": 8, "learning_rate": 3e-4, "patience": 2, "seed": 0},
        "run_dir": str(run_dir),
    }
    config = build_config(raw, source="demo config")
    write_text(source / "config.yaml", json.dumps(raw, indent=2))  # JSON is valid YAML
    return config, source / "gold.jsonl"
