"""`report.html`: the page people look at before deciding to ship.

One self-contained file: inline CSS and inline SVG charts, no JavaScript (bar the review form's), no fonts or
scripts fetched from anywhere, so it opens from a laptop, a CI artifact or an email. It
reads the run directory's files and shows, in order: the headline numbers and the gate
verdict, the confusion-matrix heatmap, per-category accuracy against the baseline, the
calibration curve, training and validation loss, the ladder table, the cascade's curve
(with `cascade.json`: share of traffic per stage, accuracy, latency and cost per threshold
setting, the chosen one marked), and the worst examples (confidently wrong first) for a
human pass. A generation run's page (`evaluate.review_page`) shows its averages, the gate,
per-slice scores, the loss curves and a review form for the worst rows, whose one inline
script downloads the marks as the JSONL `taskling review --apply` reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from taskling.errors import RunError
from taskling.evaluate.baseline import Scored, check_same_gold, load_predictions, load_reference
from taskling.evaluate.cost import CascadeCurve, cascade_curve
from taskling.evaluate.metrics import Metrics
from taskling.evaluate.review_page import REVIEW_CSS, generation_sections
from taskling.io import read_json, read_jsonl, write_text
from taskling.rundir import GENERATION, RunDir

PALETTE = {"candidate": "#2563eb", "baseline": "#9ca3af", "val": "#dc2626", "train": "#2563eb"}


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (
        f'<svg class="chart" role="img" aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">' + "".join(body) + "</svg>"
    )


def _text(x: float, y: float, text: str, *, anchor: str = "start", size: int = 11, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {extra}>{escape(text)}</text>'


def _blue(fraction: float) -> str:
    """White to deep blue: a colour-blind-safe single-hue scale."""
    f = min(max(fraction, 0.0), 1.0)
    r, g, b = (int(255 + (t - 255) * f) for t in (30, 64, 175))
    return f"rgb({r},{g},{b})"


# ---------------------------------------------------------------- charts


def confusion_heatmap(metrics: Metrics) -> str:
    """Rows: gold; columns: predicted (the last, outside the label set). Shade: share of the row."""
    rows, cols = metrics.confusion_labels[:-1], metrics.confusion_labels
    cell = max(10.0, min(28.0, 560 / max(len(cols), 1)))
    left, top = 170.0, 150.0
    body = []
    for j, label in enumerate(cols):
        x = left + j * cell + cell / 2
        body.append(_text(x, top - 6, label[:24], size=10, extra=f'transform="rotate(-60 {x:.1f} {top - 6:.1f})"'))
    for i, label in enumerate(rows):
        y = top + i * cell
        body.append(_text(left - 6, y + cell * 0.7, label[:26], anchor="end", size=10))
        total = sum(metrics.confusion[i]) or 1
        for j, count in enumerate(metrics.confusion[i]):
            share = count / total
            x = left + j * cell
            body.append(
                f'<rect class="cell" x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" '
                f'fill="{_blue(share)}" stroke="#e5e7eb"><title>gold {escape(label)} -> '
                f"{escape(cols[j])}: {count} ({share:.0%})</title></rect>"
            )
            if count and cell >= 18:
                color = "#fff" if share > 0.5 else "#111"
                body.append(
                    _text(x + cell / 2, y + cell * 0.68, str(count), anchor="middle", size=9, extra=f'fill="{color}"')
                )
    body.append(_text(left, top + len(rows) * cell + 16, "rows: gold label; columns: predicted", size=10))
    return _svg(left + len(cols) * cell + 20, top + len(rows) * cell + 24, body, "confusion matrix heatmap")


def category_bars(metrics: Metrics, baseline: Metrics | None) -> str:
    """Per-category accuracy, worst first, with the baseline's bar beneath each."""
    present = [(k, v) for k, v in metrics.per_category.items() if v["support"]]
    ranked = sorted(present, key=lambda kv: (kv[1]["accuracy"], kv[0]))
    left, width, bar = 190.0, 360.0, 9.0
    step = bar * (2 if baseline else 1) + 8
    body = []
    for k, (label, row) in enumerate(ranked):
        y = 24 + k * step
        body.append(_text(left - 6, y + bar, f"{label[:26]} (n={int(row['support'])})", anchor="end", size=10))
        body.append(
            f'<rect class="bar candidate" x="{left}" y="{y:.1f}" width="{width * row["accuracy"]:.1f}" '
            f'height="{bar}" fill="{PALETTE["candidate"]}"><title>{escape(label)}: {row["accuracy"]:.1%}</title></rect>'
        )
        body.append(_text(left + width * row["accuracy"] + 4, y + bar - 1, f"{row['accuracy']:.0%}", size=9))
        if baseline is not None:
            ref = baseline.per_category.get(label, {}).get("accuracy", 0.0)
            body.append(
                f'<rect class="bar baseline" x="{left}" y="{y + bar:.1f}" width="{width * ref:.1f}" '
                f'height="{bar}" fill="{PALETTE["baseline"]}"><title>baseline {escape(label)}: {ref:.1%}</title></rect>'
            )
    legend = [
        f'<rect x="{left}" y="4" width="10" height="10" fill="{PALETTE["candidate"]}"/>',
        _text(left + 14, 13, "this run", size=10),
    ]
    if baseline is not None:
        legend += [
            f'<rect x="{left + 80}" y="4" width="10" height="10" fill="{PALETTE["baseline"]}"/>',
            _text(left + 94, 13, "baseline", size=10),
        ]
    return _svg(left + width + 50, 30 + len(ranked) * step, legend + body, "per-category accuracy")


def calibration_bins(probabilities: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict[str, float]]:
    """Equal-width confidence bins: mean confidence, accuracy and count of each non-empty bin."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probabilities) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if idx:
            out.append(
                {
                    "confidence": sum(probabilities[i] for i in idx) / len(idx),
                    "accuracy": sum(1 for i in idx if correct[i]) / len(idx),
                    "count": float(len(idx)),
                }
            )
    return out


def expected_calibration_error(bins: Sequence[dict[str, float]]) -> float:
    total = sum(b["count"] for b in bins) or 1.0
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins)


def calibration_curve(bins: Sequence[dict[str, float]]) -> str:
    size, pad = 300.0, 40.0
    body = [
        f'<rect x="{pad}" y="10" width="{size}" height="{size}" fill="none" stroke="#9ca3af"/>',
        f'<line x1="{pad}" y1="{10 + size}" x2="{pad + size}" y2="10" stroke="#9ca3af" stroke-dasharray="4 3"/>',
        _text(pad + size / 2, size + 40, "confidence (top label probability)", anchor="middle", size=10),
        _text(
            12, 10 + size / 2, "accuracy", anchor="middle", size=10, extra=f'transform="rotate(-90 12 {10 + size / 2})"'
        ),
    ]
    for t in (0.0, 0.5, 1.0):
        body.append(_text(pad + t * size, size + 24, f"{t:.1f}", anchor="middle", size=9))
        body.append(_text(pad - 4, 10 + size - t * size + 3, f"{t:.1f}", anchor="end", size=9))
    points = [(pad + b["confidence"] * size, 10 + size - b["accuracy"] * size, b) for b in bins]
    if points:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
        body.append(
            f'<polyline class="curve" points="{path}" fill="none" stroke="{PALETTE["candidate"]}" stroke-width="2"/>'
        )
    biggest = max((b["count"] for b in bins), default=1.0)
    for x, y, b in points:
        r = 3 + 5 * math.sqrt(b["count"] / biggest)
        body.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{PALETTE["candidate"]}"><title>confidence '
            f"{b['confidence']:.2f}, accuracy {b['accuracy']:.2f}, {int(b['count'])} rows</title></circle>"
        )
    return _svg(size + pad + 20, size + 50, body, "calibration curve")


def loss_curves(history: Sequence[dict[str, Any]]) -> str | None:
    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if not train and not val:
        return None
    width, height, left, top = 520.0, 240.0, 50.0, 16.0
    steps = [s for s, _ in train + val]
    losses = [v for _, v in train + val if math.isfinite(v)]
    max_step, lo, hi = max(max(steps), 1), min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0

    def xy(step: float, loss: float) -> tuple[float, float]:
        return left + step / max_step * width, top + (hi - loss) / (hi - lo) * height

    body = [
        f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#d1d5db"/>',
        _text(left - 4, top + 4, f"{hi:.2f}", anchor="end", size=9),
        _text(left - 4, top + height, f"{lo:.2f}", anchor="end", size=9),
        _text(left + width, top + height + 14, f"step {max_step}", anchor="end", size=9),
    ]
    for name, series in (("train", train), ("val", val)):
        if not series:
            continue
        pts = " ".join("{:.1f},{:.1f}".format(*xy(s, v)) for s, v in series if math.isfinite(v))
        body.append(
            f'<polyline class="curve {name}" points="{pts}" fill="none" stroke="{PALETTE[name]}" stroke-width="1.6"/>'
        )
        if name == "val":
            for s, v in series:
                x, y = xy(s, v)
                body.append(
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{PALETTE["val"]}">'
                    f"<title>step {s}: {v:.4f}</title></circle>"
                )
    body += [
        f'<rect x="{left + 10}" y="{top + 8}" width="10" height="3" fill="{PALETTE["train"]}"/>',
        _text(left + 24, top + 12, "train loss", size=10),
        f'<rect x="{left + 90}" y="{top + 8}" width="10" height="3" fill="{PALETTE["val"]}"/>',
        _text(left + 104, top + 12, "validation loss", size=10),
    ]
    return _svg(left + width + 20, top + height + 24, body, "training and validation loss")


def curve_chart(curve: CascadeCurve) -> str:
    """Accuracy against cost per million calls, one dot per threshold setting; the chosen one ringed."""
    left, top, width, height = 60, 12, 420, 220
    costs = [p.cost_per_million for p in curve.points]
    accs = [p.accuracy for p in curve.points]
    c0, c1 = min(costs), max(costs)
    a0, a1 = min(accs), max(accs)
    c1, a1 = (c1 if c1 > c0 else c0 + 1.0), (a1 if a1 > a0 else a0 + 0.01)

    def xy(cost: float, acc: float) -> tuple[float, float]:
        return left + (cost - c0) / (c1 - c0) * width, top + height - (acc - a0) / (a1 - a0) * height

    body = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#d1d5db"/>']
    for p in curve.points:
        x, y = xy(p.cost_per_million, p.accuracy)
        body.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{PALETTE["candidate"]}"/>')
        if p.chosen:
            body.append(f'<circle class="chosen" cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#dc2626"/>')
            body.append(_text(x + 12, y - 8, "chosen", size=10))
    body += [
        _text(left, top + height + 16, f"${c0:,.2f}", size=10),
        _text(left + width, top + height + 16, f"${c1:,.2f} per million calls", size=10, anchor="end"),
        _text(left - 6, top + height, f"{a0:.1%}", size=10, anchor="end"),
        _text(left - 6, top + 10, f"{a1:.1%}", size=10, anchor="end"),
    ]
    return _svg(left + width + 70, top + height + 26, body, "cascade accuracy against cost")


# ---------------------------------------------------------------- tables


def cascade_section(curve: CascadeCurve) -> str:
    """The curve as a table (every threshold setting) and a chart."""
    headers, rows = curve.rows()
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr{' class=chosen' if r[0] else ''}>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    note = f"<p>Stages in order: {escape(' -> '.join(curve.stages))}. Each row is one threshold setting.</p>"
    table = f'<table class="cascade"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return note + table + curve_chart(curve)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def ladder_table(ladder: dict[str, Any]) -> str:
    rows = []
    for r in ladder["rungs"]:
        clears = "-" if r["clears"] is None else ("clears" if r["clears"] else "no: " + r["why"])
        rows.append(
            [
                r["name"],
                f"{r['accuracy']:.2%}",
                f"{r['macro_f1']:.3f}",
                f"{r['worst_category']} ({r['worst_category_accuracy']:.0%})",
                f"{r['latency_ms']:.1f}",
                f"{r['messages_per_second']:.0f}",
                f"{r['memory_mb']:.1f}",
                clears,
            ]
        )
    headers = ["rung", "accuracy", "macro-F1", "worst category", "latency ms", "msg/s", "memory MB", "bar"]
    note = f"<p>bar: {escape(ladder['bar'])}; smallest that clears: <b>{escape(str(ladder['smallest']))}</b></p>"
    return note + _table(headers, rows, "ladder")


def worst_examples(rows: Sequence[dict[str, Any]], limit: int = 25) -> str:
    """Wrong answers, most confident first: where the model is surely wrong, a human looks first."""
    wrong = [r for r in rows if r["label"] != r["gold"]]
    wrong.sort(key=lambda r: -float(r.get("probability", 0.0)))
    if not wrong:
        return "<p>No wrong answers on this gold set.</p>"
    body = [
        [r["text"], r["gold"], r["label"], f"{float(r.get('probability', float('nan'))):.2f}"] for r in wrong[:limit]
    ]
    return f"<p>{len(wrong)} wrong of {len(rows)}; the {min(limit, len(wrong))} most confident:</p>" + _table(
        ["text", "gold", "predicted", "confidence"], body, "worst"
    )


def margins_table(verdict: dict[str, Any]) -> str:
    """The gate's non-inferiority margins beside the drops it observed (positive: the candidate is lower)."""
    ni = verdict.get("non_inferiority")
    if not ni:
        return ""
    drops = ni["category_drops"]
    worst = max(drops, key=lambda label: drops[label]) if drops else None
    rows = [["accuracy", f"{ni['margin']:.2%}", f"{ni['accuracy_drop']:+.2%}"]]
    if worst is not None:
        rows.append([f"worst category ({worst})", f"{ni['category_margin']:.0%}", f"{drops[worst]:+.0%}"])
    rows += [[f"category {label}", f"{ni['category_margin']:.0%}", f"{drops[label]:+.0%}"]
             for label in ni["categories_over_margin"] if label != worst]  # fmt: skip
    return _table(["non-inferiority", "margin (largest drop allowed)", "observed drop"], rows, "margins")


def gate_section(verdict: dict[str, Any]) -> str:
    status = "PASS" if verdict["passed"] else "FAIL"
    rows = [[c["name"], "pass" if c["passed"] else "FAIL", c["detail"]] for c in verdict["checks"]]
    head = f'<p class="verdict {status.lower()}">gate: {status} against {escape(verdict["reference"])}</p>'
    return head + _table(["check", "result", "why"], rows, "gate") + margins_table(verdict)


# ---------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;color:#111;
padding:0 1rem}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:2.2rem;border-bottom:1px solid #e5e7eb}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0} td,th{border:1px solid #e5e7eb;padding:.25rem .5rem;
text-align:left;vertical-align:top} th{background:#f9fafb} .headline td:first-child{color:#4b5563}
.verdict{font-weight:700;font-size:1.05rem} .pass{color:#15803d} .fail{color:#b91c1c} svg text{fill:#111}
.worst td:first-child{max-width:520px} tr.chosen td{font-weight:700;background:#fef2f2}
"""


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.is_file() else []


def _same_gold_inputs(
    scored: Scored, reference: Scored | None, verdict: tuple[Path, dict[str, Any]] | None, ladder: Path | None
) -> dict[str, Any] | None:
    """Refuse a baseline, gate.json or ladder scored on another gold set than the run; returns the ladder."""
    here = (scored.source, scored.gold_hash)
    if reference is not None:
        check_same_gold(here, (reference.source, reference.gold_hash), "show the baseline beside this run")
    if verdict is not None:
        check_same_gold(here, (verdict[0], verdict[1].get("gold_hash")), "show this gate verdict beside this run")
    if ladder is None:
        return None
    table = read_json(ladder)
    gold_file = table.get("gold_file")
    where = f"{ladder} (gold file {gold_file})" if gold_file else str(ladder)
    check_same_gold(here, (where, table.get("gold_hash")), "show this ladder beside this run")
    return dict(table)


def build_report(run_dir: str | Path, *, ladder: str | Path | None = None, baseline: str | Path | None = None) -> str:
    """The report page for a scored run directory, as an HTML string.

    A baseline, gate verdict or ladder scored on another gold set than the run is refused
    (`GoldMismatchError`): side by side, their numbers would not be comparable.
    """
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    if not run.predictions.is_file():
        raise RunError(
            f"{run_dir} has no predictions.jsonl", fix=f"score it first: taskling eval {run_dir} --data GOLD.jsonl"
        )
    if run.kind() == GENERATION:
        return generation_report(run_dir)
    base_path = Path(baseline) if baseline else run.baseline
    reference = load_reference(base_path) if base_path.exists() else None
    scored = load_predictions(run_dir, labels=reference.labels if reference else None)
    verdict = (run.gate, read_json(run.gate)) if run.gate.is_file() else None
    ladder_table_data = _same_gold_inputs(scored, reference, verdict, Path(ladder) if ladder else None)
    metrics = scored.metrics()
    rows = _read_rows(run.predictions)
    base_metrics = reference.metrics() if reference else None
    history = _read_rows(run.history)
    probs = [float(r.get("probability", 0.0)) for r in rows]
    bins = calibration_bins(probs, [r["label"] == r["gold"] for r in rows])

    headline = [
        ["gold rows", str(metrics.n)],
        ["accuracy", f"{metrics.accuracy:.2%}"],
        ["macro-F1", f"{metrics.macro_f1:.4f}"],
        ["worst category", f"{metrics.worst_category} ({metrics.worst_category_accuracy:.0%})"],
        ["outside the label set", f"{metrics.out_of_label_set_rate:.2%}"],
        ["expected calibration error", f"{expected_calibration_error(bins):.3f}"],
        ["gold hash", scored.gold_hash[:16]],
    ]
    if base_metrics is not None and reference is not None:
        headline.insert(2, [f"baseline ({reference.name}) accuracy", f"{base_metrics.accuracy:.2%}"])
    parts = [
        f"<h1>taskling report: {escape(run_dir.name)}</h1>",
        '<table class="headline"><tbody>'
        + "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in headline)
        + "</tbody></table>",
    ]
    if verdict is not None:
        parts.append(gate_section(verdict[1]))
    parts += [
        "<h2>Confusion matrix</h2>",
        confusion_heatmap(metrics),
        "<h2>Per-category accuracy" + (" against the baseline" if base_metrics else "") + "</h2>",
        category_bars(metrics, base_metrics),
        "<h2>Calibration</h2>",
        "<p>Each point is a confidence bin (size: rows in it); on the dashed line confidence equals accuracy.</p>",
        calibration_curve(bins),
    ]
    curves = loss_curves(history)
    parts += ["<h2>Training and validation loss</h2>", curves or "<p>No history.jsonl in this run directory.</p>"]
    if ladder_table_data is not None:
        parts += ["<h2>Ladder</h2>", ladder_table(ladder_table_data)]
    curve = cascade_curve(run_dir)
    if curve is not None:
        parts += ["<h2>Cascade: accuracy, latency and cost per threshold setting</h2>", cascade_section(curve)]
    parts += ["<h2>Worst examples</h2>", worst_examples(rows)]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>taskling report: {escape(run_dir.name)}</title><style>{CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def generation_report(run_dir: Path) -> str:
    """A generation run's page: averages, gate verdict, per-slice scores, loss curves, the review form."""
    run = RunDir(run_dir)
    top, review = generation_sections(run_dir)
    parts = [f"<h1>taskling report: {escape(run_dir.name)}</h1>", *top[:2]]
    if run.gate.is_file():
        parts.append(gate_section(read_json(run.gate)))
    curves = loss_curves(_read_rows(run.history))
    parts += [*top[2:], "<h2>Training and validation loss</h2>", curves or "<p>No history.jsonl.</p>", *review]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>taskling report: {escape(run_dir.name)}</title><style>{CSS}{REVIEW_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def write_report(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    ladder: str | Path | None = None,
    baseline: str | Path | None = None,
) -> Path:
    """Write `report.html` (or `out`) for a scored run directory; returns its path."""
    path = Path(out) if out else RunDir(run_dir).report
    write_text(path, build_report(run_dir, ladder=ladder, baseline=baseline), encoding="utf-8")
    return path
