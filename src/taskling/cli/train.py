"""The core path: train, eval, classify, demo."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from taskling.cli.common import (
    app,
    console,
    friendly_errors,
    progress_bar,
    render_metrics,
    render_train_summary,
    training_progress,
)
from taskling.errors import DataError, TasklingError


@app.command()
@friendly_errors
def train(
    config: Annotated[Path, typer.Argument(help="Project config YAML.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides like train.epochs=2.")] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start over: remove the old run's files in run_dir instead of resuming.")
    ] = False,
) -> None:
    """Fine-tune a LoRA adapter as CONFIG says (a `task.kind: generate` config trains a generation run)."""
    from taskling.config import load_config
    from taskling.generate.spec import GENERATE, config_kind
    from taskling.train.sft import train as run_training

    if config_kind(config) == GENERATE:
        from taskling.cli.generate import train_generation_config

        train_generation_config(config, overrides or [])
        return
    cfg = load_config(config, overrides or [])
    with training_progress() as update:
        result = run_training(cfg, resume=not fresh, progress=update)
    render_train_summary(result)


@app.command("eval")
@friendly_errors
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    data: Annotated[
        Path, typer.Option("--data", help="Gold set: JSONL, CSV, Parquet, a datasets folder, hf:ORG/NAME:SPLIT.")
    ],
    batch_size: Annotated[int, typer.Option(help="Messages per forward pass.")] = 32,
    out: Annotated[Path | None, typer.Option("--out", help="Where metrics go (default: RUN_DIR).")] = None,
    quantize: Annotated[
        str | None, typer.Option(help="int8: score the int8 CPU classifier (default --out RUN_DIR/int8).")
    ] = None,
    embed: Annotated[
        bool, typer.Option("--embed/--no-embed", help="Generation runs: MiniLM similarity per row (slower).")
    ] = True,
    no_cascade: Annotated[bool, typer.Option("--no-cascade", help="The specialist alone (no cascade.json).")] = False,
) -> None:
    """Score a run on a gold file: writes metrics.json and predictions.jsonl (generation runs: docs/generate.md)."""
    from taskling.evaluate.metrics import evaluate
    from taskling.rundir import GENERATION, RunDir
    from taskling.serve.classifier import Classifier

    if RunDir(run_dir).kind() == GENERATION:
        from taskling.cli.generate import eval_generation_run

        eval_generation_run(run_dir, data, out, min(batch_size, 8), embed)
        return
    clf = Classifier.from_run(run_dir, quantize=quantize, cascade=not no_cascade)
    # A quantized classifier's scores never overwrite the run's own: gate one against the other.
    out = out or (run_dir / quantize if quantize else None)
    with progress_bar("eval", "rows") as update:
        result = evaluate(run_dir, data, out_dir=out, batch_size=batch_size, classifier=clf, progress=update)
    render_metrics(result.metrics)
    for name, s in json.loads(result.metrics_path.read_text()).get("stages", {}).items():
        console.print(Text(f"stage {name}: answered {s['share']:.1%} ({s['n']}), {s['accuracy']:.2%} right"))
    console.print(Text(f"wrote {result.metrics_path} and {result.predictions_path}"))


@dataclass
class Message:
    """One input of `classify`: where it came from (`line` 3, `argument` 1), its text, and why it cannot be used."""

    source: str
    number: int
    text: str
    problem: str | None = None


def check_message(source: str, number: int, text: str) -> Message:
    if not text.strip():
        return Message(source, number, text, "empty message")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Message(source, number, text, "not valid Unicode text (an unpaired surrogate)")
    return Message(source, number, text)


def read_lines(file: Path) -> list[Message]:
    """Every line of `file` ('-': stdin), blank ones included, so outputs line up with inputs."""
    if str(file) == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    else:
        try:
            data = file.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read the file ({err.strerror})", path=file, fix="check the --file path") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line starts no new one
    messages = []
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            messages.append(Message("line", number, "", f"not UTF-8 text (byte {raw[exc.start]:#04x})"))
            continue
        messages.append(check_message("line", number, text))
    return messages


def render_prediction(pred: Any, top: int, as_json: bool) -> None:
    ranked = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])[:top]
    if as_json:
        row = {"text": pred.text, "label": pred.label, "top": dict(ranked)}
        typer.echo(json.dumps(row | ({"stage": pred.stage} if pred.stage else {}), ensure_ascii=False))
        return
    alts = ", ".join(f"{label} {p:.2f}" for label, p in ranked)
    where = f" [{pred.stage}]" if getattr(pred, "stage", None) else ""  # the cascade stage that decided
    console.print(Text.assemble((pred.label, "bold"), where, "  ", (alts, "dim"), "  ", pred.text), soft_wrap=True)


def render_problem(message: Message, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({message.source: message.number, "error": message.problem}))
    else:
        console.print(Text(f"{message.source} {message.number}: {message.problem}", style="bold red"))


@app.command()
@friendly_errors
def classify(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    texts: Annotated[list[str] | None, typer.Argument(help="Messages to classify.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="One message a line ('-' for stdin).")] = None,
    top: Annotated[int, typer.Option(help="Show this many labels with probabilities.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic int8 on the CPU (faster, measure it).")] = None,
    abstain: Annotated[
        bool, typer.Option("--abstain", help="Answer `unknown` under the run's abstain.json (taskling calibrate).")
    ] = False,
    no_cascade: Annotated[bool, typer.Option("--no-cascade", help="The specialist alone (no cascade.json).")] = False,
) -> None:
    """Classify messages: the answer is always one label of the set (or `unknown` with --abstain), with probabilities.

    One output row per input, in order: the arguments, then every line of --file. An empty
    line (or one that is not UTF-8 text) gets a flagged row in its place, e.g. JSON
    {"line": 3, "error": "empty message"}, and the exit code is then 1. Exit code 0: every
    message classified; 2: nothing could be classified (no run, no input).
    """
    from taskling.serve.abstain import AbstainingClassifier, load_threshold
    from taskling.serve.classifier import Classifier

    messages = [check_message("argument", i, t) for i, t in enumerate(texts or [], start=1)]
    if file is not None:
        messages += read_lines(file)
    if not messages:
        raise TasklingError("nothing to classify", fix="give messages as arguments or --file messages.txt")
    threshold = load_threshold(run_dir) if abstain else None  # a missing abstain.json fails before the model loads
    clf: Any = Classifier.from_run(run_dir, quantize=quantize, cascade=not no_cascade)
    if threshold is not None:
        clf = AbstainingClassifier(clf, threshold)
    good = [m for m in messages if m.problem is None]
    # Progress only for --file: a few arguments take no time, and their output is the answer.
    with progress_bar("classify", "messages") if file is not None else nullcontext() as update:
        predictions = iter(clf.predict([m.text for m in good], progress=update) if good else [])
    for message in messages:
        if message.problem is None:
            render_prediction(next(predictions), top, as_json)
        else:
            render_problem(message, as_json)
    if len(good) < len(messages):
        raise typer.Exit(1)


@app.command()
@friendly_errors
def demo(
    run_dir: Annotated[Path, typer.Option(help="Where the demo run goes.")] = Path("runs/demo"),
    data_dir: Annotated[Path | None, typer.Option(help="CLINC150 folder (default: ../shared/data/clinc150).")] = None,
    intents: Annotated[int, typer.Option(help="How many CLINC150 intents.")] = 20,
    train_per_intent: Annotated[int, typer.Option(help="Training rows per intent.")] = 40,
    epochs: Annotated[float, typer.Option(help="Training epochs.")] = 2.0,
    base: Annotated[str, typer.Option(help="Base model.")] = "bundled:smollm2-135m",
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="A config override, e.g. --set model.head=linear (repeatable).")
    ] = None,
) -> None:
    """Run the whole path on CLINC150 with the bundled SmolLM2-135M and print a report card."""
    from taskling.config import build_config, merge, parse_overrides
    from taskling.data.demo import prepare_demo
    from taskling.evaluate.metrics import evaluate
    from taskling.train.sft import train as run_training

    config, gold = prepare_demo(
        run_dir, data_dir=data_dir, intents=intents, train_per_intent=train_per_intent, epochs=epochs, base=base
    )
    if overrides:
        config = build_config(merge(config.model_dump(mode="json"), parse_overrides(overrides)), source="--set")
    console.print(
        Text.assemble(
            ("demo", "bold"), f": {intents} CLINC150 intents, {train_per_intent} training rows each, base {base}"
        )
    )
    with training_progress() as update:
        result = run_training(config, resume=False, progress=update)
    render_train_summary(result)
    evaluation = evaluate(run_dir, gold)
    render_metrics(evaluation.metrics, title=f"report card: held-out CLINC150 test rows ({gold})")
    metrics = evaluation.metrics
    console.print(
        Text.assemble(
            (f"demo accuracy: {metrics.accuracy:.2%}", "bold green"),
            f" on {metrics.n} held-out rows ({metrics.n / evaluation.seconds:.0f} messages/s)",
        )
    )
