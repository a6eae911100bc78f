"""Hold the bar: baseline, gate, ladder, report, cost, runs, compare (docs/bar.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from taskling.cli.common import (
    app,
    console,
    friendly_errors,
    progress_bar,
    render_metrics,
)
from taskling.errors import TasklingError

# Labels, texts, run and file names come from the user: every one printed through rich goes
# through `escape`, so a label like "[b]x[/b]" or "[/]" is shown as written, not as markup.


def _render_accuracy(verdict: Any, level: float) -> None:
    # Brackets in the cells below are escaped: rich would read "[0.70%, 0.80%]" as a tag.
    acc = Table(title=f"accuracy ({level:.0%} bootstrap CI)", show_header=False)
    ref, cand, delta = verdict.reference_accuracy, verdict.candidate_accuracy, verdict.delta
    acc.add_row(escape(verdict.reference), escape(f"{ref.estimate:.2%}  [{ref.low:.2%}, {ref.high:.2%}]"))
    acc.add_row(escape(verdict.candidate), escape(f"{cand.estimate:.2%}  [{cand.low:.2%}, {cand.high:.2%}]"))
    acc.add_row("difference", escape(f"{delta.estimate:+.2%}  [{delta.low:+.2%}, {delta.high:+.2%}]"))
    b, c = verdict.discordant
    acc.add_row(
        verdict.thresholds["test"],
        f"p={verdict.p_value:.3g} ({b} rows lost, {c} gained): {verdict.assessment}",
    )
    ni = verdict.non_inferiority
    drop, margin = ni["accuracy_drop"], ni["margin"]
    over = drop > margin + 1e-9
    acc.add_row(
        "non-inferiority",
        f"dropped {drop:.2%} against a margin of {margin:.2%}: " + ("[red]beyond it[/]" if over else "within it"),
    )
    console.print(acc)


def _render_categories(verdict: Any, level: float) -> None:
    moved = [cat for cat in verdict.categories if cat.candidate != cat.reference]
    if not moved:
        return
    margin = verdict.non_inferiority["category_margin"]
    cats = Table(title=f"categories that changed (category margin {margin:.0%})")
    for col in ("category", "n", "reference", "candidate", f"change ({level:.0%} CI)", "p", ""):
        cats.add_column(col)
    for cat in sorted(moved, key=lambda cat: cat.delta.estimate):
        cats.add_row(
            escape(cat.label),
            str(cat.support),
            f"{cat.reference:.0%}",
            f"{cat.candidate:.0%}",
            escape(f"{cat.delta.estimate:+.0%} [{cat.delta.low:+.0%}, {cat.delta.high:+.0%}]"),
            f"{cat.p_value:.3g}",
            "[red]beyond the margin[/]" if cat.regressed else "",
        )
    console.print(cats)


def _render_verdict(verdict: Any) -> None:
    color = "green" if verdict.passed else "red"
    console.print(
        f"[bold {color}]{'PASS' if verdict.passed else 'FAIL'}[/]: {escape(verdict.candidate)} vs "
        f"{escape(verdict.reference)} on {verdict.n} gold rows (gold {verdict.gold_hash[:12]})"
    )
    level = 1 - verdict.thresholds["alpha"]
    _render_accuracy(verdict, level)
    _render_categories(verdict, level)
    checks = Table(title="checks")
    for col in ("check", "result", "why"):
        checks.add_column(col)
    for check in verdict.checks:
        checks.add_row(check.name, "[green]pass[/]" if check.passed else "[red]FAIL[/]", escape(check.detail))
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
    """Score a reference system (the teacher) on the gold set once and pin it, with the gold hash.

    For a generation run, --predictions holds the teacher's answers ({"text", "output"} rows)."""
    from taskling.evaluate.gate import pin_baseline, read_labels
    from taskling.evaluate.metrics import Metrics
    from taskling.rundir import GENERATION, RunDir

    if RunDir(run_dir).kind() == GENERATION:
        from taskling.cli.generate import pin_generation

        pin_generation(run_dir, gold, predictions, name, repin)
        return

    payload = pin_baseline(
        run_dir, gold, predictions, labels=read_labels(labels) if labels else None, name=name, repin=repin
    )
    from taskling.rundir import RunDir

    render_metrics(Metrics(**payload["metrics"]), title=f"baseline: {escape(name)}")
    where = escape(str(RunDir(run_dir).baseline))
    console.print(f"pinned {where} on gold {payload['gold_hash'][:12]} ({payload['n']} rows)")


@app.command()
@friendly_errors
def gate(
    candidate: Annotated[Path, typer.Argument(help="Candidate run directory (or its predictions.jsonl).")],
    against: Annotated[
        Path | None,
        typer.Option(help="baseline.json, a run dir with one, or a previous run (default: CANDIDATE/baseline.json)."),
    ] = None,
    gold: Annotated[Path | None, typer.Option("--gold", help="Check this gold file still has the pinned hash.")] = None,
    margin: Annotated[
        float, typer.Option(help="Largest accuracy drop allowed, significant or not (0.01 = one point).")
    ] = 0.01,
    category_margin: Annotated[
        float,
        typer.Option("--category-margin", "--category-tolerance", help="Largest accuracy drop allowed in a category."),
    ] = 0.10,
    alpha: Annotated[float, typer.Option(help="Significance level of the paired tests.")] = 0.05,
    exact: Annotated[bool, typer.Option("--exact", help="McNemar exact p instead of mid-p (stricter).")] = False,
    metric: Annotated[
        str | None, typer.Option(help="Generation runs: the per-row metric (default: execution for SQL, else rouge_l).")
    ] = None,
) -> None:
    """Exit 0 if CANDIDATE holds the bar, 1 if not (2: usage error). Writes gate.json."""
    from taskling.evaluate.gate import gate_paths
    from taskling.rundir import GENERATION, RunDir

    if candidate.is_dir() and RunDir(candidate).kind() == GENERATION:
        from taskling.cli.generate import gate_generation_run

        if not gate_generation_run(candidate, against, margin, metric):
            raise typer.Exit(1)
        return

    verdict = gate_paths(
        candidate,
        against,
        gold_file=gold,
        margin=margin,
        category_margin=category_margin,
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
    from taskling.evaluate.ladder import Bar, run_ladder

    bar = Bar(against=against, min_accuracy=min_accuracy, min_category_accuracy=min_category_accuracy)
    with progress_bar("ladder", "rungs", every_percent=1) as update:
        result = run_ladder(
            load_config(config),
            gold,
            out,
            rungs=[r.strip() for r in rungs.split(",") if r.strip()],
            lora_run=lora_run,
            shots=shots,
            bar=bar,
            progress=update,
        )
    render_ladder(result)


def render_ladder(result: Any) -> None:
    title = f"ladder: {result.gold_rows} gold rows, {result.train_rows} training rows; bar: {escape(result.bar)}"
    table = Table(title=title)
    for col in ("rung", "accuracy", "macro-F1", "worst category", "latency ms", "msg/s", "memory MB", "train s", "bar"):
        table.add_column(col)
    for r in result.rungs:
        mark = "-" if r.clears is None else ("[green]clears[/]" if r.clears else f"[red]no[/]: {escape(r.why)}")
        table.add_row(
            r.name,
            f"{r.accuracy:.2%}",
            f"{r.macro_f1:.3f}",
            f"{escape(r.worst_category)} ({r.worst_category_accuracy:.0%})",
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
    from taskling.rundir import RunDir

    console.print(f"wrote {escape(str(RunDir(result.out_dir).ladder))}")


@app.command()
@friendly_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A scored run directory (metrics.json, predictions.jsonl).")],
    out: Annotated[Path | None, typer.Option("--out", help="Output file (default: RUN_DIR/report.html).")] = None,
    ladder_file: Annotated[Path | None, typer.Option("--ladder", help="A ladder.json to include.")] = None,
    against: Annotated[Path | None, typer.Option(help="Baseline for the per-category bars.")] = None,
) -> None:
    """Write a self-contained report.html (no network needed to open it)."""
    from taskling.evaluate.report import write_report

    path = write_report(run_dir, out=out, ladder=ladder_file, baseline=against)
    console.print(f"wrote {escape(str(path))}")


@app.command()
@friendly_errors
def cost(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A cascade run: print its curve (cascade.json); also --run for the rest.")
    ] = None,
    teacher_input_price: Annotated[float | None, typer.Option(help="Teacher $ per million input tokens.")] = None,
    teacher_output_price: Annotated[float | None, typer.Option(help="Teacher $ per million output tokens.")] = None,
    calls_per_day: Annotated[float | None, typer.Option(help="Traffic: calls per day.")] = None,
    input_tokens: Annotated[float, typer.Option(help="Input tokens per call (prompt + message).")] = 150,
    output_tokens: Annotated[float, typer.Option(help="Output tokens per call.")] = 5,
    run: Annotated[Path | None, typer.Option("--run", help="Take measured throughput from RUN/metrics.json.")] = None,
    throughput: Annotated[float | None, typer.Option(help="Specialist messages per second (if no --run).")] = None,
    hardware_per_hour: Annotated[float, typer.Option(help="Specialist hardware $ per hour.")] = 0.10,
    maintenance_per_month: Annotated[float, typer.Option(help="Retraining + monitoring $ per month.")] = 500.0,
    always_on: Annotated[bool, typer.Option("--always-on", help="Hardware rented all month.")] = False,
) -> None:
    """Cost per million calls, teacher vs specialist, and the break-even volume.

    With a cascade RUN_DIR: the cascade's curve (share of traffic per stage, accuracy, p50/p99
    latency and cost per million calls for each threshold setting, the chosen one marked).
    The break-even needs --teacher-input-price, --teacher-output-price and --calls-per-day.
    """
    from taskling.evaluate.cost import CostInputs, cascade_curve, estimate, measured_throughput

    curve = cascade_curve(run_dir) if run_dir is not None else None
    if curve is not None:
        console.print(curve_table(curve))
    prices = (teacher_input_price, teacher_output_price, calls_per_day)
    if teacher_input_price is None or teacher_output_price is None or calls_per_day is None:
        if curve is not None and prices == (None, None, None):
            return
        if run_dir is not None and curve is None and prices == (None, None, None):
            raise TasklingError(
                f"{run_dir} has no cascade.json, so there is no curve to show",
                fix=f"build one (taskling cascade {run_dir}), or give the teacher's prices and --calls-per-day",
            )
        raise TasklingError(
            "the break-even needs --teacher-input-price, --teacher-output-price and --calls-per-day",
            fix="give all three (with --run RUN_DIR or --throughput N)",
        )
    run = run or run_dir
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


def curve_table(curve: Any) -> Table:
    """The cascade's curve (`taskling.evaluate.cost.CascadeCurve`) as a rich table; cells are text, never markup."""
    headers, rows = curve.rows()
    table = Table(title="cascade: one row per threshold setting (t: confidence threshold; share: traffic decided)")
    for h in headers:
        table.add_column(escape(h), justify="left" if not h else "right", overflow="fold")  # never cut a number
    for row in rows:
        table.add_row(*(Text(c) for c in row), style="bold" if row[0] else None)
    return table


@app.command()
@friendly_errors
def runs(
    root: Annotated[Path, typer.Argument(help="Folder holding run directories.")] = Path("runs"),
) -> None:
    """List runs with their metrics, gold hash and gate verdict."""
    from taskling.evaluate.runs import list_runs

    table = Table(title=f"runs under {escape(str(root))}")
    for col in ("run", "accuracy", "macro-F1", "worst category", "gold", "baseline", "gate"):
        table.add_column(col)
    for r in list_runs(root):
        baseline_text = "-" if r.baseline_accuracy is None else f"{r.baseline_accuracy:.2%}"
        if r.baseline_on_other_gold:
            baseline_text += " (other gold set)"
        table.add_row(
            escape(str(r.path.relative_to(root)) if r.path != root else r.name),
            "-" if r.accuracy is None else f"{r.accuracy:.2%}",
            "-" if r.macro_f1 is None else f"{r.macro_f1:.3f}",
            "-" if r.worst_category is None else f"{escape(r.worst_category)} ({r.worst_category_accuracy:.0%})",
            (r.gold_hash or "-")[:12],
            baseline_text,
            escape(r.gate),
        )
    console.print(table)


@app.command()
@friendly_errors
def compare(
    a: Annotated[Path, typer.Argument(help="Run A (before).")],
    b: Annotated[Path, typer.Argument(help="Run B (after).")],
) -> None:
    """What changed per category from run A to run B (paired; both must be scored on the same gold set)."""
    from taskling.evaluate.runs import compare as compare_runs

    result = compare_runs(a, b)
    acc_a, acc_b = result.accuracy
    console.print(f"accuracy {acc_a:.2%} -> {acc_b:.2%} ({acc_b - acc_a:+.2%})")
    _render_verdict(result.verdict)
    table = Table(title="per category")
    for col in ("category", "A", "B", "change"):
        table.add_column(col)
    ranked = sorted(result.per_category, key=lambda row: ((row[2] or 0) - (row[1] or 0), row[0]))
    for label, x, y in ranked:
        change = "-" if x is None or y is None else f"{y - x:+.0%}"
        table.add_row(escape(label), "-" if x is None else f"{x:.0%}", "-" if y is None else f"{y:.0%}", change)
    console.print(table)
