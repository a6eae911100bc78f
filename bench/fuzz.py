"""The fuzz suite at full size: 10,000+ generated cases across loaders and server bodies.

    python bench/fuzz.py [--scale 14]
    python bench/fuzz.py --smoke             # scale 0.05: a few cases per property

Runs tests/test_fuzz.py with every example count multiplied by --scale (the fast suite runs
760 cases at scale 1; scale 14 runs 10,640) and prints the cases run per property from
Hypothesis' statistics. Exit status is pytest's: 0 means no property failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from common import ROOT, bench_parser


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--scale", type=float, default=14)
    args = parser.parse_args()
    if args.smoke:
        args.scale = 0.05
    env = {**os.environ, "FUZZ_EXAMPLES_SCALE": str(args.scale), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider"]
    cmd += ["--hypothesis-show-statistics", "-o", "log_level=ERROR", str(ROOT / "tests" / "test_fuzz.py")]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    table = Table(title=f"fuzz: tests/test_fuzz.py at scale {args.scale:g} ({seconds:.0f}s)")
    table.add_column("property")
    table.add_column("cases", justify="right")
    table.add_column("invalid", justify="right")
    total = 0
    # Blocks: "tests/test_fuzz.py::NAME:" then "- during generate phase (...): N passing examples, ..."
    for name, block in re.findall(r"test_fuzz\.py::(\w+):\n(.*?)(?=\n\S|\Z)", proc.stdout, re.S):
        counts = [int(n) for n in re.findall(r"(\d+) passing", block)]
        invalid = [int(n) for n in re.findall(r"(\d+) invalid", block)]
        if counts:
            total += sum(counts)
            table.add_row(name, str(sum(counts)), str(sum(invalid)))
    table.add_row("[bold]total", f"[bold]{total}", "")
    Console(width=120).print(table)
    print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:])
    if proc.returncode:
        print(proc.stdout[-6000:])
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
