"""Data you can trust: distill, data report, split, label, synth (docs/data.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from taskling.cli.common import (
    app,
    console,
    friendly_errors,
    progress_bar,
    shown,
)
from taskling.errors import TasklingError
from taskling.io import read_json, write_json


def _clean_config(settings: list[str] | None) -> Any:
    """A CleanConfig from `key=value` settings; unknown keys are errors."""
    from pydantic import ValidationError

    from taskling.config import parse_overrides
    from taskling.data.clean import CleanConfig
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
        invented = list(report["invented_labels"].items())[:8]
        head.add_row("invented labels", ", ".join(f"{shown(k)} x{shown(v)}" for k, v in invented))
    console.print(head)
    cats = Table(title="rows per category (guide: 100-300; under 50 is a warning)")
    for col in ("category", "rows", "status"):
        cats.add_column(col)
    style = {"missing": "red", "too few": "red", "thin": "yellow", "ok": "green", "plenty": "green"}
    for row in sorted(report["categories"], key=lambda r: r["count"]):
        status = shown(row["status"])
        color = style.get(row["status"])
        cats.add_row(shown(row["label"]), shown(row["count"]), f"[{color}]{status}[/]" if color else status)
    console.print(cats)
    if report["warnings"]:
        console.print(
            f"[yellow]warning:[/] {len(report['warnings'])} categories under 50 rows: {shown(report['guide'])}"
        )
    issues = report["label_error_examples"][:10]
    if issues:
        top = Table(title="most likely label errors (review these first)")
        for col in ("rank", "where", "given", "model says", "text"):
            top.add_column(col)
        for i in issues:
            top.add_row(*(shown(i[k]) for k in ("rank", "where", "given", "suggested")), shown(str(i["text"])[:60]))
        console.print(top)


def _reasons(reasons: dict[str, int]) -> str:
    return f"  [dim]({', '.join(f'{shown(k)} {shown(v)}' for k, v in reasons.items())})[/]" if reasons else ""


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
    from taskling.data.distill import DistillConfig, distill, load_task_file

    config = DistillConfig(min_confidence=min_confidence, gold_manifest=gold_manifest, clean=_clean_config(settings))
    with progress_bar("distill", "cleaning stages", every_percent=1) as update:
        result = distill(logs, load_task_file(task), out, config, progress=update)
    render_data_report(result.report)
    console.print(
        f"{result.rows_read} rows -> {result.train} train, {result.review} review, {result.rejected} rejected "
        f"(in {shown(result.out_dir)})"
    )


data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("report")
@friendly_errors
def data_report_cmd(
    data: Annotated[
        Path, typer.Argument(help="A labeled file (JSONL, CSV, Parquet, a datasets folder) or a distill output folder.")
    ],
    task: Annotated[Path | None, typer.Option("--task", help="Task YAML (needed for a file).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Where to write the JSON report.")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help="Cleaning setting key=value.")] = None,
) -> None:
    """Counts per category against the guide, duplicates, label-error candidates, review queue."""
    from taskling.data.clean import build_report, clean_examples
    from taskling.data.columnar import table_format
    from taskling.data.distill import load_task_file
    from taskling.data.load import load_file

    if data.is_dir() and table_format(data, "auto") is None:  # a distill output folder, not a dataset
        if not (data / "report.json").is_file():
            raise TasklingError(f"{data} has no report.json", fix="run `taskling distill` into it, or give a file")
        report = read_json(data / "report.json")
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
    try:
        render_data_report(report)
    except (KeyError, TypeError, AttributeError) as err:
        raise TasklingError(
            f"{data} does not hold a taskling data report (missing or malformed {err})",
            fix="run `taskling distill` again to rewrite report.json",
        ) from None
    write_json(target, report)
    console.print(f"wrote {shown(target)}")


@app.command("split")
@friendly_errors
def split_cmd(
    data: Annotated[list[Path], typer.Argument(help="Labeled JSONL/CSV/Parquet/datasets, e.g. distill's train.jsonl.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (gold is frozen here once).")],
    task: Annotated[Path | None, typer.Option("--task", help="Task YAML: check labels.")] = None,
    gold_fraction: Annotated[float, typer.Option(help="Share of rows for gold (first run only).")] = 0.15,
    validation_fraction: Annotated[float, typer.Option(help="Share of rows for validation.")] = 0.1,
    min_gold: Annotated[int, typer.Option(help="Gold rows at least per label (rare labels too).")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Stratified train/validation/gold split; the gold set is frozen with a manifest."""
    from taskling.data.distill import load_task_file
    from taskling.data.load import load_files
    from taskling.data.split import MANIFEST, SplitConfig, split_dataset

    spec = load_task_file(task) if task else None
    examples = load_files(data, spec).examples
    config = SplitConfig(
        gold_fraction=gold_fraction, validation_fraction=validation_fraction, min_gold_per_label=min_gold, seed=seed
    )
    result = split_dataset(examples, out, config)
    state = "reused the frozen gold set" if result.gold_reused else "froze a new gold set"
    console.print(
        f"{state}: {len(result.gold)} gold rows; {len(result.train)} train, {len(result.validation)} validation, "
        f"{len(result.leaked)} leaked rows dropped (see {shown(out / 'leaked.jsonl')})"
    )
    if result.labels_without_gold:
        console.print(f"[yellow]warning:[/] no gold rows for: {', '.join(map(shown, result.labels_without_gold))}")
    console.print(f"train with `data.gold_manifest: {shown(out / MANIFEST)}` to refuse leaks")


@app.command("label")
@friendly_errors
def label_cmd(
    texts_file: Annotated[Path, typer.Argument(help="Unlabeled texts: one a line, or JSONL with `text`.")],
    task: Annotated[Path, typer.Option("--task", help="Task YAML (labels).")],
    out: Annotated[Path, typer.Option("--out", help="Teacher-log JSONL to write (feed it to distill).")],
    model: Annotated[str | None, typer.Option(help="Teacher model (default $TASKLING_TEACHER_MODEL).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
    max_retries: Annotated[int, typer.Option(min=0, help="Retries per request on 429/5xx/timeouts.")] = 5,
) -> None:
    """Label texts with a teacher (any OpenAI-compatible endpoint from the environment)."""
    from taskling.data.distill import load_task_file
    from taskling.data.retry import RetryPolicy
    from taskling.data.teacher import TeacherClient, label_texts, read_texts, usage_dict
    from taskling.io import write_jsonl

    spec = load_task_file(task)
    texts = read_texts(texts_file)
    client = TeacherClient(model=model, concurrency=concurrency, retry=RetryPolicy(max_retries=max_retries))
    with progress_bar(f"labeling with {client.model}", "texts") as progress:
        rows = label_texts(texts, spec, client, progress=progress)
    client.close()
    write_jsonl(out, rows)
    usage = usage_dict(client.usage)
    console.print(f"wrote {len(rows)} rows to {shown(out)}; next: taskling distill {shown(out)} --task {shown(task)}")
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
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
    max_retries: Annotated[int, typer.Option(min=0, help="Retries per request on 429/5xx/timeouts.")] = 5,
) -> None:
    """Ask the teacher for diverse examples per category; keep only validated ones."""
    from taskling.data.distill import load_task_file
    from taskling.data.load import write_examples
    from taskling.data.retry import RetryPolicy
    from taskling.data.split import load_gold, manifest_clean_config
    from taskling.data.teacher import TeacherClient, synthesize, usage_dict
    from taskling.io import write_jsonl

    spec = load_task_file(task)
    gold, clean = (None, None)
    if gold_manifest is not None:
        gold, manifest = load_gold(gold_manifest)
        clean = manifest_clean_config(manifest)
    client = TeacherClient(model=model, concurrency=concurrency, retry=RetryPolicy(max_retries=max_retries))
    with progress_bar(f"asking {client.model} for {per_label} examples per category", "categories") as progress:
        result = synthesize(spec, client, per_label=per_label, gold=gold, clean_config=clean, progress=progress)
    client.close()
    write_examples(out, result.accepted)
    rejected_path = out.with_name(out.stem + ".rejected.jsonl")
    write_jsonl(rejected_path, result.rejected)
    console.print(
        f"accepted {len(result.accepted)} -> {shown(out)}; rejected {len(result.rejected)} "
        f"{shown(result.rejected_by_reason())} -> {shown(rejected_path)}"
    )
    console.print("teacher usage: " + ", ".join(f"{k} {v}" for k, v in usage_dict(client.usage).items()))
