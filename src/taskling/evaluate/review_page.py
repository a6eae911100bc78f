"""The generation run's part of `report.html`: headline metrics, per-slice scores, the review form.

`generation_sections(run_dir)` returns the HTML sections `evaluate.report` puts on a
generation run's page: the averages from `metrics.json`, the per-slice table (worst slice
named), and "Review": the worst rows, ranked exactly as `taskling review` ranks them
(`generate.review.review_candidates`), each with its input, the model's text, the
reference and the metric, a choice acceptable / wrong / fixed and a box for the fixed text.
A button downloads the marks as `review.jsonl`, the very rows `taskling review RUN --apply
FILE` reads. The page stays self-contained: the rows travel as JSON inside the page (with
`<`, `>` and `&` escaped so no text can close the script), the download is a plain Blob,
nothing is fetched, and every user string in the HTML goes through `html.escape`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from taskling.generate.review import MARKS, review_candidates
from taskling.io import read_json
from taskling.rundir import RunDir

REVIEW_ROWS = 20  # as `taskling review --worst`

REVIEW_CSS = """
.review td{max-width:300px;white-space:pre-wrap;word-break:break-word} .review textarea{width:95%;min-height:3em}
.review label{display:block;white-space:nowrap}
"""

# Reads the marks off the form into the review rows (the JSON above it) and downloads them as JSONL.
REVIEW_JS = """
function reviewJsonl() {
  const rows = JSON.parse(document.getElementById('review-data').textContent);
  return rows.map(function (row) {
    const picked = document.querySelector('input[name="mark-' + row.id + '"]:checked');
    const fixed = document.getElementById('fixed-' + row.id).value;
    const mark = picked ? picked.value : null;
    return JSON.stringify(Object.assign({}, row, {mark: mark, fixed: mark === 'fixed' ? fixed : null}));
  }).join('\\n') + '\\n';
}
function downloadReview() {
  const blob = new Blob([reviewJsonl()], {type: 'application/x-ndjson'});
  const link = document.createElement('a');
  link.href = URL.createObjectURL(blob);
  link.download = 'review.jsonl';
  document.body.appendChild(link);
  link.click();
  link.remove();
}
document.getElementById('review-download').addEventListener('click', downloadReview);
"""


def script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no `<`, `>` or `&` that could end it or open a comment."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _cells(cells: Sequence[str]) -> str:
    return "".join(f"<td>{c}</td>" for c in cells)


def review_row(row: dict[str, Any]) -> str:
    """One table row: input, output, reference, metric and reasons, the mark and the fixed text."""
    rid = int(row["id"])
    choices = "".join(f'<label><input type="radio" name="mark-{rid}" value="{mark}"> {mark}</label>' for mark in MARKS)
    fixed = f'<textarea id="fixed-{rid}" aria-label="fixed text for row {rid}">{escape(str(row["gold"]))}</textarea>'
    score = f"{row['metric']} {float(row['score']):.3f}<br>{escape('; '.join(row['reasons']))}"
    teacher = "" if row.get("teacher") is None else f"<br><i>teacher:</i> {escape(str(row['teacher']))}"
    cells = [str(rid), escape(str(row["text"])), escape(str(row["output"])) + teacher, escape(str(row["gold"])), score]
    return f'<tr id="review-{rid}">' + _cells([*cells, choices + fixed]) + "</tr>"


def review_section(run_dir: str | Path, limit: int = REVIEW_ROWS) -> str:
    """The review form for the `limit` worst rows, or a line saying there is nothing to review."""
    candidates = review_candidates(run_dir)
    if not candidates:
        return "<p>Every gold row is right, in format and in agreement with the teacher: nothing to review.</p>"
    rows = candidates[:limit]
    head = "".join(f"<th>{h}</th>" for h in ("id", "input", "model output", "reference", "metric", "mark"))
    note = (
        f"<p>The {len(rows)} worst of {len(candidates)} rows that are not plainly right, worst first (as "
        f"<code>taskling review</code> ranks them). Mark each acceptable, wrong or fixed (edit the text); "
        "unmarked rows are skipped. Download the marks, then run "
        f"<code>taskling review {escape(str(run_dir))} --apply review.jsonl</code>.</p>"
    )
    return (
        note
        + f'<table class="review"><thead><tr>{head}</tr></thead><tbody>'
        + "".join(review_row(r) for r in rows)
        + "</tbody></table>"
        + '<p><button type="button" id="review-download">Download marks (review.jsonl)</button></p>'
        + f'<script type="application/json" id="review-data">{script_json(rows)}</script>'
        + f"<script>{REVIEW_JS}</script>"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def generation_sections(run_dir: str | Path) -> tuple[list[str], list[str]]:
    """(headline and per-slice sections, the review section) of a scored generation run."""
    run = RunDir(run_dir)
    metrics = read_json(run.metrics) if run.metrics.is_file() else {}
    metric = str(metrics.get("metric", "rouge_l"))
    headline = [["gold rows", str(metrics.get("n", "?"))]]
    headline += [[name, f"{float(value):.4f}"] for name, value in sorted(metrics.get("means", {}).items())]
    if "worst_slice" in metrics:
        headline.append(["worst slice", f"{metrics['worst_slice']} ({metric} {metrics['worst_slice_score']:.3f})"])
    if "gold_hash" in metrics:
        headline.append(["gold hash", str(metrics["gold_hash"])[:16]])
    top = [f"<p>primary metric: <b>{escape(metric)}</b></p>", _table(["", ""], headline, "headline")]
    slices = metrics.get("per_slice", {})
    if slices:
        rows = [[name, str(int(s.get("n", 0))), f"{s.get(metric, float('nan')):.3f}", f"{s.get('valid', 1.0):.0%}"]
                for name, s in sorted(slices.items(), key=lambda kv: (kv[1].get(metric, 0.0), kv[0]))]  # fmt: skip
        top += ["<h2>Per slice (worst first)</h2>", _table(["slice", "rows", metric, "valid"], rows, "slices")]
    return top, ["<h2>Review</h2>", review_section(run_dir)]
