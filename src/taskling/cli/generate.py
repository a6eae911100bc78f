"""Fixed-format generation (docs/generate.md): `generate`, and what `train`, `eval`, `baseline`
and `gate` do when the config or run is a generation one (`task.kind: generate`)."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from taskling.cli.common import (
    app,
    console,
    friendly_errors,
    progress_bar,
    render_train_summary,
    shown,
    training_progress,
)
from taskling.errors import DataError, TasklingError


def train_generation_config(config: Path, overrides: list[str]) -> None:
    """`taskling train CONFIG` for a `task.kind: generate` config."""
    from taskling.generate.spec import load_generation_config
    from taskling.train.generation import train_generation

    cfg = load_generation_config(config, overrides)
    with training_progress() as update:
        result = train_generation(cfg, progress=update)
    render_train_summary(result)


def render_generation_metrics(metrics: dict[str, Any], title: str = "generation") -> None:
    head = Table(title=title, show_header=False)
    head.add_row("rows", str(metrics["n"]))
    for key, value in metrics["means"].items():
        head.add_row(shown(key), f"{value:.4f}")
    head.add_row(
        "format validity", f"{metrics['validity_rate']:.2%} ({metrics['cut_by_max_tokens']} cut by max_tokens)"
    )
    head.add_row(
        "worst slice", f"{shown(metrics['worst_slice'])} ({metrics['metric']} {metrics['worst_slice_score']:.3f})"
    )
    console.print(head)
    if len(metrics["per_slice"]) > 1:
        slices = Table(title=f"per slice ({metrics['metric']})")
        for col in ("slice", "rows", metrics["metric"], "valid"):
            slices.add_column(shown(col))
        for name, s in metrics["per_slice"].items():
            slices.add_row(shown(name), str(int(s["n"])), f"{s[metrics['metric']]:.3f}", f"{s['valid']:.0%}")
        console.print(slices)


def eval_generation_run(run_dir: Path, data: Path, out: Path | None, batch_size: int, embed: bool) -> None:
    """`taskling eval RUN --data GOLD` for a generation run."""
    from taskling.evaluate.generation import evaluate_generation

    with progress_bar("eval", "rows") as update:
        result = evaluate_generation(run_dir, data, out_dir=out, batch_size=batch_size, embed=embed, progress=update)
    render_generation_metrics(result.metrics)
    console.print(Text(f"wrote {result.metrics_path} and {result.predictions_path}"))


def pin_generation(run_dir: Path, gold: Path, predictions: Path, name: str, repin: bool) -> None:
    """`taskling baseline RUN` for a generation run: the teacher's outputs scored once and pinned."""
    from taskling.evaluate.generation_gate import pin_generation_baseline

    payload = pin_generation_baseline(run_dir, gold, predictions, name=name, repin=repin)
    means = ", ".join(f"{k} {v:.3f}" for k, v in payload["means"].items())
    console.print(Text(f"pinned {name} on gold {payload['gold_hash'][:12]} ({payload['n']} rows): {means}"))


def gate_generation_run(run_dir: Path, against: Path | None, margin: float, metric: str | None) -> bool:
    """`taskling gate RUN` for a generation run; prints the verdict, returns whether it passed."""
    from taskling.evaluate.generation_gate import gate_generation

    verdict = gate_generation(run_dir, against, margin=margin, metric=metric)
    style = "bold green" if verdict.passed else "bold red"
    console.print(
        Text.assemble(
            ("PASS" if verdict.passed else "FAIL", style),
            f"  {verdict.candidate} vs {verdict.reference} on {verdict.n} gold rows, {verdict.metric}: "
            f"{verdict.candidate_mean:.4f} vs {verdict.reference_mean:.4f}",
        )
    )
    for check in verdict.checks:
        mark = ("ok  ", "green") if check["passed"] else ("FAIL", "red")
        console.print(Text.assemble(mark, f" {check['name']}: {check['detail']}"))
    return verdict.passed


def read_messages(file: Path) -> list[str]:
    """Every line of `file` ('-': stdin), blank ones included; a line that is not UTF-8 is a DataError naming it."""
    data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes() if file.is_file() else None
    if data is None:
        raise DataError("file does not exist", path=file, fix="check the --file path")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, raw in enumerate(lines, start=1):
        try:
            out.append(raw.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError("not UTF-8 text", path=file, line=number, fix="re-save the file as UTF-8") from None
    return out


@app.command()
@friendly_errors
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A generation run directory (task.kind: generate).")],
    texts: Annotated[list[str] | None, typer.Argument(help="Messages to answer.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="One message a line ('-' for stdin).")] = None,
    batch_size: Annotated[int, typer.Option(help="Messages decoded together.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines: text, output, valid, n_tokens, ms.")] = False,
) -> None:
    """Answer messages in the task's fixed format (regex and SQL formats are enforced while decoding).

    One output line per input, in order. Exit code 1 when an answer is invalid (cut by
    max_tokens, or SQL that does not run) or an input line cannot be used.
    """
    from taskling.generate.generator import Generator

    messages = [("argument", i, t) for i, t in enumerate(texts or [], start=1)]
    if file is not None:
        messages += [("line", i, t) for i, t in enumerate(read_messages(file), start=1)]
    if not messages:
        raise TasklingError("nothing to generate from", fix="give messages as arguments or --file messages.txt")
    generator = Generator.from_run(run_dir)
    good = [text for _, _, text in messages if text.strip()]
    with progress_bar("generate", "messages") if file is not None else nullcontext() as update:
        answers = iter(generator.generate(good, batch_size=batch_size, progress=update))
    ok = len(good) == len(messages)
    for source, number, text in messages:
        if not text.strip():
            message = {source: number, "error": "empty message"}
            typer.echo(json.dumps(message) if as_json else f"{source} {number}: empty message")
            continue
        answer = next(answers)
        ok = ok and answer.valid
        if as_json:
            row = {"text": answer.text, "output": answer.output, "valid": answer.valid}
            row |= {"n_tokens": answer.n_tokens, "ms": round(answer.ms, 1)}
            typer.echo(json.dumps(row | ({"problem": answer.problem} if answer.problem else {}), ensure_ascii=False))
        else:
            typer.echo(answer.output)
    if not ok:
        raise typer.Exit(1)
