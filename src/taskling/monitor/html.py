"""The drift report as one self-contained HTML page: tables and inline SVG time series.

No scripts, no external assets: the page opens from disk, attaches to an email, or sits
in a CI artifact. Each series plots one value per bucket of consecutive log rows; the
dashed vertical line marks where the monitored window starts, the red line the threshold.
"""

from __future__ import annotations

import html
import math
from typing import Any

from taskling.monitor.config import DriftReport

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
.alarm{color:#b00;font-weight:bold}.ok{color:#070}.charts{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}figcaption{font-size:90%;color:#555}
"""


def _svg(series: list[dict[str, Any]], key: str, threshold: float | None, start_index: int) -> str:
    width, height, pad = 320, 140, 28
    points = [(s["first_row"], s[key]) for s in series if s.get(key) is not None and not math.isnan(s[key])]
    if not points:
        return "<svg width='320' height='140'><text x='10' y='70'>no data</text></svg>"
    last = max(s["first_row"] + s["n"] for s in series)
    values = [v for _, v in points] + ([threshold] if threshold is not None else [])
    lo, hi = min(0.0, *values), max(values) or 1.0
    hi = hi if hi > lo else lo + 1.0

    def x(row: float) -> float:
        return pad + (width - 2 * pad) * row / max(last, 1)

    def y(value: float) -> float:
        return height - pad - (height - 2 * pad) * (value - lo) / (hi - lo)

    line = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in points)
    parts = [
        f"<svg width='{width}' height='{height}' role='img' aria-label='{html.escape(key)}'>",
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#999'/>",
        f"<text x='2' y='{pad}' font-size='10'>{hi:.3g}</text>",
        f"<text x='2' y='{height - pad}' font-size='10'>{lo:.3g}</text>",
        f"<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{line}'/>",
    ]
    if start_index:
        sx = x(start_index)
        parts.append(
            f"<line x1='{sx:.1f}' y1='{pad / 2}' x2='{sx:.1f}' y2='{height - pad}' stroke='#555' stroke-dasharray='4'/>"
        )
    if threshold is not None:
        ty = y(threshold)
        parts.append(f"<line x1='{pad}' y1='{ty:.1f}' x2='{width - pad}' y2='{ty:.1f}' stroke='#d62728'/>")
    parts.append(f"<text x='{pad}' y='{height - 8}' font-size='10'>request #0 .. #{last}</text></svg>")
    return "".join(parts)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def render_html(report: DriftReport) -> str:
    esc = html.escape
    cfg = report.config
    status = "<span class='alarm'>ALARM</span>" if report.alarm else "<span class='ok'>quiet</span>"
    rows = "".join(
        f"<tr><td>{esc(s.name)}</td><td class='{'alarm' if s.alarm else 'ok'}'>{'ALARM' if s.alarm else 'ok'}</td>"
        f"<td>{_num(s.value)}</td><td>{_num(s.threshold)}</td>"
        f"<td>{esc(s.detail)}</td></tr>"
        for s in report.signals
    )
    cats = "".join(
        f"<tr><td>{esc(c.label)}</td><td>{c.train_share:.1%}</td><td>{c.window_share:.1%}</td><td>{c.count}</td>"
        f"<td>{c.psi:.4f}</td><td>{c.residual:+.1f}</td></tr>"
        for c in report.categories[:15]
    )
    ood = "".join(
        f"<tr><td>{esc(e['text'])}</td><td>{esc(e['label'])}</td><td>{e['max_similarity']:.3f}</td></tr>"
        for e in report.ood_examples
    )
    plots: tuple[tuple[str, Any, str], ...] = (
        ("confidence", None, "mean top probability"),
        ("low_margin_share", None, f"share of answers with margin < {cfg['low_margin']}"),
        ("ood_share", cfg["ood_share_max"], "share of out-of-distribution inputs"),
        ("psi", cfg["psi_max"], "PSI of predicted labels vs training"),
    )
    if any("validity_rate" in s for s in report.series):  # a generation run: no labels, no probabilities
        plots = (
            ("validity_rate", None, "format validity rate"),
            ("mean_tokens", None, "mean answer tokens"),
            ("ood_share", cfg["ood_share_max"], "share of out-of-distribution inputs"),
        )
    charts = "".join(
        f"<figure>{_svg(report.series, key, thr, report.window_start_index)}"
        f"<figcaption>{esc(title)}</figcaption></figure>"
        for key, thr, title in plots
    )
    w = report.window
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>taskling drift report</title>
<style>{_STYLE}</style></head><body>
<h1>Drift report: {status}</h1>
<p>{esc(report.run_dir)} &middot; window {esc(str(w["start"]))} .. {esc(str(w["end"]))} &middot; {w["rows"]} requests
(plus {w["context_rows"]} before it for context) &middot; generated {esc(report.created)}</p>
<h2>Checks</h2><table><tr><th>check</th><th>status</th><th>value</th><th>threshold</th><th>detail</th></tr>{rows}</table>
<h2>Over time</h2><div class='charts'>{charts}</div>
<h2>Predicted labels vs training (largest PSI first)</h2>
<table>
<tr><th>label</th><th>train share</th><th>window share</th><th>count</th><th>PSI</th><th>residual</th></tr>
{cats}</table>
<h2>Least familiar inputs</h2>
<table><tr><th>text</th><th>answer</th><th>max similarity to training</th></tr>{ood}</table>
</body></html>
"""
