"""The core path: train, eval, classify, demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from taskling.cli.common import (
    _train_summary,
    app,
    console,
    friendly_errors,
    render_metrics,
    training_progress,
)
from taskling.errors import TasklingError


@app.command()
@friendly_errors
def train(
    config: Annotated[Path, typer.Argument(help="Project config YAML.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides like train.epochs=2.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint.")] = False,
) -> None:
    """Fine-tune a LoRA adapter as CONFIG says."""
    from taskling.config import load_config
    from taskling.train.sft import train as run_training

    cfg = load_config(config, overrides or [])
    with training_progress() as update:
        result = run_training(cfg, resume=not fresh, progress=update)
    _train_summary(result)


@app.command("eval")
@friendly_errors
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    data: Annotated[Path, typer.Option("--data", help="Gold JSONL/CSV to score on.")],
    batch_size: Annotated[int, typer.Option(help="Messages per forward pass.")] = 32,
    out: Annotated[Path | None, typer.Option("--out", help="Where metrics go (default: RUN_DIR).")] = None,
    quantize: Annotated[
        str | None, typer.Option(help="int8: score the int8 CPU classifier (default --out RUN_DIR/int8).")
    ] = None,
) -> None:
    """Score a run on a gold file: writes metrics.json and predictions.jsonl."""
    from taskling.evaluate.metrics import evaluate
    from taskling.serve.classifier import Classifier

    clf = Classifier.from_run(run_dir, quantize=quantize)
    # A quantized classifier's scores never overwrite the run's own: gate one against the other.
    out = out or (run_dir / quantize if quantize else None)
    result = evaluate(run_dir, data, out_dir=out, batch_size=batch_size, classifier=clf)
    render_metrics(result.metrics)
    console.print(f"wrote {result.metrics_path} and {result.predictions_path}")


@app.command()
@friendly_errors
def classify(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    texts: Annotated[list[str] | None, typer.Argument(help="Messages to classify.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="One message a line ('-' for stdin).")] = None,
    top: Annotated[int, typer.Option(help="Show this many labels with probabilities.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic int8 on the CPU (faster, measure it).")] = None,
) -> None:
    """Classify messages: the answer is always one label of the set, with probabilities."""
    import json

    from taskling.serve.classifier import Classifier

    items = list(texts or [])
    if file is not None:
        stream = sys.stdin if str(file) == "-" else file.open(encoding="utf-8")
        items += [line.rstrip("\n") for line in stream if line.strip()]
    if not items:
        raise TasklingError("nothing to classify", fix="give messages as arguments or --file messages.txt")
    clf = Classifier.from_run(run_dir, quantize=quantize)
    for pred in clf.predict(items):
        ranked = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])[:top]
        if as_json:
            typer.echo(json.dumps({"text": pred.text, "label": pred.label, "top": dict(ranked)}, ensure_ascii=False))
        else:
            alts = ", ".join(f"{label} {p:.2f}" for label, p in ranked)
            console.print(f"[bold]{pred.label}[/]  [dim]{alts}[/]  {pred.text}")


@app.command()
@friendly_errors
def demo(
    run_dir: Annotated[Path, typer.Option(help="Where the demo run goes.")] = Path("runs/demo"),
    data_dir: Annotated[Path | None, typer.Option(help="CLINC150 folder (default: ../shared/data/clinc150).")] = None,
    intents: Annotated[int, typer.Option(help="How many CLINC150 intents.")] = 20,
    train_per_intent: Annotated[int, typer.Option(help="Training rows per intent.")] = 40,
    epochs: Annotated[float, typer.Option(help="Training epochs.")] = 2.0,
    base: Annotated[str, typer.Option(help="Base model.")] = "bundled:smollm2-135m",
) -> None:
    """Run the whole path on CLINC150 with the bundled SmolLM2-135M and print a report card."""
    from taskling.data.demo import prepare_demo
    from taskling.evaluate.metrics import evaluate
    from taskling.train.sft import train as run_training

    config, gold = prepare_demo(
        run_dir, data_dir=data_dir, intents=intents, train_per_intent=train_per_intent, epochs=epochs, base=base
    )
    console.print(f"[bold]demo[/]: {intents} CLINC150 intents, {train_per_intent} training rows each, base {base}")
    with training_progress() as update:
        result = run_training(config, resume=False, progress=update)
    _train_summary(result)
    evaluation = evaluate(run_dir, gold)
    render_metrics(evaluation.metrics, title=f"report card: held-out CLINC150 test rows ({gold})")
    console.print(
        f"[bold green]demo accuracy: {evaluation.metrics.accuracy:.2%}[/] on {evaluation.metrics.n} held-out rows "
        f"({evaluation.metrics.n / evaluation.seconds:.0f} messages/s)"
    )
