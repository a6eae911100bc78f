"""The `taskling` command: a thin Typer layer over the library.

Each command parses its arguments, calls one library function and renders the result.
User mistakes (`TasklingError`) print as a message and a fix, never a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from taskling.data import write_text_atomic
from taskling.errors import TasklingError

app = typer.Typer(help="Fine-tune small specialist models for narrow, high-volume tasks.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )
    logging.getLogger("taskling").setLevel(logging.INFO)
    for noisy in ("transformers", "peft", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # transformers' own per-load progress bars and deprecation chatter drown the report.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def friendly_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TasklingError as err:
            err_console.print(f"[bold red]error:[/] {err.message}")
            if err.fix:
                err_console.print(f"[yellow]fix:[/] {err.fix}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")] = False) -> None:
    _setup_logging(verbose)


@contextmanager
def training_progress() -> Iterator[Callable[[int, int, dict[str, float]], None]]:
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        task_id = bar.add_task("train", total=None, loss=float("nan"), rate=0.0)

        def update(step: int, total: int, info: dict[str, float]) -> None:
            bar.update(task_id, completed=step, total=total, loss=info["loss"], rate=info["tokens_per_s"])

        yield update


def _train_summary(result: Any) -> None:
    table = Table(title="training", show_header=False)
    table.add_row("run directory", str(result.run_dir))
    table.add_row(
        "rows (train / validation / skipped)", f"{result.train_rows} / {result.validation_rows} / {result.skipped_rows}"
    )
    table.add_row("optimizer steps", str(result.steps))
    best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f} at step {result.best_step}"
    table.add_row("best validation loss", best)
    table.add_row("stopped early", "yes" if result.stopped_early else "no")
    table.add_row("training tokens/s", f"{result.tokens_per_second:.0f}")
    console.print(table)


def render_metrics(metrics: Any, title: str = "evaluation", top: int = 10) -> None:
    """The report card: headline numbers, then the weakest categories."""
    head = Table(title=title, show_header=False)
    head.add_row("rows", str(metrics.n))
    head.add_row("accuracy", f"{metrics.accuracy:.2%}")
    head.add_row("macro-F1", f"{metrics.macro_f1:.4f}")
    head.add_row("worst category", f"{metrics.worst_category} ({metrics.worst_category_accuracy:.0%})")
    head.add_row("outside the label set", f"{metrics.out_of_label_set_rate:.2%}")
    console.print(head)
    cats = Table(title=f"weakest {min(top, len(metrics.per_category))} categories")
    for col in ("category", "accuracy", "precision", "F1", "support", "most confused with"):
        cats.add_column(col)
    labels = metrics.confusion_labels
    ranked = sorted(metrics.per_category.items(), key=lambda kv: (kv[1]["accuracy"], kv[0]))
    for label, row in ranked[:top]:
        i = labels.index(label)
        counts = [(c, labels[j]) for j, c in enumerate(metrics.confusion[i]) if j != i and c]
        confused = f"{max(counts)[1]} ({max(counts)[0]})" if counts else "-"
        cats.add_row(
            label,
            f"{row['accuracy']:.0%}",
            f"{row['precision']:.0%}",
            f"{row['f1']:.3f}",
            str(int(row["support"])),
            confused,
        )
    console.print(cats)


@app.command()
@friendly_errors
def train(
    config: Annotated[Path, typer.Argument(help="Project config YAML.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides like train.epochs=2.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint.")] = False,
) -> None:
    """Fine-tune a LoRA adapter as CONFIG says."""
    from taskling.config import load_config
    from taskling.train import train as run_training

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
) -> None:
    """Score a run on a gold file: writes metrics.json and predictions.jsonl."""
    from taskling.evaluate import evaluate

    result = evaluate(run_dir, data, batch_size=batch_size)
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
) -> None:
    """Classify messages: the answer is always one label of the set, with probabilities."""
    import json

    from taskling.predict import Classifier

    items = list(texts or [])
    if file is not None:
        stream = sys.stdin if str(file) == "-" else file.open(encoding="utf-8")
        items += [line.rstrip("\n") for line in stream if line.strip()]
    if not items:
        raise TasklingError("nothing to classify", fix="give messages as arguments or --file messages.txt")
    clf = Classifier.from_run(run_dir)
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
    from taskling.demo import prepare_demo
    from taskling.evaluate import evaluate
    from taskling.train import train as run_training

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


# ---------------------------------------------------------------- the bar (docs/bar.md)


def _render_verdict(verdict: Any) -> None:
    color = "green" if verdict.passed else "red"
    console.print(
        f"[bold {color}]{'PASS' if verdict.passed else 'FAIL'}[/]: {verdict.candidate} vs {verdict.reference} "
        f"on {verdict.n} gold rows (gold {verdict.gold_hash[:12]})"
    )
    level = 1 - verdict.thresholds["alpha"]
    acc = Table(title=f"accuracy ({level:.0%} bootstrap CI)", show_header=False)
    ref, cand, delta = verdict.reference_accuracy, verdict.candidate_accuracy, verdict.delta
    acc.add_row(verdict.reference, f"{ref.estimate:.2%}  [{ref.low:.2%}, {ref.high:.2%}]")
    acc.add_row(verdict.candidate, f"{cand.estimate:.2%}  [{cand.low:.2%}, {cand.high:.2%}]")
    acc.add_row("difference", f"{delta.estimate:+.2%}  [{delta.low:+.2%}, {delta.high:+.2%}]")
    b, c = verdict.discordant
    acc.add_row(
        verdict.thresholds["test"],
        f"p={verdict.p_value:.3g} ({b} rows lost, {c} gained): {verdict.assessment}",
    )
    console.print(acc)
    moved = [cat for cat in verdict.categories if cat.candidate != cat.reference]
    if moved:
        cats = Table(title="categories that changed")
        for col in ("category", "n", "reference", "candidate", f"change ({level:.0%} CI)", "p", ""):
            cats.add_column(col)
        for cat in sorted(moved, key=lambda cat: cat.delta.estimate):
            cats.add_row(
                cat.label,
                str(cat.support),
                f"{cat.reference:.0%}",
                f"{cat.candidate:.0%}",
                f"{cat.delta.estimate:+.0%} [{cat.delta.low:+.0%}, {cat.delta.high:+.0%}]",
                f"{cat.p_value:.3g}",
                "[red]regressed[/]" if cat.regressed else "",
            )
        console.print(cats)
    checks = Table(title="checks")
    for col in ("check", "result", "why"):
        checks.add_column(col)
    for check in verdict.checks:
        checks.add_row(check.name, "[green]pass[/]" if check.passed else "[red]FAIL[/]", check.detail)
    console.print(checks)


@app.command()
@friendly_errors
def baseline(
    run_dir: Annotated[Path, typer.Argument(help="Run directory to pin the baseline in (writes baseline.json).")],
    gold: Annotated[Path, typer.Option("--gold", help="The gold file.")],
    predictions: Annotated[
        Path, typer.Option("--predictions", help="The reference system's labels: JSONL with text and label.")
    ],
    labels: Annotated[
        str | None, typer.Option("--labels", help="Label set (file or a,b,c); default: RUN_DIR/run.json.")
    ] = None,
    name: Annotated[str, typer.Option(help="Name of the reference system.")] = "teacher",
    repin: Annotated[bool, typer.Option("--repin", help="Replace an existing baseline on purpose.")] = False,
) -> None:
    """Score a reference system (the teacher) on the gold set once and pin it, with the gold hash."""
    from taskling.bar import pin_baseline, read_labels
    from taskling.evaluate import Metrics

    payload = pin_baseline(
        run_dir, gold, predictions, labels=read_labels(labels) if labels else None, name=name, repin=repin
    )
    render_metrics(Metrics(**payload["metrics"]), title=f"baseline: {name}")
    console.print(f"pinned {run_dir / 'baseline.json'} on gold {payload['gold_hash'][:12]} ({payload['n']} rows)")


@app.command()
@friendly_errors
def gate(
    candidate: Annotated[Path, typer.Argument(help="Candidate run directory (or its predictions.jsonl).")],
    against: Annotated[
        Path | None,
        typer.Option(help="baseline.json, a run dir with one, or a previous run (default: CANDIDATE/baseline.json)."),
    ] = None,
    gold: Annotated[Path | None, typer.Option("--gold", help="Check this gold file still has the pinned hash.")] = None,
    margin: Annotated[float, typer.Option(help="Allowed accuracy drop (0.01 = one point).")] = 0.01,
    category_tolerance: Annotated[float, typer.Option(help="Allowed accuracy drop in any category.")] = 0.10,
    alpha: Annotated[float, typer.Option(help="Significance level of the paired tests.")] = 0.05,
    exact: Annotated[bool, typer.Option("--exact", help="McNemar exact p instead of mid-p (stricter).")] = False,
) -> None:
    """Exit 0 if CANDIDATE holds the bar, 1 if not (2: usage error). Writes gate.json."""
    from taskling.bar import gate_paths

    verdict = gate_paths(
        candidate,
        against,
        gold_file=gold,
        margin=margin,
        category_tolerance=category_tolerance,
        alpha=alpha,
        mid_p=not exact,
    )
    _render_verdict(verdict)
    if not verdict.passed:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def ladder(
    config: Annotated[Path, typer.Argument(help="Project config YAML (task, training data, base model).")],
    gold: Annotated[Path, typer.Option("--gold", help="The gold file every rung is scored on.")],
    out: Annotated[Path, typer.Option("--out", help="Where rung predictions and ladder.json go.")] = Path(
        "runs/ladder"
    ),
    lora_run: Annotated[
        Path | None, typer.Option("--lora-run", help="Reuse this finished LoRA run (default: train one).")
    ] = None,
    rungs: Annotated[str, typer.Option(help="Comma-separated rungs.")] = "tfidf,minilm,zero-shot,few-shot,lora",
    shots: Annotated[int, typer.Option(help="Few-shot examples per label.")] = 1,
    against: Annotated[Path | None, typer.Option(help="Bar: gate every rung against this baseline.")] = None,
    min_accuracy: Annotated[float | None, typer.Option(help="Bar: minimum accuracy.")] = None,
    min_category_accuracy: Annotated[float | None, typer.Option(help="Bar: minimum worst-category accuracy.")] = None,
) -> None:
    """Train and score TF-IDF, MiniLM, zero/few-shot and LoRA; name the smallest that clears the bar."""
    from taskling.config import load_config
    from taskling.ladder import Bar, run_ladder

    bar = Bar(against=against, min_accuracy=min_accuracy, min_category_accuracy=min_category_accuracy)
    result = run_ladder(
        load_config(config),
        gold,
        out,
        rungs=[r.strip() for r in rungs.split(",") if r.strip()],
        lora_run=lora_run,
        shots=shots,
        bar=bar,
    )
    render_ladder(result)


def render_ladder(result: Any) -> None:
    table = Table(title=f"ladder: {result.gold_rows} gold rows, {result.train_rows} training rows; bar: {result.bar}")
    for col in ("rung", "accuracy", "macro-F1", "worst category", "latency ms", "msg/s", "memory MB", "train s", "bar"):
        table.add_column(col)
    for r in result.rungs:
        mark = "-" if r.clears is None else ("[green]clears[/]" if r.clears else f"[red]no[/]: {r.why}")
        table.add_row(
            r.name,
            f"{r.accuracy:.2%}",
            f"{r.macro_f1:.3f}",
            f"{r.worst_category} ({r.worst_category_accuracy:.0%})",
            f"{r.latency_ms:.1f}",
            f"{r.messages_per_second:.0f}",
            f"{r.memory_mb:.1f}",
            f"{r.train_seconds:.0f}",
            mark,
        )
    console.print(table)
    if result.smallest:
        console.print(f"[bold green]smallest that clears the bar: {result.smallest}[/]")
    elif any(r.clears is not None for r in result.rungs):
        console.print("[bold red]no rung clears the bar[/]")
    console.print(f"wrote {result.out_dir / 'ladder.json'}")


@app.command()
@friendly_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A scored run directory (metrics.json, predictions.jsonl).")],
    out: Annotated[Path | None, typer.Option("--out", help="Output file (default: RUN_DIR/report.html).")] = None,
    ladder_file: Annotated[Path | None, typer.Option("--ladder", help="A ladder.json to include.")] = None,
    against: Annotated[Path | None, typer.Option(help="Baseline for the per-category bars.")] = None,
) -> None:
    """Write a self-contained report.html (no network needed to open it)."""
    from taskling.report import write_report

    path = write_report(run_dir, out=out, ladder=ladder_file, baseline=against)
    console.print(f"wrote {path}")


@app.command()
@friendly_errors
def cost(
    teacher_input_price: Annotated[float, typer.Option(help="Teacher $ per million input tokens.")],
    teacher_output_price: Annotated[float, typer.Option(help="Teacher $ per million output tokens.")],
    calls_per_day: Annotated[float, typer.Option(help="Traffic: calls per day.")],
    input_tokens: Annotated[float, typer.Option(help="Input tokens per call (prompt + message).")] = 150,
    output_tokens: Annotated[float, typer.Option(help="Output tokens per call.")] = 5,
    run: Annotated[Path | None, typer.Option("--run", help="Take measured throughput from RUN/metrics.json.")] = None,
    throughput: Annotated[float | None, typer.Option(help="Specialist messages per second (if no --run).")] = None,
    hardware_per_hour: Annotated[float, typer.Option(help="Specialist hardware $ per hour.")] = 0.10,
    maintenance_per_month: Annotated[float, typer.Option(help="Retraining + monitoring $ per month.")] = 500.0,
    always_on: Annotated[bool, typer.Option("--always-on", help="Hardware rented all month.")] = False,
) -> None:
    """Cost per million calls, teacher vs specialist, and the break-even volume."""
    from taskling.cost import CostInputs, estimate, measured_throughput

    latency = None
    if throughput is None:
        if run is None:
            raise TasklingError("the specialist's throughput is unknown", fix="pass --run RUN_DIR or --throughput N")
        throughput, latency = measured_throughput(run)
    result = estimate(
        CostInputs(
            teacher_input_price=teacher_input_price,
            teacher_output_price=teacher_output_price,
            input_tokens_per_call=input_tokens,
            output_tokens_per_call=output_tokens,
            calls_per_day=calls_per_day,
            messages_per_second=throughput,
            hardware_per_hour=hardware_per_hour,
            maintenance_per_month=maintenance_per_month,
            always_on=always_on,
            latency_ms=latency,
        )
    )
    table = Table(title="cost", show_header=False)
    table.add_row("teacher, per million calls", f"${result.teacher_per_million:,.2f}")
    table.add_row(
        "specialist, per million calls",
        f"${result.specialist_per_million:,.2f} compute at {throughput:,.1f} msg/s"
        + (f", {latency:.0f} ms latency" if latency else ""),
    )
    table.add_row("specialist fixed, per month", f"${result.specialist_fixed_per_month:,.2f}")
    table.add_row(
        f"this traffic ({calls_per_day:,.0f}/day)",
        f"teacher ${result.teacher_per_month:,.2f}/month, specialist ${result.specialist_per_month:,.2f}/month",
    )
    be = result.break_even_calls_per_day
    table.add_row("break-even", "never" if be is None else f"{be:,.0f} calls/day")
    console.print(table)
    console.print(f"[bold]{result.verdict}[/]")


@app.command()
@friendly_errors
def runs(
    root: Annotated[Path, typer.Argument(help="Folder holding run directories.")] = Path("runs"),
) -> None:
    """List runs with their metrics, gold hash and gate verdict."""
    from taskling.runs import list_runs

    table = Table(title=f"runs under {root}")
    for col in ("run", "accuracy", "macro-F1", "worst category", "gold", "baseline", "gate"):
        table.add_column(col)
    for r in list_runs(root):
        table.add_row(
            str(r.path.relative_to(root)) if r.path != root else r.name,
            "-" if r.accuracy is None else f"{r.accuracy:.2%}",
            "-" if r.macro_f1 is None else f"{r.macro_f1:.3f}",
            "-" if r.worst_category is None else f"{r.worst_category} ({r.worst_category_accuracy:.0%})",
            (r.gold_hash or "-")[:12],
            "-" if r.baseline_accuracy is None else f"{r.baseline_accuracy:.2%}",
            r.gate,
        )
    console.print(table)


@app.command()
@friendly_errors
def compare(
    a: Annotated[Path, typer.Argument(help="Run A (before).")],
    b: Annotated[Path, typer.Argument(help="Run B (after).")],
) -> None:
    """What changed per category from run A to run B (paired when on the same gold set)."""
    from taskling.runs import compare as compare_runs

    result = compare_runs(a, b)
    acc_a, acc_b = result.accuracy
    console.print(f"accuracy {acc_a:.2%} -> {acc_b:.2%} ({acc_b - acc_a:+.2%})")
    if result.verdict is None:
        console.print("[yellow]different gold sets: the numbers are not paired and not directly comparable[/]")
    else:
        _render_verdict(result.verdict)
    table = Table(title="per category")
    for col in ("category", "A", "B", "change"):
        table.add_column(col)
    ranked = sorted(result.per_category, key=lambda row: ((row[2] or 0) - (row[1] or 0), row[0]))
    for label, x, y in ranked:
        change = "-" if x is None or y is None else f"{y - x:+.0%}"
        table.add_row(label, "-" if x is None else f"{x:.0%}", "-" if y is None else f"{y:.0%}", change)
    console.print(table)


# ---------------------------------------------------------------- serving (docs/serve.md)


@app.command()
@friendly_errors
def serve(
    run_dir: Annotated[Path, typer.Argument(help="The run to serve (adapter name: --name).")],
    host: Annotated[str, typer.Option(help="Bind address; beyond loopback an API key is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    name: Annotated[str, typer.Option(help="Adapter name of RUN_DIR.")] = "default",
    adapters_dir: Annotated[
        Path | None, typer.Option(help="Folder of more runs on the same base; each is served by its folder name.")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File holding the API key (or set TASKLING_API_KEY).")
    ] = None,
    log_url: Annotated[
        str | None,
        typer.Option(help="Prediction log URL (default sqlite RUN_DIR/predictions.db; or TASKLING_LOG_URL)."),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Texts per forward pass.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long to wait to fill a batch.")] = 2.0,
    max_queue: Annotated[int, typer.Option(help="Requests waiting before 503.")] = 256,
    max_texts: Annotated[int, typer.Option(help="Texts per request before 413.")] = 64,
    max_text_chars: Annotated[int, typer.Option(help="Characters per text before 413.")] = 20_000,
    max_body_bytes: Annotated[int, typer.Option(help="Request body bytes before 413.")] = 1_000_000,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: one per core).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
) -> None:
    """Serve RUN_DIR over HTTP: /v1/classify, /v1/chat/completions, /healthz, /metrics."""
    from taskling.serve import ServeSettings
    from taskling.serve import serve as run_server

    key = os.environ.get("TASKLING_API_KEY") or None
    if api_key_file is not None:
        key = api_key_file.read_text(encoding="utf-8").strip() or None
    settings = ServeSettings(
        host=host,
        port=port,
        name=name,
        adapters_dir=adapters_dir,
        api_key=key,
        log_url=log_url or os.environ.get("TASKLING_LOG_URL") or None,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_texts=max_texts,
        max_text_chars=max_text_chars,
        max_body_bytes=max_body_bytes,
        threads=threads,
        dtype=dtype,
    )
    err_console.print(f"serving {run_dir} on http://{host}:{port} (API key {'required' if key else 'off'})")
    run_server(run_dir, settings)


@app.command()
@friendly_errors
def logs(
    run_dir: Annotated[Path, typer.Argument(help="The served run (its predictions.db).")],
    url: Annotated[str | None, typer.Option(help="Prediction log URL instead (or TASKLING_LOG_URL).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the latest N rows.")] = None,
    label: Annotated[str | None, typer.Option(help="Only this predicted label.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Only this adapter.")] = None,
    max_probability: Annotated[
        float | None, typer.Option(help="Only answers at most this confident (relabel the uncertain).")
    ] = None,
    export: Annotated[Path | None, typer.Option(help="Write JSONL (text, label, ...) for relabeling.")] = None,
) -> None:
    """Read the prediction log back, or export it as JSONL for relabeling."""
    from taskling.predlog import count_rows, default_url, export_jsonl, read_rows

    url = url or os.environ.get("TASKLING_LOG_URL") or default_url(run_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise TasklingError(
            f"no prediction log at {url[len('sqlite:///') :]}", fix="serve the run first: taskling serve RUN_DIR"
        )
    rows = read_rows(url, limit=limit, label=label, adapter=adapter, max_probability=max_probability, newest=True)
    if export is not None:
        n = export_jsonl(rows, export)
        console.print(f"wrote {n} rows to {export}")
        return
    import datetime as dt

    table = Table(title=f"prediction log ({count_rows(url)} rows in all)")
    for col in ("time (UTC)", "adapter", "label", "p", "ms", "text"):
        table.add_column(col)
    for row in rows:
        when = dt.datetime.fromtimestamp(row["time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        text = row["text"] if len(row["text"]) <= 80 else row["text"][:77] + "..."
        table.add_row(when, row["adapter"], row["label"], f"{row['probability']:.2f}", f"{row['latency_ms']:.1f}", text)
    console.print(table)


@app.command("export")
@friendly_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    to: Annotated[str, typer.Option("--to", help="merged | gguf | ollama | vllm")],
    out: Annotated[Path | None, typer.Option("--out", help="Export directory (default RUN_DIR/exports/...).")] = None,
    quant: Annotated[str, typer.Option("--quant", help="GGUF weights for gguf/ollama: f16 | q8_0.")] = "f16",
    dtype: Annotated[str, typer.Option("--dtype", help="Saved weights for merged: float32 | bfloat16.")] = "float32",
) -> None:
    """Export a run: merged safetensors, GGUF, an Ollama Modelfile, or a vLLM LoRA launch line."""
    from taskling.export import export

    with console.status(f"exporting {run_dir} to {to} (writing, then checking the result)"):
        result = export(run_dir, to, out, quant=quant, dtype=dtype)
    table = Table(title=f"export: {to}", show_header=False)
    table.add_row("directory", str(result.out_dir))
    for name in sorted(result.files):
        size = (result.out_dir / name).stat().st_size
        table.add_row(name, f"{size / 1e6:.1f} MB  sha256 {result.files[name][:12]}")
    gguf_checks = result.checks.get("gguf", {})
    if "logits_max_relative_diff" in gguf_checks:
        table.add_row("GGUF round trip", f"logits within {gguf_checks['logits_max_relative_diff']:.2e} (relative)")
    labels = result.checks.get("labels") or gguf_checks.get("labels")
    if labels:
        table.add_row("labels agree with the run", f"{labels['agree']}/{labels['texts']}")
    console.print(table)
    if to == "ollama":
        console.print(f"next: cd {result.out_dir} && ollama create NAME -f Modelfile")
    elif to == "vllm":
        console.print(f"next: bash {result.out_dir / 'launch.sh'}")


# ---------------------------------------------------------------- keep it honest (monitor.py, loop.py, gold.py)


@app.command("monitor")
@friendly_errors
def monitor_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The production run directory (holds predictions.db).")],
    since: Annotated[str, typer.Option(help="Window: a duration (7d, 24h, 30m) or an ISO date.")] = "7d",
    db: Annotated[str | None, typer.Option(help="Prediction log URL (default sqlite RUN_DIR/predictions.db).")] = None,
    config: Annotated[Path | None, typer.Option(help="Thresholds YAML (see docs/monitor.md).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where drift.json/drift.html go (default RUN_DIR/monitor).")] = None,
    adapter: Annotated[str | None, typer.Option(help="Only rows of this adapter.")] = None,
) -> None:
    """Drift report over the log window; exits 1 when any check is over its threshold."""
    from taskling.monitor import load_monitor_config, monitor, write_report

    with console.status(f"checking {run_dir} since {since}"):
        report = monitor(run_dir, since=since, url=db, config=load_monitor_config(config), adapter=adapter)
        json_path, html_path = write_report(report, out or Path(run_dir) / "monitor")
    table = Table(title=f"drift since {since}: {report.window['rows']} requests")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for s in report.signals:
        table.add_row(s.name, "[bold red]ALARM[/]" if s.alarm else "[green]ok[/]", s.detail)
    console.print(table)
    console.print(f"report: {html_path}  (json: {json_path})")
    if report.alarm:
        console.print("[bold red]moved:[/] " + ", ".join(s.name for s in report.moved))
        raise typer.Exit(1)


@app.command("sample")
@friendly_errors
def sample_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The production run directory.")],
    out: Annotated[Path, typer.Option(help="JSONL to relabel (correct each `label`).")] = Path("relabel.jsonl"),
    budget: Annotated[int, typer.Option(help="Rows to pick.")] = 200,
    since: Annotated[str, typer.Option(help="Window to pick from (7d, 24h, ...).")] = "7d",
    gold: Annotated[list[Path] | None, typer.Option(help="Gold root(s): no row copying a gold row is picked.")] = None,
    db: Annotated[str | None, typer.Option(help="Prediction log URL.")] = None,
    config: Annotated[Path | None, typer.Option(help="Monitor YAML (its embedder is used).")] = None,
) -> None:
    """Pick low-confidence, unfamiliar and drifted-category rows from the log for relabeling."""
    from taskling.loop import SampleConfig, sample_run
    from taskling.monitor import load_monitor_config

    with console.status("sampling"):
        result = sample_run(
            run_dir,
            out,
            since=since,
            gold_roots=gold or [],
            url=db,
            config=SampleConfig(budget=budget),
            monitor_config=load_monitor_config(config),
        )
    picked = sum(r["picked"] == "active" for r in result.rows)
    console.print(
        f"{len(result.rows)} of {result.considered} rows -> {out} "
        f"({picked} active, {len(result.rows) - picked} random); "
        f"excluded: {result.excluded}"
    )
    console.print(
        "next: correct each row's `label` (or run the teacher), then taskling retrain CONFIG --data " + str(out)
    )


@app.command("retrain")
@friendly_errors
def retrain_cmd(
    config: Annotated[Path, typer.Argument(help="The project config the production run was trained with.")],
    data: Annotated[list[Path], typer.Option(help="Relabeled JSONL file(s).")],
    gold: Annotated[Path, typer.Option(help="Gold root holding v1, v2, ...")],
    registry: Annotated[Path, typer.Option(help="Registry file recording promotions.")] = Path("runs/registry.json"),
    production: Annotated[Path | None, typer.Option(help="Production run (default: the registry's).")] = None,
    gold_version: Annotated[str | None, typer.Option(help="Gold version to gate on (default: latest).")] = None,
    versions: Annotated[Path, typer.Option(help="Where training set versions go.")] = Path("data/versions"),
    candidate: Annotated[
        Path | None, typer.Option(help="Candidate run dir (default: beside the production run).")
    ] = None,
) -> None:
    """New training version (cleaned, gold-leak free) -> train a candidate -> gate -> promote if it passes."""
    from taskling.config import load_config
    from taskling.gold import load_version
    from taskling.loop import classifier_loader, lora_trainer, new_training_version, production_run, retrain

    labels = list(load_config(config).task.labels)
    prod = production or production_run(registry)
    version = new_training_version(versions, data, labels, base_train=prod / "data" / "train.jsonl", gold_roots=[gold])
    console.print(f"training version {version.path}: {version.counts}")
    cand = candidate or prod.parent / f"candidate-{version.name}"
    result = retrain(
        version.train_file,
        cand,
        production=prod,
        gold=load_version(gold, gold_version),
        labels=labels,
        registry=registry,
        trainer=lora_trainer(config),
        loader=classifier_loader,
    )
    verdict = "[green]PROMOTED[/]" if result.promoted else "[bold red]BLOCKED[/]"
    console.print(
        f"{verdict} {cand}: accuracy {result.candidate_accuracy:.2%} vs production {result.production_accuracy:.2%} "
        f"on gold {result.gold}"
    )
    for failure in result.verdict["failed"]:
        console.print(f"  failed {failure}")
    if not result.promoted:
        raise typer.Exit(1)


gold_app = typer.Typer(help="Gold set versions (v1, v2, ...): add rows as a new version.", no_args_is_help=True)
app.add_typer(gold_app, name="gold")


@gold_app.command("add")
@friendly_errors
def gold_add_cmd(
    gold_root: Annotated[Path, typer.Argument(help="Gold root folder (versions v1, v2, ... inside).")],
    files: Annotated[list[Path], typer.Argument(help="JSONL file(s) with the new gold rows.")],
    labels: Annotated[str, typer.Option(help="Label set: a run dir, LABELS.txt, or a,b,c.")],
    train: Annotated[
        list[Path] | None, typer.Option(help="Training file(s): new gold rows copying them are rejected.")
    ] = None,
) -> None:
    """Write the next gold version: the latest rows plus the new ones (older versions stay)."""
    from taskling.bar import read_labels, task_labels
    from taskling.data import load_files
    from taskling.gold import add_gold

    label_set = task_labels(Path(labels)) if Path(labels).is_dir() else read_labels(labels)
    train_rows = load_files(train).examples if train else []
    result = add_gold(gold_root, files, label_set or [], train=train_rows)
    console.print(
        f"gold {result.version.tag}: {len(result.version.rows)} rows ({result.added} added, "
        f"{len(result.rejected)} rejected -> {result.version.path / 'rejected.jsonl'})"
    )


@app.command("calibrate")
@friendly_errors
def calibrate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
    data: Annotated[Path | None, typer.Option(help="Validation rows (default RUN_DIR/data/validation.jsonl).")] = None,
    oos: Annotated[Path | None, typer.Option(help="Out-of-scope validation rows (any label outside the set).")] = None,
    metric: Annotated[str, typer.Option(help="probability | margin")] = "probability",
    coverage: Annotated[float, typer.Option(help="Without --oos: share of in-scope rows to answer.")] = 0.95,
) -> None:
    """Choose the `unknown` threshold on validation data (abstain.json) and the monitor's confidence reference."""
    from taskling.abstain import calibrate_threshold
    from taskling.data import load_file
    from taskling.monitor import MonitorConfig, calibrate
    from taskling.predict import Classifier

    if metric not in ("probability", "margin"):
        raise TasklingError(f"--metric {metric!r} is unknown", fix="use --metric probability or --metric margin")
    clf = Classifier.from_run(run_dir)
    rows = load_file(data or run_dir / "data" / "validation.jsonl", clf.task).examples
    extra = load_file(oos).examples if oos else []
    with console.status(f"classifying {len(rows) + len(extra)} validation rows"):
        preds = clf.predict([ex.text for ex in [*rows, *extra]])
    threshold = calibrate_threshold(
        preds,
        [ex.label for ex in [*rows, *extra]],
        clf.task.labels,
        metric=metric,  # type: ignore[arg-type]
        target_coverage=coverage,
    )
    path = threshold.save(run_dir)
    calibrate(run_dir, [p.probabilities for p in preds[: len(rows)]], MonitorConfig())
    recall = "" if threshold.oos_recall is None else f", OOS recall {threshold.oos_recall:.1%}"
    console.print(
        f"abstain when {metric} < {threshold.value:.4f} ({threshold.method}): in-scope accuracy "
        f"{threshold.in_scope_accuracy:.1%}, coverage {threshold.in_scope_coverage:.1%}{recall} -> {path}"
    )


def _render_extraction(metrics: dict[str, Any], title: str = "extraction") -> None:
    head = Table(title=title, show_header=False)
    head.add_row("rows", str(metrics["n"]))
    head.add_row("whole-record exact match", f"{metrics['record_exact_match']:.2%}")
    head.add_row("worst field", f"{metrics['worst_field']} ({metrics['worst_field_accuracy']:.0%})")
    head.add_row("invalid outputs", f"{metrics['invalid_output_rate']:.2%}")
    console.print(head)
    fields = Table(title="per field")
    for col in ("field", "type", "exact match", "accuracy", "normalised match", "char F1", "ROUGE-L"):
        fields.add_column(col)
    for name, f in metrics["fields"].items():
        text = [f"{f[k]:.3f}" for k in ("normalised_match", "char_f1", "rouge_l")] if "char_f1" in f else ["-"] * 3
        acc = f"{f['accuracy']:.2%}" if "accuracy" in f else "-"
        fields.add_row(name, f["type"], f"{f['exact_match']:.2%}", acc, *text)
    console.print(fields)


@app.command("extract-train")
@friendly_errors
def extract_train(
    config: Annotated[Path, typer.Argument(help="Extraction (or multi-output) YAML config.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides.")] = None,
) -> None:
    """Train a LoRA adapter that fills a schema's fields (see docs/extraction.md)."""
    from taskling.extract_train import train_extraction
    from taskling.schema import load_extraction_config

    cfg = load_extraction_config(config, overrides or [])
    with training_progress() as progress:
        result = train_extraction(cfg, progress=progress)
    _train_summary(result)


@app.command()
@friendly_errors
def extract(
    run_dir: Annotated[Path, typer.Argument(help="An extraction run directory.")],
    text: Annotated[list[str], typer.Argument(help="Message(s) to extract from.")],
) -> None:
    """Extract one schema-valid JSON record per message."""
    import json

    from taskling.extract import Extractor

    extractor = Extractor.from_run(run_dir)
    for result in extractor.extract(text):
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
    from taskling.extract_eval import evaluate_extraction

    result = evaluate_extraction(run_dir, data, out_dir=out)
    _render_extraction(result.metrics)
    console.print(f"wrote {result.metrics_path} and {result.predictions_path}")


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
    from taskling.dpo import build_pairs

    path, counts = build_pairs(run_dir, out, data=data, teacher=teacher, margin_below=margin_below)
    console.print(f"wrote {counts['pairs']} pairs to {path}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


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
    from taskling.dpo import compare, dpo

    with console.status("DPO: refining the adapter"):
        result = dpo(run_dir, pairs_file, out, beta=beta, learning_rate=lr, epochs=epochs, batch_size=batch_size)
    console.print(
        f"{result.run_dir}: {result.pairs} pairs, {result.steps} steps, loss {result.first_loss:.4f} -> "
        f"{result.last_loss:.4f}, chosen preferred on {result.reward_accuracy:.0%} of pairs"
    )
    if gold is None:
        return
    report = compare(run_dir, result.run_dir, gold)
    table = Table(title=f"did DPO help? accuracy {report['accuracy_before']:.2%} -> {report['accuracy_after']:.2%}")
    for col in ("category / field", "before", "after", "change", "support"):
        table.add_column(col)
    for name, row in sorted(report["per_category"].items(), key=lambda kv: kv[1]["delta"]):
        table.add_row(name, f"{row['before']:.0%}", f"{row['after']:.0%}", f"{row['delta']:+.0%}", str(row["support"]))
    console.print(table)
    console.print("gate: " + ("[green]passed[/]" if report["gate_passed"] else "[red]failed[/]"))


def _clean_config(settings: list[str] | None) -> Any:
    """A CleanConfig from `key=value` settings; unknown keys are errors."""
    from pydantic import ValidationError

    from taskling.clean import CleanConfig
    from taskling.config import parse_overrides
    from taskling.errors import ConfigError

    try:
        return CleanConfig(**parse_overrides(settings or []))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"--set: {problems}", fix="see docs/data.md for the cleaning settings") from None


def render_data_report(report: dict[str, Any]) -> None:
    """Per-category counts against the guide, then what was removed or queued and why."""
    head = Table(title="data report", show_header=False)
    head.add_row("rows read", str(report["rows_read"]))
    head.add_row("train candidates", str(report["train"]))
    head.add_row("review queue", str(report["review_queue"]) + _reasons(report["review_reasons"]))
    head.add_row("rejected", str(report["rejected"]) + _reasons(report["rejected_reasons"]))
    dups = report["duplicates_removed"]
    head.add_row("duplicates removed", f"{dups['exact']} exact, {dups['near']} near")
    head.add_row("conflicting label groups", str(report["conflicts"]))
    head.add_row("label-error candidates", str(report["label_error_candidates"]))
    head.add_row("gold leaks", str(report["gold_leaks"]))
    if report["invented_labels"]:
        head.add_row("invented labels", ", ".join(f"{k} x{v}" for k, v in list(report["invented_labels"].items())[:8]))
    console.print(head)
    cats = Table(title="rows per category (guide: 100-300; under 50 is a warning)")
    for col in ("category", "rows", "status"):
        cats.add_column(col)
    style = {"missing": "red", "too few": "red", "thin": "yellow", "ok": "green", "plenty": "green"}
    for row in sorted(report["categories"], key=lambda r: r["count"]):
        cats.add_row(row["label"], str(row["count"]), f"[{style[row['status']]}]{row['status']}[/]")
    console.print(cats)
    if report["warnings"]:
        console.print(f"[yellow]warning:[/] {len(report['warnings'])} categories under 50 rows: {report['guide']}")
    issues = report["label_error_examples"][:10]
    if issues:
        top = Table(title="most likely label errors (review these first)")
        for col in ("rank", "where", "given", "model says", "text"):
            top.add_column(col)
        for i in issues:
            top.add_row(str(i["rank"]), i["where"], i["given"], i["suggested"], i["text"][:60])
        console.print(top)


def _reasons(reasons: dict[str, int]) -> str:
    return f"  [dim]({', '.join(f'{k} {v}' for k, v in reasons.items())})[/]" if reasons else ""


@app.command("distill")
@friendly_errors
def distill_cmd(
    logs: Annotated[list[Path], typer.Argument(help="Teacher log JSONL file(s).")],
    task: Annotated[Path, typer.Option("--task", help="Task YAML (labels) or a project config.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("data/distilled"),
    min_confidence: Annotated[float, typer.Option(help="Below this teacher confidence: review queue.")] = 0.7,
    gold_manifest: Annotated[Path | None, typer.Option(help="Frozen gold manifest: reject rows copying it.")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help="Cleaning setting key=value.")] = None,
) -> None:
    """Teacher logs -> train.jsonl, review.jsonl, rejected.jsonl and report.json (every row in one)."""
    from taskling.distill import DistillConfig, distill, load_task_file

    config = DistillConfig(min_confidence=min_confidence, gold_manifest=gold_manifest, clean=_clean_config(settings))
    with console.status("distilling: dedupe, conflicts, label errors"):
        result = distill(logs, load_task_file(task), out, config)
    render_data_report(result.report)
    console.print(
        f"{result.rows_read} rows -> {result.train} train, {result.review} review, {result.rejected} rejected "
        f"(in {result.out_dir})"
    )


data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("report")
@friendly_errors
def data_report_cmd(
    data: Annotated[Path, typer.Argument(help="A labeled JSONL/CSV file, or a `taskling distill` output folder.")],
    task: Annotated[Path | None, typer.Option("--task", help="Task YAML (needed for a file).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Where to write the JSON report.")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help="Cleaning setting key=value.")] = None,
) -> None:
    """Counts per category against the guide, duplicates, label-error candidates, review queue."""
    import json

    from taskling.clean import build_report, clean_examples
    from taskling.data import load_file
    from taskling.distill import load_task_file

    if data.is_dir():
        if not (data / "report.json").is_file():
            raise TasklingError(f"{data} has no report.json", fix="run `taskling distill` into it, or give a file")
        report = json.loads((data / "report.json").read_text(encoding="utf-8"))
    else:
        if task is None:
            raise TasklingError("a data file needs --task", fix="add --task task.yaml")
        spec = load_task_file(task)
        loaded = load_file(data, spec, on_bad_rows="skip")
        with console.status("checking: dedupe, conflicts, label errors"):
            result = clean_examples(loaded.examples, spec.labels, _clean_config(settings))
        report = build_report(
            loaded.examples,
            result,
            spec.labels,
            rows_read=loaded.rows_read,
            extra_rejected=loaded.skipped_by_reason,
        )
    target = json_out or (data / "report.json" if data.is_dir() else data.with_suffix(".report.json"))
    write_text_atomic(target, json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    render_data_report(report)
    console.print(f"wrote {target}")


@app.command("split")
@friendly_errors
def split_cmd(
    data: Annotated[list[Path], typer.Argument(help="Labeled JSONL/CSV file(s), e.g. distill's train.jsonl.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (gold is frozen here once).")],
    task: Annotated[Path | None, typer.Option("--task", help="Task YAML: check labels.")] = None,
    gold_fraction: Annotated[float, typer.Option(help="Share of rows for gold (first run only).")] = 0.15,
    validation_fraction: Annotated[float, typer.Option(help="Share of rows for validation.")] = 0.1,
    min_gold: Annotated[int, typer.Option(help="Gold rows at least per label (rare labels too).")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Stratified train/validation/gold split; the gold set is frozen with a manifest."""
    from taskling.data import load_files
    from taskling.distill import load_task_file
    from taskling.split import SplitConfig, split_dataset

    spec = load_task_file(task) if task else None
    examples = load_files(data, spec).examples
    config = SplitConfig(
        gold_fraction=gold_fraction, validation_fraction=validation_fraction, min_gold_per_label=min_gold, seed=seed
    )
    result = split_dataset(examples, out, config)
    state = "reused the frozen gold set" if result.gold_reused else "froze a new gold set"
    console.print(
        f"{state}: {len(result.gold)} gold rows; {len(result.train)} train, {len(result.validation)} validation, "
        f"{len(result.leaked)} leaked rows dropped (see {out / 'leaked.jsonl'})"
    )
    if result.labels_without_gold:
        console.print(f"[yellow]warning:[/] no gold rows for: {', '.join(result.labels_without_gold)}")
    console.print(f"train with `data.gold_manifest: {out / 'gold.manifest.json'}` to refuse leaks")


@app.command("label")
@friendly_errors
def label_cmd(
    texts_file: Annotated[Path, typer.Argument(help="Unlabeled texts: one a line, or JSONL with `text`.")],
    task: Annotated[Path, typer.Option("--task", help="Task YAML (labels).")],
    out: Annotated[Path, typer.Option("--out", help="Teacher-log JSONL to write (feed it to distill).")],
    model: Annotated[str | None, typer.Option(help="Teacher model (default $TASKLING_TEACHER_MODEL).")] = None,
) -> None:
    """Label texts with a teacher (any OpenAI-compatible endpoint from the environment)."""
    import json

    from taskling.data import write_jsonl
    from taskling.distill import load_task_file
    from taskling.teacher import TeacherClient, label_texts, usage_dict

    lines = [line for line in texts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [json.loads(line)["text"] if line.lstrip().startswith("{") else line.strip() for line in lines]
    client = TeacherClient(model=model)
    with console.status(f"labeling {len(texts)} texts with {client.model}"):
        rows = label_texts(texts, load_task_file(task), client)
    write_jsonl(out, rows)
    usage = usage_dict(client.usage)
    console.print(f"wrote {len(rows)} rows to {out}; next: taskling distill {out} --task {task}")
    console.print(
        "teacher usage: " + ", ".join(f"{k} {v}" for k, v in usage.items()) + "  [dim](cached answers cost nothing)[/]"
    )


@app.command("synth")
@friendly_errors
def synth_cmd(
    task: Annotated[Path, typer.Option("--task", help="Task YAML (labels).")],
    out: Annotated[Path, typer.Option("--out", help="JSONL of accepted synthetic examples.")],
    per_label: Annotated[int, typer.Option(help="Examples to ask for per category.")] = 20,
    gold_manifest: Annotated[Path | None, typer.Option(help="Frozen gold manifest: reject copies of gold.")] = None,
    model: Annotated[str | None, typer.Option(help="Teacher model (default $TASKLING_TEACHER_MODEL).")] = None,
) -> None:
    """Ask the teacher for diverse examples per category; keep only validated ones."""
    from taskling.data import write_examples, write_jsonl
    from taskling.distill import load_task_file
    from taskling.split import load_gold, manifest_clean_config
    from taskling.teacher import TeacherClient, synthesize, usage_dict

    spec = load_task_file(task)
    gold, clean = (None, None)
    if gold_manifest is not None:
        gold, manifest = load_gold(gold_manifest)
        clean = manifest_clean_config(manifest)
    client = TeacherClient(model=model)
    with console.status(f"asking {client.model} for {per_label} examples x {len(spec.labels)} categories"):
        result = synthesize(spec, client, per_label=per_label, gold=gold, clean_config=clean)
    write_examples(out, result.accepted)
    rejected_path = out.with_name(out.stem + ".rejected.jsonl")
    write_jsonl(rejected_path, result.rejected)
    console.print(
        f"accepted {len(result.accepted)} -> {out}; rejected {len(result.rejected)} {result.rejected_by_reason()} "
        f"-> {rejected_path}"
    )
    console.print("teacher usage: " + ", ".join(f"{k} {v}" for k, v in usage_dict(client.usage).items()))


# ---------------------------------------------------------------- batch inference (docs/scale.md)


@app.command("predict-batch")
@friendly_errors
def predict_batch_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    input_path: Annotated[Path, typer.Argument(help="Input table: .parquet, .jsonl or .csv.")],
    out: Annotated[Path, typer.Option("--out", help="Output table: .parquet, .jsonl or .csv.")],
    engine: Annotated[str, typer.Option(help="local (one process) or ray (Ray Data; RAY_ADDRESS for a cluster).")] = (
        "local"
    ),
    text_field: Annotated[str, typer.Option(help="The column holding the messages.")] = "text",
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 32,
    workers: Annotated[int | None, typer.Option(help="Ray workers (default: the cluster's spare CPUs).")] = None,
    threads: Annotated[int, typer.Option(help="torch threads per classifier.")] = 1,
) -> None:
    """Classify every row of a Parquet/JSONL/CSV file: input columns + label, probability, margin, probabilities."""
    from taskling.batch import predict_batch

    result = predict_batch(
        run_dir,
        input_path,
        out,
        engine=engine,
        text_field=text_field,
        batch_size=batch_size,
        workers=workers,
        threads=threads,
    )
    console.print(
        f"wrote {result.rows} rows to {result.output_path} ({result.rows_per_second:.1f} rows/s, {result.engine})"
    )


if __name__ == "__main__":
    app()
