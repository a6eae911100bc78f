"""Defaults by data size: epochs, learning rate, warmup and batch size the user left unset.

One default for 40 rows and 15,000 rows alike either under-trains the small set or spends
hours on the large one. `resolve_defaults` fills each unset (null) `train.*` field from the
table below by the number of training rows, with one more epoch when there are few rows per
label; values the user gave are kept. The resolved values are what the run's `config.yaml`
and `run.json` record and what the log line says. docs/training.md shows the same table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from taskling.config import TrainSettings
from taskling.errors import ConfigError

log = logging.getLogger(__name__)

AUTO_FIELDS = ("epochs", "learning_rate", "warmup_ratio", "batch_size")
# Fewer rows per label than this: one more epoch (a label seen 20 times needs more passes).
FEW_ROWS_PER_LABEL = 30


@dataclass(frozen=True)
class SizeDefaults:
    max_rows: float  # this row applies up to (excluding) this many training rows
    epochs: float
    learning_rate: float
    warmup_ratio: float
    batch_size: int


# The 500-5,000 row is the old one-size default (3 epochs, 2e-4, 5% warmup, batch 8).
TABLE = (
    SizeDefaults(500, 5.0, 2e-4, 0.10, 8),
    SizeDefaults(5_000, 3.0, 2e-4, 0.05, 8),
    SizeDefaults(20_000, 2.0, 3e-4, 0.03, 16),
    SizeDefaults(float("inf"), 1.0, 3e-4, 0.02, 32),
)


def size_defaults(rows: int, labels: int = 0) -> dict[str, Any]:
    """The table's values for `rows` training rows over `labels` labels (0: not a label task)."""
    row = next(r for r in TABLE if rows < r.max_rows)
    epochs = row.epochs
    if labels and rows / labels < FEW_ROWS_PER_LABEL and rows >= TABLE[0].max_rows:
        epochs += 1.0
    return {
        "epochs": epochs,
        "learning_rate": row.learning_rate,
        "warmup_ratio": row.warmup_ratio,
        "batch_size": row.batch_size,
    }


def resolve_defaults(settings: TrainSettings, rows: int, labels: int = 0) -> tuple[TrainSettings, dict[str, Any]]:
    """`settings` with every unset auto field filled; also the filled values (empty when none were)."""
    table = size_defaults(rows, labels)
    filled = {key: table[key] for key in AUTO_FIELDS if getattr(settings, key) is None}
    if not filled:
        return settings, {}
    log.info(
        "train defaults for %d rows, %d labels: %s",
        rows,
        labels,
        ", ".join(f"{key}={value}" for key, value in filled.items()),
    )
    return settings.model_copy(update=filled), filled


def text_answer_settings(settings: TrainSettings, rows: int, kind: str) -> TrainSettings:
    """Settings for a task whose answers are free text (extraction records, generated text).

    The label-set objective needs a label set, so anything but `lm` is refused; the unset auto
    fields are filled by size like a classifier's (without the few-rows-per-label epoch).
    """
    if settings.objective != "lm":
        raise ConfigError(
            f"train.objective={settings.objective} scores a label set; {kind} writes free text",
            fix=f"remove train.objective ({kind} trains with the LM answer loss)",
        )
    return resolve_defaults(settings, rows)[0]
