"""Time dedupe and label-error detection on 100k rows built from CLINC150.

    python bench/data.py [--rows 100000] [--data ../shared/data/clinc150]
    python bench/data.py --smoke             # 2,000 rows from the 8-intent fixture subset

The 22,500 in-scope CLINC150 rows are repeated with exact variants (case, punctuation)
and near variants (a small edit) up to --rows, and 5% of labels are flipped. Prints a
table of stage timings and what each stage found; the budget is 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from common import bench_parser, clinc_dir
from noisy_logs import EDITS, exact_variant
from taskling.data.clean import CleanConfig, find_label_issues
from taskling.data.dedupe import duplicate_clusters, normalize
from taskling.data.load import Example


def build_rows(data: Path, n: int, seed: int) -> tuple[list[Example], set[int], list[str]]:
    rows = []
    for name in ("train", "validation", "test"):
        rows += [json.loads(line) for line in (data / f"{name}.jsonl").read_text().splitlines()]
    labels = sorted({r["label"] for r in rows})
    rng = random.Random(seed)
    out = [Example(r["text"], r["label"]) for r in rows]
    while len(out) < n:
        r = rng.choice(rows)
        text = exact_variant(r["text"], rng) if rng.random() < 0.5 else rng.choice(EDITS)(r["text"])
        out.append(Example(text, r["label"]))
    flipped = set(rng.sample(range(len(out)), len(out) // 20))
    out = [
        Example(ex.text, rng.choice([y for y in labels if y != ex.label])) if i in flipped else ex
        for i, ex in enumerate(out)
    ]
    return out[:n], flipped, labels


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=None, help="CLINC150 folder (default: as demo finds it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    threads = torch.get_num_threads()
    rows = 2000 if args.smoke else args.rows
    examples, flipped, labels = build_rows(clinc_dir(args.data, args.smoke), rows, args.seed)
    config = CleanConfig()
    table = []

    start = time.perf_counter()
    normed = {normalize(ex.text) for ex in examples}
    table.append(("normalise + exact keys", time.perf_counter() - start, f"{len(examples) - len(normed)} exact dups"))

    start = time.perf_counter()
    groups = duplicate_clusters([ex.text for ex in examples], config)
    extra = sum(len(g) - 1 for g in groups)
    table.append(("exact + near dedupe (MinHash/LSH)", time.perf_counter() - start, f"{extra} rows removable"))

    start = time.perf_counter()
    issues = find_label_issues(examples, labels, config)
    found = {issue.index for issue in issues}
    hit = len(found & flipped)
    table.append(
        (
            "label errors (TF-IDF + softmax reg., 5-fold, cleanlab)",
            time.perf_counter() - start,
            f"{len(found)} flagged; recall {hit / len(flipped):.1%}, precision {hit / max(1, len(found)):.1%}",
        )
    )
    total = sum(t for _, t, _ in table[1:])
    print(f"\n{len(examples):,} rows, {len(labels)} labels, {len(flipped):,} flipped labels, torch threads {threads}\n")
    print(f"| {'stage':<55} | {'seconds':>8} | result")
    print(f"|{'-' * 57}|{'-' * 10}|{'-' * 40}")
    for name, seconds, note in table:
        print(f"| {name:<55} | {seconds:8.1f} | {note}")
    print(f"| {'total (dedupe + label errors)':<55} | {total:8.1f} | budget 120 s")


if __name__ == "__main__":
    main()
