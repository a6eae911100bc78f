"""Keep it honest: monitor, sample, retrain, gold add, calibrate (docs/monitor.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from taskling.cli.common import (
    app,
    console,
    friendly_errors,
)
from taskling.errors import TasklingError
from taskling.rundir import RunDir

# Labels, texts, run and file names come from the user: every one printed through rich goes
# through `escape`, so "[b]x[/b]" or "[/]" in a label or a path is shown as written.


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
    from taskling.monitor.drift import load_monitor_config, monitor, write_report

    with console.status(f"checking {escape(str(run_dir))} since {escape(since)}"):
        report = monitor(run_dir, since=since, url=db, config=load_monitor_config(config), adapter=adapter)
        json_path, html_path = write_report(report, out or RunDir(run_dir).monitor)
    table = Table(title=f"drift since {escape(since)}: {report.window['rows']} requests")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for s in report.signals:
        table.add_row(s.name, "[bold red]ALARM[/]" if s.alarm else "[green]ok[/]", escape(s.detail))
    console.print(table)
    console.print(f"report: {escape(str(html_path))}  (json: {escape(str(json_path))})")
    if report.alarm:
        console.print("[bold red]moved:[/] " + escape(", ".join(s.name for s in report.moved)))
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
    from taskling.monitor.drift import load_monitor_config
    from taskling.monitor.retrain import SampleConfig, sample_run

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
        f"{len(result.rows)} of {result.considered} rows -> {escape(str(out))} "
        f"({picked} active, {len(result.rows) - picked} random); "
        f"excluded: {escape(str(result.excluded))}"
    )
    console.print(
        "next: correct each row's `label` (or run the teacher), then taskling retrain CONFIG --data " + escape(str(out))
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
    margin: Annotated[
        float, typer.Option(help="Largest accuracy drop allowed against production, significant or not.")
    ] = 0.01,
    category_margin: Annotated[
        float, typer.Option("--category-margin", help="Largest accuracy drop allowed in any category.")
    ] = 0.10,
) -> None:
    """New training version (cleaned, gold-leak free) -> train a candidate -> gate -> promote if it passes."""
    from taskling.config import load_config
    from taskling.data.gold import load_version
    from taskling.evaluate.gate import gate_settings
    from taskling.monitor.retrain import classifier_loader, lora_trainer, new_training_version, production_run, retrain

    settings = gate_settings(margin=margin, category_margin=category_margin)  # bad values fail before training
    labels = list(load_config(config).task.labels)
    prod = production or production_run(registry)
    version = new_training_version(versions, data, labels, base_train=RunDir(prod).train_data, gold_roots=[gold])
    console.print(f"training version {escape(str(version.path))}: {version.counts}")
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
        gate_settings=settings,
    )
    verdict = "[green]PROMOTED[/]" if result.promoted else "[bold red]BLOCKED[/]"
    console.print(
        f"{verdict} {escape(str(cand))}: accuracy {result.candidate_accuracy:.2%} vs production "
        f"{result.production_accuracy:.2%} on gold {escape(result.gold)}"
    )
    ni = result.verdict["non_inferiority"]
    console.print(
        f"  non-inferiority: accuracy dropped {ni['accuracy_drop']:+.2%} (margin {ni['margin']:.2%}); "
        f"category margin {ni['category_margin']:.0%}"
        + (f", beyond it: {escape(', '.join(ni['categories_over_margin']))}" if ni["categories_over_margin"] else "")
    )
    for failure in result.verdict["failed"]:
        console.print(f"  failed {escape(failure)}")
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
    from taskling.data.gold import add_gold
    from taskling.data.load import load_files
    from taskling.evaluate.baseline import read_labels, task_labels

    label_set = task_labels(Path(labels)) if Path(labels).is_dir() else read_labels(labels)
    train_rows = load_files(train).examples if train else []
    result = add_gold(gold_root, files, label_set or [], train=train_rows)
    console.print(
        f"gold {escape(result.version.tag)}: {len(result.version.rows)} rows ({result.added} added, "
        f"{len(result.rejected)} rejected -> {escape(str(result.version.path / 'rejected.jsonl'))})"
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
    from taskling.data.load import load_file
    from taskling.monitor.config import MonitorConfig
    from taskling.monitor.reference import calibrate
    from taskling.serve.abstain import calibrate_threshold
    from taskling.serve.classifier import Classifier

    if metric not in ("probability", "margin"):
        raise TasklingError(f"--metric {metric!r} is unknown", fix="use --metric probability or --metric margin")
    clf = Classifier.from_run(run_dir)
    rows = load_file(data or RunDir(run_dir).validation_data, clf.task).examples
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
        f"{threshold.in_scope_accuracy:.1%}, coverage {threshold.in_scope_coverage:.1%}{recall} -> " + escape(str(path))
    )
