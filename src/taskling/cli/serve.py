"""Serve and ship: serve, logs, export, push, predict-batch (docs/serve.md, docs/export.md, docs/scale.md)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from taskling.cli.common import (
    app,
    console,
    err_console,
    friendly_errors,
    progress_bar,
)
from taskling.errors import TasklingError


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
    retain_days: Annotated[
        float | None, typer.Option(help="Delete logged predictions older than this many days (at start, then hourly).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Texts per forward pass.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long to wait to fill a batch.")] = 2.0,
    max_queue: Annotated[int, typer.Option(help="Requests waiting before 503.")] = 256,
    max_texts: Annotated[int, typer.Option(help="Texts per request before 413.")] = 64,
    max_text_chars: Annotated[int, typer.Option(help="Characters per text before 413.")] = 20_000,
    max_body_bytes: Annotated[int, typer.Option(help="Request body bytes before 413.")] = 1_000_000,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: one per core).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8 (torch.ao) or int8-torchao: dynamic int8 on the CPU (gate it first: taskling eval --quantize)."
        ),
    ] = None,
    abstain: Annotated[
        bool, typer.Option("--abstain", help="Answer `unknown` under each run's abstain.json (taskling calibrate).")
    ] = False,
) -> None:
    """Serve RUN_DIR over HTTP: /v1/classify (/v1/extract, /v1/generate), /v1/chat/completions, /v1/models, /metrics.

    RUN_DIR and the runs in --adapters-dir may be classification, extraction or generation runs; a run
    with cascade.json is served as its cascade, each answer naming the stage that decided.

    Prints "ready" on stderr once the model is loaded and requests are answered.
    """
    from taskling.serve.server import ServeSettings
    from taskling.serve.server import serve as run_server
    from taskling.serve.settings import read_api_key

    key = read_api_key(api_key_file) if api_key_file is not None else os.environ.get("TASKLING_API_KEY") or None
    settings = ServeSettings(
        host=host,
        port=port,
        name=name,
        adapters_dir=adapters_dir,
        api_key=key,
        log_url=log_url or os.environ.get("TASKLING_LOG_URL") or None,
        retain_days=retain_days,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_texts=max_texts,
        max_text_chars=max_text_chars,
        max_body_bytes=max_body_bytes,
        threads=threads,
        dtype=dtype,
        quantize=quantize,
        abstain=abstain,
    )
    err_console.print(Text(f"loading {run_dir} ..."))
    ready = f"ready: serving {run_dir} on http://{host}:{port} (API key {'required' if key else 'off'})"
    run_server(run_dir, settings, on_ready=lambda: err_console.print(Text(ready)))


@app.command()
@friendly_errors
def logs(
    run_dir: Annotated[Path, typer.Argument(help="The served run (its predictions.db).")],
    url: Annotated[str | None, typer.Option(help="Prediction log URL instead (or TASKLING_LOG_URL).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the latest N rows.")] = None,
    label: Annotated[str | None, typer.Option(help="Only this predicted label.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Only this adapter.")] = None,
    stage: Annotated[str | None, typer.Option(help="Only answers decided by this cascade stage.")] = None,
    max_probability: Annotated[
        float | None, typer.Option(help="Only answers at most this confident (relabel the uncertain).")
    ] = None,
    export: Annotated[Path | None, typer.Option(help="Write JSONL (text, label, ...) for relabeling.")] = None,
) -> None:
    """Read the prediction log back, or export it as JSONL for relabeling."""
    from taskling.serve.predlog import count_rows, default_url, export_jsonl, read_rows

    url = url or os.environ.get("TASKLING_LOG_URL") or default_url(run_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise TasklingError(
            f"no prediction log at {url[len('sqlite:///') :]}", fix="serve the run first: taskling serve RUN_DIR"
        )
    rows = read_rows(
        url, limit=limit, label=label, adapter=adapter, stage=stage, max_probability=max_probability, newest=True
    )
    if export is not None:
        n = export_jsonl(rows, export)
        console.print(Text(f"wrote {n} rows to {export}"))
        return
    console.print(log_table(rows, count_rows(url)))


def generate_batch_cmd(run_dir: Path, input_path: Path, out: Path, engine: str, text_field: str, batch: int) -> None:
    """`predict-batch` on a generation run: one answer per row, invalid and empty rows counted."""
    from taskling.serve.generation import generate_batch, refuse_ray_for_generation

    refuse_ray_for_generation(engine)
    with progress_bar("predict-batch", "rows") as update:
        result = generate_batch(run_dir, input_path, out, text_field=text_field, batch_size=batch, progress=update)
    rate = f"{result.rows_per_second:.1f} rows/s, generation"
    console.print(Text(f"wrote {result.rows} rows to {result.output_path} ({rate})"))


def log_table(rows: Iterable[dict[str, Any]], total: int) -> Table:
    """Logged rows as a table; their text, labels and adapter names are shown as text, never as markup."""
    import datetime as dt

    table = Table(title=f"prediction log ({total} rows in all)")
    for col in ("time (UTC)", "adapter", "stage", "label", "p", "ms", "text"):
        table.add_column(col)
    for row in rows:
        when = dt.datetime.fromtimestamp(row["time"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        text = row["text"] if len(row["text"]) <= 80 else row["text"][:77] + "..."
        stage = row.get("stage") or "-"
        cells = (row["adapter"], stage, row["label"], f"{row['probability']:.2f}", f"{row['latency_ms']:.1f}", text)
        table.add_row(when, *(Text(str(cell)) for cell in cells))
    return table


@app.command("export")
@friendly_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    to: Annotated[str, typer.Option("--to", help="merged | gguf | ollama | vllm")],
    out: Annotated[Path | None, typer.Option("--out", help="Export directory (default RUN_DIR/exports/...).")] = None,
    quant: Annotated[
        str, typer.Option("--quant", help="GGUF weights: f16 | q8_0 | q4_0 | q4_K_M (q4_K_M needs llama.cpp).")
    ] = "f16",
    dtype: Annotated[str, typer.Option("--dtype", help="Saved weights for merged: float32 | bfloat16.")] = "float32",
) -> None:
    """Export a run: merged safetensors, GGUF, an Ollama Modelfile, or a vLLM LoRA launch line."""
    from taskling.export.exporter import export

    with progress_bar(f"export-{to}", "steps") as update:
        result = export(run_dir, to, out, quant=quant, dtype=dtype, progress=update)
    table = Table(title=Text(f"export: {to}"), show_header=False)
    table.add_row("directory", Text(str(result.out_dir)))
    for name in sorted(result.files):
        size = (result.out_dir / name).stat().st_size
        table.add_row(Text(name), f"{size / 1e6:.1f} MB  sha256 {result.files[name][:12]}")
    gguf_checks = result.checks.get("gguf", {})
    if "logits_max_relative_diff" in gguf_checks:
        table.add_row("GGUF round trip", f"logits within {gguf_checks['logits_max_relative_diff']:.2e} (relative)")
    labels = result.checks.get("labels") or gguf_checks.get("labels")
    if labels:
        table.add_row("labels agree with the run", f"{labels['agree']}/{labels['texts']}")
    console.print(table)
    if to == "ollama":
        console.print(Text(f"next: cd {result.out_dir} && ollama create NAME -f Modelfile"))
    elif to == "vllm":
        console.print(Text(f"next: bash {result.out_dir / 'launch.sh'}"))


@app.command("push")
@friendly_errors
def push_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    repo: Annotated[str, typer.Argument(help="Hub repository, e.g. you/intent-classifier.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
) -> None:
    """Push a run's adapter, tokenizer and a model card (gate verdict, metrics) to the Hugging Face Hub."""
    from taskling.export.hub import push

    with console.status(Text(f"pushing {run_dir} to {repo}")):
        result = push(run_dir, repo, private=private)
    console.print(Text(f"pushed {len(result.files)} files to {result.url}"))


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
    abstain: Annotated[
        bool, typer.Option("--abstain", help="Label `unknown` under the run's abstain.json (taskling calibrate).")
    ] = False,
) -> None:
    """Classify every row of a Parquet/JSONL/CSV file: input columns + label, probability, margin, probabilities.

    A cascade run (cascade.json) also writes the `stage` column: the stage that decided each row.
    A generation run writes output, valid, n_tokens and problem instead (a row without text is
    flagged, not dropped; local engine only).
    """
    from taskling.rundir import GENERATION, RunDir
    from taskling.serve.batch import predict_batch

    if RunDir(run_dir).kind() == GENERATION:
        generate_batch_cmd(run_dir, input_path, out, engine, text_field, batch_size)
        return

    with progress_bar("predict-batch", "rows") as update:
        result = predict_batch(
            run_dir,
            input_path,
            out,
            engine=engine,
            text_field=text_field,
            batch_size=batch_size,
            workers=workers,
            threads=threads,
            abstain=abstain,
            progress=update,
        )
    rate = f"{result.rows_per_second:.1f} rows/s, {result.engine}"
    console.print(Text(f"wrote {result.rows} rows to {result.output_path} ({rate})"))
