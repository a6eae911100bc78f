"""Adversarial messages through `Classifier.predict`: is any answer outside the label set?

    python bench/adversarial.py [--n 10000] [--run RUN_DIR]
    python bench/adversarial.py --smoke      # 300 messages, a fresh tiny run

Without --run it uses the tiny trained test model (bench/common.py's `tiny_run`): the point is the
guarantee (constrained decoding answers only labels; long inputs are cut by the rule in
`ChatFormat.prompt_ids`), which holds for any weights. Prints one row per kind of attack.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from adversarial_inputs import adversarial_messages
from common import bench_parser, tiny_run, work_dir
from taskling.serve.classifier import Classifier


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.smoke:
        args.n = 300
    torch.set_num_threads(1)
    run = args.run or tiny_run(work_dir("adversarial") if args.smoke else None)
    clf = Classifier.from_run(run, threads=1)
    labels = set(clf.task.labels)
    budget = clf.fmt.max_length - clf.fmt.max_answer_length
    messages = adversarial_messages(clf.task.labels, args.n, seed=args.seed)
    started = time.perf_counter()
    preds = clf.predict([text for _, text in messages], batch_size=32)
    seconds = time.perf_counter() - started
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (kind, text), pred in zip(messages, preds, strict=True):
        r = rows[kind]
        r["outside"].append(float(pred.label not in labels))
        r["bad_probs"].append(float(not math.isclose(sum(pred.probabilities.values()), 1.0, abs_tol=1e-4)))
        r["p"].append(pred.probability)
        r["chars"].append(len(text))
        ids = clf.fmt.prompt_ids(text) if len(text) > 2000 else None
        if ids is not None:
            r["prompt_tokens"].append(len(ids))
    table = Table(title=f"{args.n} adversarial messages, {run} ({seconds:.0f}s, {args.n / seconds:.0f} msg/s)")
    for col in ("kind", "n", "outside set", "probs not summing to 1", "mean p(top)", "max chars", "max prompt tok"):
        table.add_column(col)
    total_outside = 0
    for kind, r in rows.items():
        outside = int(sum(r["outside"]))
        total_outside += outside
        tok = max(r["prompt_tokens"]) if r["prompt_tokens"] else "-"
        table.add_row(
            kind,
            str(len(r["p"])),
            str(outside),
            str(int(sum(r["bad_probs"]))),
            f"{statistics.mean(r['p']):.3f}",
            str(int(max(r["chars"]))),
            f"{tok} (budget {budget})" if tok != "-" else "-",
        )
    Console(width=120).print(table)
    print(f"answers outside the label set: {total_outside} / {args.n}")
    sys.exit(1 if total_outside else 0)


if __name__ == "__main__":
    main()
