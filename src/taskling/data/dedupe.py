"""Exact and near duplicates: within one set of texts, and between a set and a frozen gold set.

Texts are compared in a normalised form (`normalize`). Near-duplicates are found with
MinHash/LSH over character shingles (fast at 100k rows), or with all-MiniLM-L6-v2
embeddings for semantic near-duplicates on smaller sets. Every candidate pair from LSH is
verified with the true Jaccard similarity, so the threshold means what it says.

`duplicate_clusters` groups a set's duplicates (cleaning and splitting use it);
`find_leaks` finds rows that copy a gold row (splitting, cleaning, synthesis and the gold
versions use it).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from taskling.data.load import Example

_NON_WORD = re.compile(r"[^\w]+")


class DedupeConfig(BaseModel):
    """How near two texts must be to count as duplicates (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    # "minhash": character-shingle Jaccard (fast, catches edits); "embedding": MiniLM cosine
    # (slower, catches paraphrases); "off": exact duplicates only.
    near_duplicates: Literal["minhash", "embedding", "off"] = "minhash"
    shingle_size: int = Field(4, ge=2, le=10)
    # Jaccard similarity of shingle sets at or above which two texts are near-duplicates.
    minhash_threshold: float = Field(0.7, gt=0.0, le=1.0)
    num_perm: int = Field(64, ge=16, le=512)
    # Cosine similarity for embedding near-duplicates.
    embedding_threshold: float = Field(0.95, gt=0.0, le=1.0)


# What a gold manifest records, so later runs find leaks with the settings gold was frozen with.
DEDUPE_KEYS = frozenset(DedupeConfig.model_fields)


def normalize(text: str) -> str:
    """The form duplicates are compared in: NFKC, case-folded, punctuation and spacing collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def text_key(text: str) -> str:
    """A stable hash of the normalised text (what the gold manifest stores)."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def shingles(text: str, size: int) -> set[bytes]:
    padded = f" {normalize(text)} "
    if len(padded) <= size:
        return {padded.encode("utf-8")}
    return {padded[i : i + size].encode("utf-8") for i in range(len(padded) - size + 1)}


def jaccard(a: set[bytes], b: set[bytes]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearIndex:
    """Texts indexed for near-duplicate lookup (MinHash/LSH or embeddings)."""

    def __init__(self, texts: Sequence[str], config: DedupeConfig) -> None:
        self.config = config
        self.method = config.near_duplicates
        self.texts = list(texts)
        if self.method == "minhash":
            from datasketch import MinHash, MinHashLSH

            self._shingles = [shingles(t, config.shingle_size) for t in self.texts]
            self._hashes = MinHash.bulk(self._shingles, num_perm=config.num_perm, seed=1)
            # LSH tuned a little below the threshold finds more true pairs; the exact Jaccard
            # check in `_verified` removes the extra candidates.
            lsh_threshold = max(0.1, config.minhash_threshold - 0.2)
            self._lsh = MinHashLSH(threshold=lsh_threshold, num_perm=config.num_perm)
            with self._lsh.insertion_session() as session:
                for i, mh in enumerate(self._hashes):
                    session.insert(i, mh, check_duplication=False)
        elif self.method == "embedding":
            from taskling.model.embed import embed

            self._vectors = embed(self.texts)

    def query(self, texts: Sequence[str]) -> list[list[tuple[int, float]]]:
        """For each text, the indexed texts at or above the threshold, as (index, similarity)."""
        if self.method == "off" or not self.texts:
            return [[] for _ in texts]
        if self.method == "embedding":
            from taskling.model.embed import embed

            return self._vector_matches(embed(texts))
        from datasketch import MinHash

        sets = [shingles(t, self.config.shingle_size) for t in texts]
        hashes = MinHash.bulk(sets, num_perm=self.config.num_perm, seed=1)
        return [self._verified(s, self._lsh.query(mh)) for s, mh in zip(sets, hashes, strict=True)]

    def self_pairs(self) -> list[tuple[int, int, float]]:
        """Pairs (i < j) of indexed texts that are near-duplicates of each other."""
        pairs: list[tuple[int, int, float]] = []
        if self.method == "minhash":
            for i, mh in enumerate(self._hashes):
                cands = [j for j in self._lsh.query(mh) if j > i]
                pairs.extend((i, j, sim) for j, sim in self._verified(self._shingles[i], cands))
        elif self.method == "embedding":
            for i, matches in enumerate(self._vector_matches(self._vectors)):
                pairs.extend((i, j, sim) for j, sim in matches if j > i)
        return pairs

    def _verified(self, s: set[bytes], candidates: Sequence[int]) -> list[tuple[int, float]]:
        # LSH gives candidates with false positives; the true Jaccard decides.
        out = []
        for j in candidates:
            sim = jaccard(s, self._shingles[j])
            if sim >= self.config.minhash_threshold:
                out.append((int(j), sim))
        return out

    def _vector_matches(self, queries: np.ndarray) -> list[list[tuple[int, float]]]:
        out: list[list[tuple[int, float]]] = []
        for start in range(0, len(queries), 1024):  # blocks keep the similarity matrix small
            sims = queries[start : start + 1024] @ self._vectors.T
            for row in sims:
                hits = np.nonzero(row >= self.config.embedding_threshold)[0]
                out.append([(int(j), float(row[j])) for j in hits])
        return out


class UnionFind:
    """Disjoint sets of row indices; the earliest row of a set is its root."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earliest row stays the root

    def groups(self) -> list[list[int]]:
        """Every set, as sorted row indices, in order of its first row."""
        found: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            found[self.find(i)].append(i)
        return list(found.values())


def duplicate_clusters(texts: Sequence[str], config: DedupeConfig) -> list[list[int]]:
    """Groups (2+ rows, each sorted) of rows whose texts are exact or near duplicates."""
    by_norm: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        by_norm[normalize(text)].append(i)
    reps = [rows[0] for rows in by_norm.values()]
    uf = UnionFind(len(texts))
    for rows in by_norm.values():
        for i in rows[1:]:
            uf.union(rows[0], i)
    if config.near_duplicates != "off" and len(reps) > 1:
        index = NearIndex([texts[i] for i in reps], config)
        for a, b, _ in index.self_pairs():
            uf.union(reps[a], reps[b])
    return sorted((g for g in uf.groups() if len(g) > 1), key=lambda g: g[0])


def find_leaks(
    examples: Sequence[Example], gold: Sequence[Example], config: DedupeConfig | None = None
) -> list[dict[str, Any]]:
    """Rows of `examples` that copy a gold row: the same normalised text, or a near-duplicate."""
    config = config or DedupeConfig()
    gold_by_key = {normalize(g.text): j for j, g in enumerate(gold)}
    leaks: list[dict[str, Any]] = []
    rest = []
    for i, ex in enumerate(examples):
        j = gold_by_key.get(normalize(ex.text))
        if j is None:
            rest.append(i)
        else:
            leaks.append(_leak(i, ex, gold[j], "exact", 1.0))
    if rest and config.near_duplicates != "off":
        index = NearIndex([g.text for g in gold], config)
        for i, matches in zip(rest, index.query([examples[i].text for i in rest]), strict=True):
            if matches:
                j, sim = max(matches, key=lambda m: m[1])
                leaks.append(_leak(i, examples[i], gold[j], "near", sim))
    return sorted(leaks, key=lambda leak: leak["index"])


def _leak(i: int, ex: Example, g: Example, kind: str, similarity: float) -> dict[str, Any]:
    where = f"{ex.source}:{ex.line}" if ex.source else f"row {i + 1}"
    gold_where = f"{g.source}:{g.line}" if g.source else "gold"
    return {
        "index": i,
        "kind": kind,
        "similarity": round(similarity, 3),
        "text": ex.text,
        "gold_text": g.text,
        "detail": f"{where} {ex.text!r} {kind}-duplicates gold {gold_where} {g.text!r} (similarity {similarity:.2f})",
    }
