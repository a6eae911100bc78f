"""Drift of a generation run's answers: output length and format validity against the eval reference.

A generation run (`task.kind: generate`) has no label set and no probabilities, so the label
shift, confidence and abstention checks do not apply. Its log rows (`serve/generation.py`)
carry validity (`probability` 1.0 or 0.0) and the answer's tokens (`probabilities["n_tokens"]`),
and two checks replace them:

- **output_length**: the relative change in mean answer tokens against the reference;
- **validity_drop**: the reference's format validity rate minus the window's.

The reference is the model's own answers on the gold set, `RUN_DIR/predictions.jsonl` from
`taskling eval` (each row's `n_tokens` and `valid`); without it, the log rows before the
window (at least `min_rows` of them); without those, the checks report "no reference".
Input drift (embeddings, OOD share, words per input) is checked as for every run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskling.monitor.config import MonitorConfig, Signal
from taskling.rundir import GENERATION, RunDir

log = logging.getLogger(__name__)


@dataclass
class OutputReference:
    """What a generation run's answers looked like when it was judged: mean tokens and validity rate."""

    mean_tokens: float | None
    validity_rate: float | None
    source: str
    n: int = 0


def is_generation_run(run_dir: str | Path) -> bool:
    return RunDir(run_dir).kind() == GENERATION


def output_reference(run_dir: str | Path) -> OutputReference:
    """The run's eval answers (`predictions.jsonl`); an empty reference when there are none."""
    path = RunDir(run_dir).predictions
    if not path.is_file():
        return OutputReference(None, None, "none")
    tokens, valid = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "n_tokens" in row and "valid" in row:
            tokens.append(float(row["n_tokens"]))
            valid.append(float(bool(row["valid"])))
    if not tokens:
        log.warning("%s holds no n_tokens/valid rows: no output reference", path)
        return OutputReference(None, None, "none")
    return OutputReference(float(np.mean(tokens)), float(np.mean(valid)), f"eval answers ({path})", len(tokens))


def output_profile(rows: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(mean answer tokens, validity rate) of logged generation rows."""
    tokens = [float(r["probabilities"].get("n_tokens", 0.0)) for r in rows]
    valid = [float(r["probability"] >= 0.5) for r in rows]
    return float(np.mean(tokens)), float(np.mean(valid))


def output_signals(
    rows: Sequence[dict[str, Any]],
    before: Sequence[dict[str, Any]],
    ref: OutputReference,
    config: MonitorConfig,
    enough: bool,
    note: str,
) -> list[Signal]:
    """`output_length` and `validity_drop` against the eval answers, or else the log rows before the window."""
    mean_tokens, validity, source = ref.mean_tokens, ref.validity_rate, ref.source
    if mean_tokens is None and len(before) >= config.min_rows:
        mean_tokens, validity = output_profile(before)
        source = f"{len(before)} log rows before the window"
    if mean_tokens is None or validity is None:
        detail = "no reference: run taskling eval on the gold set (predictions.jsonl)"
        return [
            Signal("output_length", None, config.output_length_change_max, False, detail),
            Signal("validity_drop", None, config.validity_drop_max, False, detail),
        ]
    if not rows:
        return []
    tokens, rate = output_profile(rows)
    change = tokens / mean_tokens - 1 if mean_tokens else 0.0
    drop = validity - rate
    return [
        Signal(
            "output_length",
            abs(change),
            config.output_length_change_max,
            bool(enough and abs(change) > config.output_length_change_max),
            f"mean answer tokens {mean_tokens:.1f} -> {tokens:.1f} ({change:+.0%}; reference: {source})" + note,
        ),
        Signal(
            "validity_drop",
            drop,
            config.validity_drop_max,
            bool(enough and drop > config.validity_drop_max),
            f"format validity {validity:.1%} -> {rate:.1%} (reference: {source})" + note,
        ),
    ]


def output_series(chunk: Sequence[dict[str, Any]]) -> dict[str, float]:
    """A time-series bucket's generation values (the drift page plots them)."""
    if not chunk:
        return {"mean_tokens": float("nan"), "validity_rate": float("nan")}
    tokens, rate = output_profile(chunk)
    return {"mean_tokens": tokens, "validity_rate": rate}
