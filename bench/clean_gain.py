"""What does cleaning buy? Train cheap classifiers on raw noisy teacher logs and on the
`taskling distill` output, and score both on the same gold set.

    python bench/clean_gain.py [--flip-rate 0.1] [--minilm] [--data ../shared/data/clinc150]
    python bench/clean_gain.py --smoke        # the 8-intent fixture subset, seconds

Noisy logs come from the 15,000 CLINC150 train rows (150 intents) via
bench/noisy_logs.py: flipped labels (--flip-rate), invented labels, low confidences,
exact and near duplicates, conflicting labels, and copies of gold rows. Gold is the
4,500-row CLINC150 test split, frozen with a manifest so distill rejects the copies.
"Raw" trains on every parsed log row as the teacher answered it (invented labels become
extra classes); "cleaned" trains on distill's train.jsonl only. Models: TF-IDF +
softmax regression, and with --minilm all-MiniLM-L6-v2 embeddings + softmax regression.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import bench_parser, clinc_dir
from noisy_logs import load_pairs, make_noisy_logs
from taskling.data.clean import CleanConfig, fit_predict
from taskling.data.dedupe import normalize
from taskling.data.distill import DistillConfig, distill, read_logs
from taskling.data.load import load_file
from taskling.data.split import SplitConfig, freeze_gold
from taskling.task import Task


def accuracy(kind: str, train: list[tuple[str, str]], gold: list[tuple[str, str]], vectors: dict[str, Any]) -> float:
    import torch

    torch.set_num_threads(1)
    classes = sorted({y for _, y in train})
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for _, label in train])
    if kind == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, dtype=np.float32)
        x_train = vec.fit_transform([normalize(t) for t, _ in train]).tocsr()
        x_gold = vec.transform([normalize(t) for t, _ in gold]).tocsr()
    else:
        x_train = np.stack([vectors[t] for t, _ in train])
        x_gold = np.stack([vectors[t] for t, _ in gold])
    probs = fit_predict(x_train, y, x_gold, len(classes), seed=0)
    predicted = [classes[i] for i in probs.argmax(axis=1)]
    return float(np.mean([p == label for p, (_, label) in zip(predicted, gold, strict=True)]))


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--data", type=Path, default=None, help="CLINC150 folder (default: as demo finds it)")
    parser.add_argument("--flip-rate", type=float, default=0.1)
    parser.add_argument("--minilm", action="store_true", help="also MiniLM embeddings (slow on a busy CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = clinc_dir(args.data, args.smoke)

    rows = load_pairs(data / "train.jsonl")
    gold = load_file(data / "test.jsonl").examples
    labels = sorted({y for _, y in rows})
    n = len(rows)
    logs = make_noisy_logs(
        rows,
        gold,
        labels,
        seed=args.seed,
        malformed=2,
        invented=n // 50,
        loose=n // 100,
        low_confidence=n // 20,
        exact_dups=n // 20,
        near_dups=n // 20,
        conflicts=n // 100,
        flips=int(n * args.flip_rate),
        gold_exact=min(300, len(gold) // 15),
        gold_near=min(200, len(gold) // 20),
    )
    root = Path(tempfile.mkdtemp(prefix="clean-gain-"))
    (root / "gold").mkdir()
    freeze_gold(root / "gold", gold, SplitConfig(), CleanConfig())
    start = time.perf_counter()
    result = distill(
        [logs.write(root / "logs.jsonl")],
        Task(labels=labels),
        root / "out",
        DistillConfig(gold_manifest=root / "gold" / "gold.manifest.json"),
    )
    seconds = time.perf_counter() - start
    raw_rows, _ = read_logs([root / "logs.jsonl"])
    raw = [(r.text, r.label) for r in raw_rows]
    cleaned = load_pairs(root / "out" / "train.jsonl")
    golden = [(g.text, g.label) for g in gold]
    review = [json.loads(line) for line in (root / "out" / "review.jsonl").read_text().splitlines()]
    flagged = {r["text"] for r in review if r["reason"] == "likely_label_error"}
    caught = len(flagged & logs.flipped_texts)

    truth = logs.truth | {"invented": sum(logs.truth["invented"].values())}
    print(f"\nnoisy logs: {logs.truth['rows']:,} rows; injected {truth}")
    print(f"distill: {seconds:.0f} s -> train {result.train:,}, review {result.review:,}, rejected {result.rejected:,}")
    precision = caught / max(1, len(flagged))
    print(f"flipped labels sent to review: {caught}/{len(logs.flipped_texts)} (precision {precision:.0%})")
    left = sum(1 for t, _ in cleaned if t in logs.flipped_texts)
    print(f"flipped labels left in cleaned train: {left} of {len(cleaned):,} rows ({left / len(cleaned):.1%})\n")
    # What the review queue is for: a reviewer fixes the queued rows (simulated with the true labels).
    fixed = [(r["text"], logs.true_labels[r["text"]]) for r in review if r["text"] in logs.true_labels]
    gold_keys = {normalize(t) for t, _ in golden}
    rejected = [json.loads(line) for line in (root / "out" / "rejected.jsonl").read_text().splitlines()]
    leaked = {r["text"] for r in rejected if r.get("reason") == "gold_leak"}
    sets = {
        "raw logs": raw,
        "raw minus gold copies": [(t, y) for t, y in raw if t not in leaked and normalize(t) not in gold_keys],
        "cleaned": cleaned,
        "cleaned + queue reviewed": cleaned + fixed,
    }
    vectors: dict[str, Any] = {}
    if args.minilm:
        from taskling.model.embed import embed

        texts = sorted({t for rows in sets.values() for t, _ in rows} | {t for t, _ in golden})
        vectors = dict(zip(texts, embed(texts), strict=True))
    print(f"| model (gold: CLINC150 test, {len(golden):,} rows) | " + " | ".join(sets) + " |")
    print("|---" * (len(sets) + 1) + "|")
    print("| training rows | " + " | ".join(f"{len(rows):,}" for rows in sets.values()) + " |")
    for kind in ["tfidf"] + (["minilm"] if args.minilm else []):
        name = "TF-IDF + softmax regression" if kind == "tfidf" else "MiniLM embeddings + softmax regression"
        scores = [accuracy(kind, rows, golden, vectors) for rows in sets.values()]
        print(f"| {name} | " + " | ".join(f"{a:.2%}" for a in scores) + " |")


if __name__ == "__main__":
    main()
