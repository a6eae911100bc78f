"""Server benchmark: N requests at concurrency C over loopback, every one checked in the log.

    python bench/serve.py                       # tiny random model (trained for a few steps), 5000 x 32
    python bench/serve.py --run runs/demo       # the real SmolLM2-135M demo run
    python bench/serve.py --requests 1000 --concurrency 8
    python bench/serve.py --smoke               # 200 requests at concurrency 8, fixture messages
    python bench/serve.py --cascade             # a tfidf -> lora cascade on a copy of the run
    python bench/serve.py --cascade --stages tfidf,minilm,lora --run runs/demo

Starts `taskling serve` on 127.0.0.1 (a free port, a fresh prediction log), waits for
/healthz, drives `/v1/classify` with one text per request from CLINC150 test messages, then
stops the server and counts the rows in its log: rows logged must equal requests answered.
With `--cascade` it first builds a cascade (`taskling.evaluate.cascade.build_cascade`) on a
copy of the run, and checks that the answers per stage in /metrics equal the log's.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from common import bench_parser, clinc_dir, clinc_texts, tiny_run, work_dir
from taskling.rundir import read_manifest
from taskling.serve.predlog import count_by_stage, count_rows

console = Console(width=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def messages(n: int, smoke: bool) -> list[str]:
    return clinc_texts(clinc_dir(None, smoke), n)


async def drive(url: str, texts: list[str], concurrency: int) -> tuple[list[float], dict[str, int], int]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_index = 0
    ok = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, ok
        while next_index < len(texts):
            text = texts[next_index]
            next_index += 1
            started = time.perf_counter()
            try:
                r = await client.post(url + "/v1/classify", json={"text": text})
            except httpx.HTTPError as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
            if r.status_code == 200:
                ok += 1
            else:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, errors, ok


def cascade_copy(run: Path, work: Path, stages: str) -> Path:
    """A copy of `run` with a cascade.json built on its own training and validation rows."""
    from taskling.evaluate.cascade import build_cascade

    copy = work / "cascade-run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("predictions.db*", "cascade*"))
    spec = build_cascade(copy, stages.split(","), latency_samples=5)
    console.print(f"cascade {' -> '.join(spec.stage_names)} built in {copy}")
    return copy


def stage_metrics(url: str) -> dict[str, int]:
    """Answers per stage from /metrics (`taskling_stage_answers_total`), summed over adapters."""
    text = httpx.get(url + "/metrics", timeout=10).text
    counts: dict[str, int] = {}
    for stage, value in re.findall(
        r'^taskling_stage_answers_total\{adapter="[^"]*",stage="([^"]*)"\} (\S+)$', text, re.M
    ):
        counts[stage] = counts.get(stage, 0) + int(float(value))
    return counts


def pct(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--run", help="a trained run (default: the tiny test model)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (1 leaves a core)")
    parser.add_argument("--cascade", action="store_true", help="serve a cascade built on (a copy of) the run")
    parser.add_argument("--stages", default="tfidf,lora", help="with --cascade: its stages")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.concurrency = 200, 8

    work = work_dir("serve")
    run = Path(args.run) if args.run else tiny_run(work, epochs=1, max_steps=5)
    model = "real: " + read_manifest(run)["base_model"] if args.run else "tiny random Llama"
    if args.cascade:
        run = cascade_copy(run, work, args.stages)
        model += f", cascade {args.stages}"
    db = work / "predictions.db"
    port = free_port()
    cmd = [sys.executable, "-m", "taskling.cli", "serve", str(run), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--log-url", f"sqlite:///{db}", "--max-batch", str(args.max_batch), "--threads", str(args.threads)]
    cmd += ["--max-queue", str(4 * args.concurrency)]
    log_file = (work / "server.err").open("wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {(work / 'server.err').read_text()}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        texts = messages(args.requests, args.smoke)
        _, _, warm_rows = asyncio.run(drive(url, texts[:64], 8))  # warm-up, not counted
        started = time.perf_counter()
        latencies, errors, ok = asyncio.run(drive(url, texts, args.concurrency))
        seconds = time.perf_counter() - started
        served_stages = stage_metrics(url) if args.cascade else {}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    logged = count_rows(f"sqlite:///{db}") - warm_rows

    table = Table(title=f"bench/serve.py: {args.requests} requests, concurrency {args.concurrency}, loopback")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("model", f"{model} ({run})")
    table.add_row("throughput", f"{ok / seconds:.1f} requests/s ({seconds:.1f} s)")
    table.add_row(
        "latency p50 / p99 (client side)", f"{pct(latencies, 0.5) * 1000:.1f} / {pct(latencies, 0.99) * 1000:.1f} ms"
    )
    table.add_row("answered 200", str(ok))
    table.add_row("errors", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0")
    verdict = "[green]equal[/]" if logged == ok else "[red]MISMATCH[/]"
    table.add_row("rows logged (must equal answered)", f"{logged} {verdict}")
    if args.cascade:
        logged_stages = {
            str(k): v for k, v in count_by_stage(f"sqlite:///{db}").items()
        }  # warm-up included, as in /metrics
        same = "[green]equal[/]" if logged_stages == served_stages else "[red]MISMATCH[/]"
        shares = ", ".join(f"{k} {v}" for k, v in sorted(served_stages.items()))
        table.add_row("answers per stage, /metrics (must equal the log's)", f"{shares} {same}")
        if logged_stages != served_stages:
            table.add_row("answers per stage, log", ", ".join(f"{k} {v}" for k, v in sorted(logged_stages.items())))
    table.add_row("load average", " ".join(f"{x:.1f}" for x in os.getloadavg()))
    console.print(table)


if __name__ == "__main__":
    main()
