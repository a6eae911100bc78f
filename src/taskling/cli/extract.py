"""Beyond one label: extract-train, extract, extract-eval, pairs, dpo (docs/extraction.md)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from taskling.cli.common import (
    app,
    console,
    friendly_errors,
    progress_bar,
    render_train_summary,
    shown,
    training_progress,
)
from taskling.errors import RunError


def _render_extraction(metrics: dict[str, Any], title: str = "extraction") -> None:
    head = Table(title=title, show_header=False)
    head.add_row("rows", str(metrics["n"]))
    head.add_row("whole-record exact match", f"{metrics['record_exact_match']:.2%}")
    head.add_row("worst field", f"{shown(metrics['worst_field'])} ({metrics['worst_field_accuracy']:.0%})")
    head.add_row("invalid outputs", f"{metrics['invalid_output_rate']:.2%}")
    console.print(head)
    fields = Table(title="per field")
    for col in ("field", "type", "exact match", "accuracy", "normalised match", "char F1", "ROUGE-L"):
        fields.add_column(col)
    for name, f in metrics["fields"].items():
        text = [f"{f[k]:.3f}" for k in ("normalised_match", "char_f1", "rouge_l")] if "char_f1" in f else ["-"] * 3
        acc = f"{f['accuracy']:.2%}" if "accuracy" in f else "-"
        fields.add_row(shown(name), shown(f["type"]), f"{f['exact_match']:.2%}", acc, *text)
    console.print(fields)


@app.command("extract-train")
@friendly_errors
def extract_train(
    config: Annotated[Path, typer.Argument(help="Extraction (or multi-output) YAML config.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides.")] = None,
) -> None:
    """Train a LoRA adapter that fills a schema's fields (see docs/extraction.md)."""
    from taskling.extract.schema import load_extraction_config
    from taskling.train.extraction import train_extraction

    cfg = load_extraction_config(config, overrides or [])
    with training_progress() as progress:
        result = train_extraction(cfg, progress=progress)
    render_train_summary(result)


@app.command()
@friendly_errors
def extract(
    run_dir: Annotated[Path, typer.Argument(help="An extraction run directory.")],
    text: Annotated[list[str], typer.Argument(help="Message(s) to extract from.")],
) -> None:
    """Extract one schema-valid JSON record per message."""
    import json

    from taskling.data.load import is_unicode
    from taskling.errors import DataError
    from taskling.extract.extractor import Extractor

    for number, message in enumerate(text, start=1):
        if not is_unicode(message):  # undecodable bytes on the command line arrive as lone surrogates
            raise DataError(
                f"message {number} is not valid UTF-8 text: {ascii(message)[:80]}",
                fix="pass UTF-8 text (check the terminal's or the calling program's encoding)",
            )
    extractor = Extractor.from_run(run_dir)
    # Progress (on stderr) when there is more than one message to wait for.
    with progress_bar("extract", "messages") if len(text) > 1 else nullcontext() as update:
        results = extractor.extract(text, progress=update)
    for result in results:
        # One JSON object per line, so the output pipes straight into jq or a JSONL file.
        typer.echo(json.dumps(result.record, ensure_ascii=False))


@app.command("extract-eval")
@friendly_errors
def extract_eval(
    run_dir: Annotated[Path, typer.Argument(help="An extraction run directory.")],
    data: Annotated[Path, typer.Option("--data", help="Gold JSONL: text + record.")],
    out: Annotated[Path | None, typer.Option("--out", help="Where metrics go (default RUN_DIR).")] = None,
) -> None:
    """Score an extraction run per field; writes metrics.json, predictions.jsonl and fields/."""
    from taskling.evaluate.extraction import evaluate_extraction

    result = evaluate_extraction(run_dir, data, out_dir=out)
    _render_extraction(result.metrics)
    console.print(f"wrote {shown(result.metrics_path)} and {shown(result.predictions_path)}")


@app.command()
@friendly_errors
def pairs(
    run_dir: Annotated[Path, typer.Argument(help="A trained (SFT) run directory.")],
    out: Annotated[Path | None, typer.Option("--out", help="Pairs file (default RUN_DIR/pairs.jsonl).")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Rows to mine (default the run's train rows).")] = None,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="Teacher answers: pair where we differ.")] = None,
    margin_below: Annotated[float, typer.Option(help="Also pair right answers with margin below this.")] = 0.0,
) -> None:
    """Build DPO chosen/rejected pairs from the run's mistakes and teacher disagreements."""
    from taskling.train.dpo import build_pairs

    path, counts = build_pairs(run_dir, out, data=data, teacher=teacher, margin_below=margin_below)
    console.print(
        f"wrote {counts['pairs']} pairs to {shown(path)}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    )


@app.command("dpo")
@friendly_errors
def dpo_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained (SFT) run directory.")],
    pairs_file: Annotated[Path, typer.Option("--pairs", help="Pairs JSONL from taskling pairs.")],
    out: Annotated[Path | None, typer.Option("--out", help="New run directory (default RUN_DIR-dpo).")] = None,
    gold: Annotated[Path | None, typer.Option("--gold", help="Gold file: compare before/after and gate.")] = None,
    beta: Annotated[float, typer.Option(help="DPO beta.")] = 0.1,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 5e-5,
    epochs: Annotated[float, typer.Option(help="Passes over the pairs.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Pairs per step.")] = 4,
) -> None:
    """Refine a run's adapter with DPO on preference pairs; with --gold, report if it helped."""
    from taskling.evaluate.refine import compare
    from taskling.train.dpo import dpo, run_kind

    if gold is not None and run_kind(run_dir) == "generation":
        raise RunError(
            "--gold compares classification and extraction runs; a generation run is gated on its task metric",
            fix="drop --gold; then taskling eval RUN_DIR-dpo GOLD.jsonl and taskling gate RUN_DIR-dpo",
        )
    with progress_bar("dpo", "steps") as update:
        result = dpo(
            run_dir, pairs_file, out, beta=beta, learning_rate=lr, epochs=epochs, batch_size=batch_size, progress=update
        )
    console.print(
        f"{shown(result.run_dir)}: {result.pairs} pairs, {result.steps} steps, loss {result.first_loss:.4f} -> "
        f"{result.last_loss:.4f}, chosen preferred on {result.reward_accuracy:.0%} of pairs"
    )
    if gold is None:
        return
    report = compare(run_dir, result.run_dir, gold)
    table = Table(title=f"did DPO help? accuracy {report['accuracy_before']:.2%} -> {report['accuracy_after']:.2%}")
    for col in ("category / field", "before", "after", "change", "support"):
        table.add_column(col)
    for name, row in sorted(report["per_category"].items(), key=lambda kv: kv[1]["delta"]):
        table.add_row(
            shown(name), f"{row['before']:.0%}", f"{row['after']:.0%}", f"{row['delta']:+.0%}", str(row["support"])
        )
    console.print(table)
    console.print("gate: " + ("[green]passed[/]" if report["gate_passed"] else "[red]failed[/]"))
