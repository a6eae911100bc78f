"""Noisy teacher logs with known problems, derived from clean CLINC150 rows.

`make_noisy_logs` takes clean (text, label) rows and a gold set and injects, in known
numbers: malformed rows, invented labels, a loosely written label, low teacher
confidences, exact duplicates (case/punctuation variants), near-duplicates (a small
edit), conflicting labels for the same text, flipped labels, and gold rows (exact and
near copies) smuggled into the logs. `truth` holds the counts a cleaner must find.

Used by bench/clean_gain.py and bench/data.py (on CLINC150, or the clinc8 fixtures with --smoke)
and by tests/test_clean.py.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskling.data.clean import CleanConfig
from taskling.data.dedupe import duplicate_clusters, find_leaks, jaccard, normalize, shingles
from taskling.data.load import Example

INVENTED = ("other", "book_hotel", "account_balance_inquiry")
EDITS = (
    lambda t: t + " please",
    lambda t: "hey " + t,
    lambda t: t + " now",
    lambda t: "so " + t + " thanks",
    lambda t: t.replace(" ", "  ", 1).replace("e", "ee", 1),
)


@dataclass
class NoisyLogs:
    lines: list[str]
    gold: list[Example]
    truth: dict[str, Any] = field(default_factory=dict)
    flipped_texts: set[str] = field(default_factory=set)
    # The right label of every log text (what a careful reviewer would write).
    true_labels: dict[str, str] = field(default_factory=dict)

    def write(self, path: Path) -> Path:
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        return path


def near_variant(text: str, config: CleanConfig, rng: random.Random, margin: float = 0.08) -> str | None:
    """A small edit of `text` that is a near- but not an exact duplicate under `config`."""
    base = shingles(text, config.shingle_size)
    edits = list(EDITS)
    rng.shuffle(edits)
    for edit in edits:
        variant = edit(text)
        if normalize(variant) == normalize(text):
            continue
        if jaccard(base, shingles(variant, config.shingle_size)) >= config.minhash_threshold + margin:
            return variant
    return None


def exact_variant(text: str, rng: random.Random) -> str:
    return rng.choice([text.upper(), text.capitalize() + "?", "  " + text + "!!", text.replace(" ", "   ")])


def distinct_rows(rows: list[tuple[str, str]], gold: list[Example], config: CleanConfig) -> list[tuple[str, str]]:
    """Drop rows that already duplicate another row or a gold row, so injected counts are exact."""
    clustered = {i for group in duplicate_clusters([t for t, _ in rows], config) for i in group}
    leaking = {leak["index"] for leak in find_leaks([Example(t, y) for t, y in rows], gold, config)}
    return [r for i, r in enumerate(rows) if i not in clustered and i not in leaking]


def make_noisy_logs(
    rows: list[tuple[str, str]],
    gold: list[Example],
    labels: list[str],
    *,
    seed: int = 0,
    config: CleanConfig | None = None,
    malformed: int = 2,
    invented: int = 6,
    loose: int = 2,
    low_confidence: int = 8,
    exact_dups: int = 5,
    near_dups: int = 5,
    conflicts: int = 3,
    flips: int = 10,
    gold_exact: int = 4,
    gold_near: int = 3,
    min_confidence: float = 0.7,
) -> NoisyLogs:
    config = config or CleanConfig()
    rng = random.Random(seed)
    base = distinct_rows(rows, gold, config)
    rng.shuffle(base)
    picks = iter(range(len(base)))

    def take(n: int) -> list[int]:
        return [next(picks) for _ in range(n)]

    records: list[dict[str, Any]] = [
        {"text": t, "label": y, "confidence": round(rng.uniform(0.85, 1.0), 3)} for t, y in base
    ]
    true_labels = {t: y for t, y in base}
    extra: list[dict[str, Any]] = []
    invented_counts: Counter[str] = Counter()
    for i in take(invented):
        records[i]["label"] = INVENTED[i % len(INVENTED)]
        invented_counts[records[i]["label"]] += 1
    for i in take(loose):
        records[i]["label"] = records[i]["label"].replace("_", " ").title()
    for i in take(low_confidence):
        records[i]["confidence"] = round(rng.uniform(0.2, min_confidence - 0.05), 3)
    for i in take(exact_dups):
        extra.append({**records[i], "text": exact_variant(records[i]["text"], rng)})
    made = 0
    while made < near_dups:
        i = next(picks)
        variant = near_variant(records[i]["text"], config, rng)
        if variant is not None:
            extra.append({**records[i], "text": variant})
            made += 1
    for i in take(conflicts):
        other = rng.choice([y for y in labels if y != records[i]["label"]])
        extra.append(
            {**records[i], "text": exact_variant(records[i]["text"], rng), "label": other, "true": records[i]["label"]}
        )
    flipped = set()
    for i in take(flips):
        records[i]["label"] = rng.choice([y for y in labels if y != records[i]["label"]])
        flipped.add(records[i]["text"])
    smuggled = rng.sample(gold, gold_exact + gold_near)
    for g in smuggled[:gold_exact]:
        extra.append({"text": exact_variant(g.text, rng), "label": g.label, "confidence": 0.99})
    for g in smuggled[gold_exact:]:
        variant = near_variant(g.text, config, rng) or g.text + " please thanks"
        extra.append({"text": variant, "label": g.label, "confidence": 0.99})
    for r in extra:  # every copy above was made before any flip, from a correctly labeled row
        true_labels.setdefault(r["text"], r["label"] if r.get("true") is None else r.pop("true"))
    lines = [json.dumps(r) for r in records + extra]
    lines += ['{"text": "broken json', json.dumps({"text": "", "label": labels[0]})][:malformed]
    rng.shuffle(lines)
    truth = {
        "rows": len(lines),
        "malformed": malformed,
        "invented": dict(invented_counts),
        "loose": loose,
        "low_confidence": low_confidence,
        "exact_duplicates": exact_dups,
        "near_duplicates": near_dups,
        "conflict_groups": conflicts,
        "flips": flips,
        "gold_leaks": gold_exact + gold_near,
    }
    return NoisyLogs(lines, gold, truth, flipped, true_labels)


def load_pairs(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["text"], r["label"]) for r in rows]
