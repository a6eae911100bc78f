"""Per-row metrics for generated text, and their averages.

`score_rows(gold, predicted)` scores each generated text against its reference:

- `exact`: the strings are identical;
- `normalised`: identical after `normalise` (case, punctuation and runs of spacing ignored);
- `rouge_l`: ROUGE-L F1, the longest common subsequence of normalised words;
- `chrf`: chrF (Popovic 2015) with sacreBLEU's defaults: character n-grams of orders 1-6,
  spaces removed, precision and recall averaged over the orders both sides have, then
  F-beta with beta = 2 (recall weighs twice as much). On a 0-1 scale, not sacreBLEU's 0-100;
- `similarity`: the cosine of the two texts' all-MiniLM-L6-v2 embeddings (a BERTScore-like
  meaning match that runs offline; `embed=False` leaves it out).

Every value is in [0, 1] except `similarity` (a cosine, [-1, 1]); two empty strings score 1.
`aggregate(rows)` averages each metric over the rows and adds `n`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

METRICS = ("exact", "normalised", "rouge_l", "chrf", "similarity")
CHRF_ORDER = 6
CHRF_BETA = 2.0
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")

Embedder = Callable[[Sequence[str]], np.ndarray]


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, runs of whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def rouge_l(gold: str, predicted: str) -> float:
    """ROUGE-L F1: longest common subsequence of normalised words."""
    g, p = normalise(gold).split(), normalise(predicted).split()
    if not g and not p:
        return 1.0
    if not g or not p:
        return 0.0
    prev = [0] * (len(p) + 1)
    for gw in g:
        cur = [0]
        for j, pw in enumerate(p):
            cur.append(prev[j] + 1 if gw == pw else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(gold: str, predicted: str, *, order: int = CHRF_ORDER, beta: float = CHRF_BETA) -> float:
    """chrF of `predicted` against `gold`, 0-1 (sacreBLEU's sentence chrF / 100)."""
    # Whitespace is not part of any n-gram (sacreBLEU's default, whitespace=False).
    ref, hyp = "".join(gold.split()), "".join(predicted.split())
    if not ref and not hyp:
        return 1.0
    precisions, recalls = [], []
    for n in range(1, order + 1):
        r, h = _char_ngrams(ref, n), _char_ngrams(hyp, n)
        if not r or not h:
            continue  # an order one side is too short for does not count (effective order)
        match = sum((r & h).values())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return 0.0
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if not precision + recall:
        return 0.0
    factor = beta**2
    return (1 + factor) * precision * recall / (factor * precision + recall)


def embedding_similarity(
    gold: Sequence[str], predicted: Sequence[str], embedder: Embedder | None = None
) -> list[float]:
    """Cosine similarity of each pair's sentence embeddings (bundled all-MiniLM-L6-v2 by default)."""
    if embedder is None:
        from taskling.model.embed import embed

        embedder = embed
    vectors = np.asarray(embedder([*gold, *predicted]), dtype=np.float64)
    g, p = vectors[: len(gold)], vectors[len(gold) :]
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(p, axis=1)
    cosines = np.einsum("ij,ij->i", g, p) / np.where(norms > 0, norms, 1.0)
    return [float(np.clip(c, -1.0, 1.0)) for c in cosines]


def score_rows(
    gold: Sequence[str], predicted: Sequence[str], *, embed: bool = True, embedder: Embedder | None = None
) -> list[dict[str, float]]:
    """One dict of metrics per (gold, predicted) pair; `embed=False` skips `similarity`.

    `embedder` replaces the bundled MiniLM (texts -> one vector per text), e.g. in tests.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold texts but {len(predicted)} predictions")
    rows = [
        {
            "exact": float(g == p),
            "normalised": float(normalise(g) == normalise(p)),
            "rouge_l": rouge_l(g, p),
            "chrf": chrf(g, p),
        }
        for g, p in zip(gold, predicted, strict=True)
    ]
    if embed and rows:
        for row, sim in zip(rows, embedding_similarity(gold, predicted, embedder), strict=True):
            row["similarity"] = sim
    return rows


def aggregate(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The mean of every metric over `rows` (each over the rows that have it), plus `n`."""
    rows = list(rows)
    sums: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for row in rows:
        for key, value in row.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] += 1
    return {"n": float(len(rows)), **{key: sums[key] / counts[key] for key in sums}}
