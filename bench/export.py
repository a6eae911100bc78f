"""Export a run to every format and print time, size and the fidelity checks as a table.

    python bench/export.py RUN_DIR [--formats merged,gguf:f16,gguf:q8_0,ollama:f16,vllm]
    python bench/export.py --smoke           # a fresh tiny run, every format

Exports go to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from common import bench_parser, tiny_run, work_dir


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from taskling.export.exporter import export

    parser = bench_parser(__doc__)
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--formats", default="merged,gguf:f16,gguf:q8_0,ollama:f16,vllm")
    args = parser.parse_args()
    if args.run_dir is None:
        if not args.smoke:
            parser.error("RUN_DIR is required (or pass --smoke)")
        args.run_dir = tiny_run(work_dir("export"), max_steps=4)
    logging.basicConfig(level=logging.WARNING)

    table = Table(title=f"taskling export of {args.run_dir}")
    for col in ("format", "seconds", "MB", "weights rel. diff", "logits rel. diff", "labels agree", "max dP"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.formats.split(","):
            fmt, _, quant = spec.partition(":")
            started = time.perf_counter()
            result = export(args.run_dir, fmt, Path(tmp) / spec.replace(":", "-"), quant=quant or "f16")
            seconds = time.perf_counter() - started
            size = sum(p.stat().st_size for p in result.out_dir.rglob("*") if p.is_file()) / 1e6
            gguf = result.checks.get("gguf", {})
            labels = result.checks.get("labels") or gguf.get("labels") or {}
            table.add_row(
                spec,
                f"{seconds:.1f}",
                f"{size:.1f}",
                f"{gguf['weights_max_relative_diff']:.1e}" if "weights_max_relative_diff" in gguf else "-",
                f"{gguf['logits_max_relative_diff']:.1e}" if "logits_max_relative_diff" in gguf else "-",
                f"{labels['agree']}/{labels['texts']}" if labels else "-",
                f"{labels['max_probability_diff']:.4f}" if labels else "-",
            )
    Console(width=120).print(table)
    print("seconds include the checks (reloading and comparing); the machine's other load counts too")


if __name__ == "__main__":
    main()
