"""Drift report: is the traffic the specialist sees still the traffic it was trained for?

`monitor(run_dir, since=...)` reads a window of the prediction log (`predlog.py`) and holds
it against the run's training data (`RUN_DIR/data/train.jsonl`, `validation.jsonl`):

- **label shift**: the predicted-label distribution against the training label shares,
  as PSI (population stability index) and a chi-squared goodness-of-fit test, per category;
- **confidence**: the drop in mean top probability and the rise in the share of low-margin
  answers, against the model's own answers on validation data (`monitor/calibration.json`,
  written by `calibrate`) or, without it, against the log rows before the window;
- **input drift**: the cosine distance between the window's mean embedding and the
  training set's (all-MiniLM-L6-v2), its alarm level calibrated by resampling validation
  rows at the window's size; plus simple text statistics (length in words);
- **out-of-distribution inputs**: an input whose nearest training example (max cosine
  similarity) is less similar than all but `ood_quantile` of validation rows' is OOD;
  the share of such inputs in the window.

A generation run has no labels or probabilities: its window is checked for input drift, OOD
share and input length as above, then for output length and validity (`generation.py`).

Thresholds live in `MonitorConfig` (unknown keys are errors). Each check becomes a `Signal`;
any alarmed signal makes the report alarm (the CLI exits 1). `write_report` writes
`drift.json` and a self-contained `drift.html` with inline SVG time series.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from taskling.errors import ConfigError
from taskling.io import write_text
from taskling.monitor.config import (
    UNKNOWN,
    CategoryShift,
    DriftReport,
    MonitorConfig,
    Signal,
    load_monitor_config,
)
from taskling.monitor.generation import output_series, output_signals
from taskling.monitor.html import render_html
from taskling.monitor.reference import (
    Embedder,
    Reference,
    build_reference,
    calibrate,
    centroid_distance,
    confidence_profile,
    get_embedder,
    hashing_embedder,
    load_reference,
    max_similarity,
    text_stats,
)
from taskling.rundir import RunDir

log = logging.getLogger(__name__)

__all__ = [
    "UNKNOWN",
    "CategoryShift",
    "DriftReport",
    "Embedder",
    "MonitorConfig",
    "Reference",
    "Signal",
    "build_reference",
    "calibrate",
    "get_embedder",
    "hashing_embedder",
    "load_monitor_config",
    "load_reference",
    "monitor",
    "monitor_rows",
    "write_report",
]

# ---------------------------------------------------------------- the checks


def label_shift(predicted: Sequence[str], share: dict[str, float]) -> tuple[float, float, list[CategoryShift]]:
    """(PSI, chi-squared p-value, per-category rows) of predicted labels vs reference shares."""
    from scipy.stats import chisquare

    labels = list(share)
    n = len(predicted)
    counts = np.array([sum(1 for p in predicted if p == label) for label in labels], dtype=np.float64)
    # Additive smoothing keeps PSI finite for a category absent from one side.
    ref = np.array([share[label] for label in labels]) + 1e-4
    ref /= ref.sum()
    win = (counts + 0.5) / (n + 0.5 * len(labels))
    psi_each = (win - ref) * np.log(win / ref)
    expected = ref * n
    p_value = float(chisquare(counts, expected * counts.sum() / expected.sum()).pvalue) if n else 1.0
    rows = [
        CategoryShift(
            label=label,
            train_share=float(share[label]),
            window_share=float(counts[i] / n) if n else 0.0,
            count=int(counts[i]),
            psi=float(psi_each[i]),
            residual=float((counts[i] - expected[i]) / math.sqrt(expected[i])) if n else 0.0,
        )
        for i, label in enumerate(labels)
    ]
    rows.sort(key=lambda r: -r.psi)
    return float(psi_each.sum()), p_value, rows


def drift_threshold(ref: Reference, n: int, seed: int = 0, draws: int = 40) -> float:
    """Centroid distance that resampled validation windows of size `n` stay under (mean + 4 sd)."""
    rng = np.random.default_rng(seed)
    centre = ref.train_embeddings.mean(axis=0)
    pool = ref.val_embeddings
    dists = [
        centroid_distance(pool[rng.choice(len(pool), size=n, replace=n > len(pool))], centre) for _ in range(draws)
    ]
    return float(np.mean(dists) + 4 * np.std(dists))


def _signal(name: str, value: float, threshold: float, enough: bool, detail: str, above: bool = True) -> Signal:
    over = value > threshold if above else value < threshold
    return Signal(name, value, threshold, bool(over and enough), detail)


def _label_shift_signal(
    in_scope: Sequence[dict[str, Any]], ref: Reference, config: MonitorConfig, enough: bool, note: str
) -> tuple[Signal, list[CategoryShift]]:
    psi, p_value, cats = label_shift([r["label"] for r in in_scope], ref.label_share)
    moved = ", ".join(f"{c.label} {c.train_share:.1%}->{c.window_share:.1%}" for c in cats[:3] if c.psi > 0.01)
    signal = Signal(
        "label_shift",
        psi,
        config.psi_max,
        bool(enough and psi > config.psi_max and p_value < config.chi2_p_max),
        f"PSI {psi:.3f} (max {config.psi_max}), chi-squared p={p_value:.2g} (alarm below {config.chi2_p_max})"
        + (f"; moved: {moved}" if moved else "")
        + note,
    )
    return signal, cats


def _confidence_signals(
    in_scope: Sequence[dict[str, Any]],
    before: Sequence[dict[str, Any]],
    ref: Reference,
    config: MonitorConfig,
    enough: bool,
    note: str,
) -> list[Signal]:
    """Confidence against validation answers (calibrate) or, failing that, the log rows before the window."""
    probs = [r["probabilities"] for r in in_scope]
    if ref.confidence is not None:
        ref_conf, ref_low, source = ref.confidence, ref.low_margin_share or 0.0, ref.confidence_source
    elif len(before) >= config.min_rows:
        ref_conf, ref_low = confidence_profile([r["probabilities"] for r in before], config.low_margin)
        source = f"{len(before)} log rows before the window"
    else:
        return [Signal("confidence_drop", None, config.confidence_drop_max, False, "no reference: run calibrate")]
    if not probs:
        return [Signal("confidence_drop", None, config.confidence_drop_max, False, "no in-scope answers")]
    conf, low = confidence_profile(probs, config.low_margin)
    return [
        _signal(
            "confidence_drop",
            ref_conf - conf,
            config.confidence_drop_max,
            enough,
            f"mean top probability {ref_conf:.3f} -> {conf:.3f} (reference: {source})" + note,
        ),
        _signal(
            "low_margin_share",
            low - ref_low,
            config.low_margin_increase_max,
            enough,
            f"answers with margin < {config.low_margin}: {ref_low:.1%} -> {low:.1%}" + note,
        ),
    ]


def _input_signals(
    rows: Sequence[dict[str, Any]], ref: Reference, config: MonitorConfig, embedder: Embedder, enough: bool, note: str
) -> tuple[list[Signal], list[dict[str, Any]]]:
    """Input drift (centroid distance) and the out-of-distribution share, with the least familiar inputs."""
    n = len(rows)
    if not n:
        return [], []
    texts = [r["text"] for r in rows]
    emb = embedder(texts)
    dist = centroid_distance(emb, ref.train_embeddings.mean(axis=0))
    limit = config.embedding_distance_max or config.embedding_distance_factor * drift_threshold(ref, n)
    sims = max_similarity(emb, ref.train_embeddings)
    ood = sims < ref.ood_similarity
    share = float(ood.mean())
    signals = [
        _signal("input_drift", dist, limit, enough, f"centroid cosine distance {dist:.4f} (max {limit:.4f})" + note),
        _signal(
            "ood_share",
            share,
            config.ood_share_max,
            enough,
            f"{int(ood.sum())} of {n} inputs ({share:.1%}) are less similar to any training row than "
            f"{ref.ood_similarity:.3f} (validation's {config.ood_quantile:.0%} quantile)" + note,
        ),
    ]
    examples = [
        {"text": texts[i], "label": rows[i]["label"], "max_similarity": float(sims[i])} for i in np.argsort(sims)[:5]
    ]
    return signals, examples


def check_window(
    rows: Sequence[dict[str, Any]],
    ref: Reference,
    config: MonitorConfig,
    embedder: Embedder,
    *,
    before: Sequence[dict[str, Any]] = (),
) -> tuple[list[Signal], list[CategoryShift], dict[str, Any], list[dict[str, Any]]]:
    """Every check on one window of log rows (dicts with text, label, probabilities)."""
    n = len(rows)
    enough = n >= config.min_rows
    note = "" if enough else f" (only {n} rows < min_rows {config.min_rows}: not judged)"
    if ref.outputs is not None:
        return generation_window(rows, ref, config, embedder, before=before, enough=enough, note=note)
    in_scope = [r for r in rows if r["label"] != UNKNOWN]
    abstained = n - len(in_scope)
    shift, cats = _label_shift_signal(in_scope, ref, config, enough, note)
    inputs, ood_examples = _input_signals(rows, ref, config, embedder, enough, note)
    stats = text_stats([r["text"] for r in rows])
    change = stats["mean_words"] / ref.mean_words - 1 if ref.mean_words else 0.0
    abstain_share = abstained / n if n else 0.0
    signals = [
        shift,
        *_confidence_signals(in_scope, before, ref, config, enough, note),
        *inputs,
        _signal(
            "text_length",
            abs(change),
            config.length_change_max,
            enough,
            f"mean words per input {ref.mean_words:.1f} -> {stats['mean_words']:.1f} ({change:+.0%})" + note,
        ),
        _signal(
            "abstained",
            abstain_share,
            config.abstain_share_max,
            enough,
            f"{abstained} of {n} answers were `{UNKNOWN}` ({abstain_share:.1%})" + note,
        ),
    ]
    stats["train_mean_words"] = ref.mean_words
    return signals, cats, stats, ood_examples


def generation_window(
    rows: Sequence[dict[str, Any]],
    ref: Reference,
    config: MonitorConfig,
    embedder: Embedder,
    *,
    before: Sequence[dict[str, Any]],
    enough: bool,
    note: str,
) -> tuple[list[Signal], list[CategoryShift], dict[str, Any], list[dict[str, Any]]]:
    """A generation run's window: input drift and words per input as always, then output length and validity."""
    assert ref.outputs is not None
    inputs, ood_examples = _input_signals(rows, ref, config, embedder, enough, note)
    stats = text_stats([r["text"] for r in rows])
    change = stats["mean_words"] / ref.mean_words - 1 if ref.mean_words else 0.0
    length = _signal(
        "text_length",
        abs(change),
        config.length_change_max,
        enough,
        f"mean words per input {ref.mean_words:.1f} -> {stats['mean_words']:.1f} ({change:+.0%})" + note,
    )
    signals = [*inputs, length, *output_signals(rows, before, ref.outputs, config, enough, note)]
    stats["train_mean_words"] = ref.mean_words
    return signals, [], stats, ood_examples


# ---------------------------------------------------------------- the report


def parse_since(value: str, now: float | None = None) -> float:
    """'7d', '24h', '30m', '90s', '2w' or an ISO date/time -> unix seconds."""
    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - float(match.group(1)) * unit
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--since {value!r} is neither a duration nor a date", fix="use e.g. 7d, 24h, 30m or 2026-11-01"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def time_series(
    rows: Sequence[dict[str, Any]],
    ref: Reference,
    config: MonitorConfig,
    embedder: Embedder,
    emb: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Per bucket of consecutive rows: confidence, low-margin share, OOD share, PSI vs train."""
    if not rows:
        return []
    emb = embedder([r["text"] for r in rows]) if emb is None else emb
    sims = max_similarity(emb, ref.train_embeddings)
    size = max(1, math.ceil(len(rows) / config.buckets))
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        ood_share = float((sims[start : start + size] < ref.ood_similarity).mean())
        if ref.outputs is not None:  # a generation run: answer length and validity instead of labels
            first = {"start": float(chunk[0]["time"]), "end": float(chunk[-1]["time"]), "first_row": start}
            out.append(first | {"n": len(chunk), "ood_share": ood_share, **output_series(chunk)})
            continue
        probs = [r["probabilities"] for r in chunk if r["label"] != UNKNOWN]
        conf, low = confidence_profile(probs, config.low_margin) if probs else (float("nan"), float("nan"))
        psi, _, _ = label_shift([r["label"] for r in chunk if r["label"] != UNKNOWN], ref.label_share)
        out.append(
            {
                "start": float(chunk[0]["time"]),
                "end": float(chunk[-1]["time"]),
                "first_row": start,
                "n": len(chunk),
                "confidence": conf,
                "low_margin_share": low,
                "ood_share": float((sims[start : start + size] < ref.ood_similarity).mean()),
                "psi": psi,
            }
        )
    return out


def monitor_rows(
    window: Sequence[dict[str, Any]],
    ref: Reference,
    config: MonitorConfig,
    embedder: Embedder,
    *,
    before: Sequence[dict[str, Any]] = (),
    run_dir: str = "",
) -> DriftReport:
    """The drift report for `window` (log rows), with `before` as context for the plots."""
    signals, cats, stats, ood = check_window(window, ref, config, embedder, before=before)
    history = [*before, *window]
    times = [float(r["time"]) for r in window]
    return DriftReport(
        run_dir=run_dir,
        window={
            "rows": len(window),
            "start": _iso(min(times)) if times else None,
            "end": _iso(max(times)) if times else None,
            "context_rows": len(before),
            "train_hash": ref.train_hash,
            "ood_similarity": ref.ood_similarity,
        },
        signals=signals,
        categories=cats,
        text_stats=stats,
        ood_examples=ood,
        series=time_series(history, ref, config, embedder),
        config=config.model_dump(),
        window_start_index=len(before),
    )


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def monitor(
    run_dir: str | Path,
    *,
    since: str | float = "7d",
    url: str | None = None,
    config: MonitorConfig | None = None,
    embedder: Embedder | None = None,
    adapter: str | None = None,
    now: float | None = None,
) -> DriftReport:
    """Read the log window since `since` (and as long a period before it, for context) and report."""
    from taskling.serve.predlog import default_url, read_rows

    config = config or MonitorConfig()
    run_dir = Path(run_dir)
    url = url or default_url(run_dir)
    embedder = embedder or get_embedder(config.embedder)
    now = time.time() if now is None else now
    start = since if isinstance(since, float | int) else parse_since(since, now)
    rows = list(read_rows(url, since=start - (now - start), adapter=adapter))
    window = [r for r in rows if start <= r["time"] <= now]
    before = [r for r in rows if r["time"] < start]
    ref = load_reference(run_dir, config, embedder)
    report = monitor_rows(window, ref, config, embedder, before=before, run_dir=str(run_dir))
    log.info("monitor %s: %d rows in window, alarm=%s", run_dir, len(window), report.alarm)
    return report


def write_report(report: DriftReport, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """`drift.json` and the self-contained `drift.html` in `out_dir` (default: the run's `monitor/`)."""
    names = RunDir(report.run_dir)
    out = Path(out_dir) if out_dir is not None else names.monitor
    json_path, html_path = out / names.drift_report.name, out / names.drift_page.name
    write_text(json_path, json.dumps(report.to_dict(), indent=2, default=float, allow_nan=True))
    write_text(html_path, render_html(report), encoding="utf-8")
    return json_path, html_path
