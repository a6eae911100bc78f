"""Load: the real server (uvicorn subprocess) on 127.0.0.1 under N requests at concurrency C.

    python bench/load.py [--requests 10000] [--concurrency 64] [--run RUN_DIR]
    python bench/load.py --smoke             # 200 requests at concurrency 8, a fresh tiny run

Counts errors (anything but 200; 503 "queue full" included) and checks the prediction log
holds one row per acknowledged request (lost rows = acknowledged - logged). Reports
throughput and latency percentiles. Without --run it serves the tiny trained test model
(`tiny_run` in bench/common.py): the numbers measure the server, queue and log, not a real model's cost.
Only loopback; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from common import bench_parser, tiny_run, work_dir
from taskling.serve.predlog import count_rows

HOST = "127.0.0.1"
TEXTS = [
    "what's my balance",
    "set a timer for 5 minutes",
    "pay the electric bill",
    "will it rain tomorrow",
    "freeze my card now",
    "move 50 dollars to savings",
    "wake me at 7",
    "when is my bill due",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start(run: Path, db: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "taskling.cli",
        "serve",
        str(run),
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-url",
        f"sqlite:///{db}",
        "--threads",
        str(args.threads),
        "--dtype",
        "float32",
        "--max-queue",
        str(args.max_queue),
        "--max-batch",
        str(args.max_batch),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TASKLING_API_KEY"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://{HOST}:{port}"
    for _ in range(600):  # up to ~3 minutes to load
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


async def hammer(url: str, n: int, concurrency: int) -> tuple[list[float], dict[str, int], int, float]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    acknowledged = 0
    counter = iter(range(n))
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal acknowledged
            for _ in counter:  # bounded: the shared iterator yields n items in all
                text = rng.choice(TEXTS)
                t0 = time.perf_counter()
                try:
                    resp = await client.post("/v1/classify", json={"text": text})
                except httpx.HTTPError as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if resp.status_code == 200:
                    acknowledged += len(resp.json()["results"])
                else:
                    errors[str(resp.status_code)] = errors.get(str(resp.status_code), 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return latencies, errors, acknowledged, seconds


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.concurrency = 200, 8
    run = args.run or tiny_run(work_dir("load") if args.smoke else None)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "log.db"
        proc, url = start(run, db, args)
        try:
            latencies, errors, acknowledged, seconds = asyncio.run(hammer(url, args.requests, args.concurrency))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        logged = count_rows(f"sqlite:///{db}")
    table = Table(title=f"load: {args.requests} requests, concurrency {args.concurrency}, {run}")
    for col in ("requests/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "acknowledged", "logged", "lost"):
        table.add_column(col)
    table.add_row(
        f"{args.requests / seconds:.0f}",
        f"{pct(latencies, 0.5) * 1000:.1f}",
        f"{pct(latencies, 0.9) * 1000:.1f}",
        f"{pct(latencies, 0.99) * 1000:.1f}",
        f"{max(latencies) * 1000:.1f}",
        str(sum(errors.values())) + (f" {errors}" if errors else ""),
        str(acknowledged),
        str(logged),
        str(acknowledged - logged),
    )
    Console(width=120).print(table)
    print(
        f"throughput {args.requests / seconds:.1f} req/s, p99 {pct(latencies, 0.99) * 1000:.1f} ms, "
        f"errors {sum(errors.values())}, lost log rows {acknowledged - logged}"
    )
    sys.exit(1 if errors or acknowledged != logged else 0)


if __name__ == "__main__":
    main()
