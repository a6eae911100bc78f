"""Does DPO help? Pairs from an SFT run's mistakes, a DPO refinement, the gold set per category.

    python bench/dpo_refine.py SFT_RUN OUT_DIR [--rows 80 --gold-per-label 5 --beta 0.1 --lr 1e-4 --epochs 1]
    python bench/dpo_refine.py --smoke       # a fresh tiny run, 24 rows, the clinc8 fixture gold

SFT_RUN is copied into OUT_DIR/sft (it is never written to). Pairs come from the SFT model's
answers on its first `--rows` training rows (mistakes, plus right answers with a margin
below `--margin-below` paired with the runner-up). The gold set is CLINC150 test rows of the
run's labels (`--gold-per-label` each; for an extraction run pass `--gold FILE`). Prints
accuracy and the per-category (per-field) change, and the gate's verdict.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from common import FIXTURES, bench_parser, clinc_dir, read_rows, tiny_run, work_dir, write_rows
from taskling.rundir import read_manifest


def clinc_gold(labels: list[str], per_label: int, out: Path) -> Path:
    taken: dict[str, int] = {}
    rows = []
    for row in read_rows(clinc_dir(None, smoke=False) / "test.jsonl"):
        if row["label"] in labels and taken.get(row["label"], 0) < per_label:
            taken[row["label"]] = taken.get(row["label"], 0) + 1
            rows.append(row)
    return write_rows(out, rows)


def main(argv: list[str]) -> None:
    import logging

    from taskling.evaluate.refine import compare
    from taskling.train.dpo import build_pairs, dpo

    parser = bench_parser(__doc__)
    parser.add_argument("sft_run", type=Path, nargs="?")
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--rows", type=int, default=80)
    parser.add_argument("--gold", type=Path)
    parser.add_argument("--gold-per-label", type=int, default=5)
    parser.add_argument("--margin-below", type=float, default=0.0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    if args.smoke:
        work = work_dir("dpo")
        args.sft_run, args.out = args.sft_run or tiny_run(work), args.out or work / "out"
        args.gold, args.rows = args.gold or FIXTURES / "clinc8_gold.jsonl", 24
    elif args.sft_run is None or args.out is None:
        parser.error("SFT_RUN and OUT_DIR are required (or pass --smoke)")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO)

    sft = args.out / "sft"
    if not sft.exists():
        shutil.copytree(args.sft_run, sft, ignore=shutil.ignore_patterns("checkpoint*", "compare"))
    manifest = read_manifest(sft, kind=None)
    gold = args.gold or clinc_gold(list(manifest["task"]["labels"]), args.gold_per_label, args.out / "gold.jsonl")
    started = time.perf_counter()
    pairs, counts = build_pairs(sft, args.out / "pairs.jsonl", margin_below=args.margin_below, limit=args.rows)
    t_pairs = time.perf_counter() - started
    result = dpo(sft, pairs, args.out / "dpo", beta=args.beta, learning_rate=args.lr, epochs=args.epochs)
    t_dpo = time.perf_counter() - started - t_pairs
    report = compare(sft, result.run_dir, gold)
    loss = f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
    print(f"\npairs: {counts} ({t_pairs:.0f} s); DPO: {result.steps} steps, {loss}, ", end="")
    print(f"chosen preferred on {result.reward_accuracy:.0%} of pairs ({t_dpo:.0f} s)")
    print(f"gold accuracy {report['accuracy_before']:.2%} -> {report['accuracy_after']:.2%}")
    print(f"{'category / field':<24} {'before':>7} {'after':>7} {'change':>7} {'n':>4}")
    for name, row in sorted(report["per_category"].items(), key=lambda kv: kv[1]["delta"]):
        print(f"{name:<24} {row['before']:7.0%} {row['after']:7.0%} {row['delta']:+7.0%} {row['support']:>4}")
    print("gate:", "passed" if report["gate_passed"] else "failed", json.dumps(report["gate"]))


if __name__ == "__main__":
    main(sys.argv[1:])
