"""`review`: a generation run's worst gold rows for a person to mark, and the marks applied."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from taskling.cli.common import app, console, err_console, friendly_errors


@app.command()
@friendly_errors
def review(
    run_dir: Annotated[Path, typer.Argument(help="A generation run scored with `taskling eval` (predictions.jsonl).")],
    worst: Annotated[int, typer.Option("--worst", "-n", help="How many of the worst rows to list.")] = 20,
    metric: Annotated[
        str | None, typer.Option(help="The per-row metric to rank by (default: execution for SQL, else rouge_l).")
    ] = None,
    apply: Annotated[
        Path | None,
        typer.Option("--apply", help="A marked review file: write gold rows, training rows and DPO pairs from it."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where the review file goes (default RUN_DIR/review.jsonl).")] = None,
) -> None:
    """List the worst rows (invalid, lowest metric, disagreeing with the teacher) to review, or apply the marks.

    Mark each row of the review file: "mark": "acceptable", "wrong" or "fixed" (with the
    right text in "fixed"); then `taskling review RUN_DIR --apply RUN_DIR/review.jsonl`.
    """
    from taskling.generate.review import apply_review, write_review

    if apply is not None:
        done = apply_review(run_dir, apply)
        marks = ", ".join(f"{v} {k}" for k, v in done.marks.items())
        console.print(Text(f"{done.rows} marked rows ({marks}), {done.unmarked} unmarked and skipped"))
        console.print(Text(f"gold rows: {done.gold_path}\ntraining rows: {done.train_path}"))
        console.print(Text(f"DPO pairs: {done.pairs_path} ({done.pairs} pairs)"))
        if done.gold_file and done.rows:
            err_console.print(
                Text(
                    f"note: these texts come from the gold set {done.gold_file}: make the gold rows its next "
                    "version; train on them only once a different gold set is the bar"
                )
            )
        return
    written = write_review(run_dir, worst, metric=metric, out=out)
    table = Table(title=f"{written.rows} of {written.candidates} rows to review (by {written.metric})")
    for col in ("id", "score", "reasons", "output"):
        table.add_column(col)
    from taskling.io import iter_jsonl

    for _, row in iter_jsonl(written.path):
        table.add_row(str(row["id"]), f"{row['score']:.3f}", "; ".join(row["reasons"]), Text(str(row["output"])[:60]))
    console.print(table)
    console.print(Text(f"wrote {written.path}: set each row's mark (acceptable, wrong, fixed), then --apply it"))
