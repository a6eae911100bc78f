"""Combined rungs: the specialist and the MiniLM rung voting together (`lora+minilm` in the ladder).

Two classifiers over the same label set, each giving a probability per label, are combined by
the product of their probabilities, renormalised over the labels (a product of experts: a
label wins when both find it likely, and one confident expert can veto a label the other
half-believes). A label one rung gives probability 0 keeps probability 0. The combination is
a rung of its own: scored, timed and gated like any other (`evaluate/ladder.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Probabilities for every label, in label order, one row per text (as evaluate/ladder.py's rungs).
PredictFn = Callable[[Sequence[str]], list[list[float]]]
Built = tuple[PredictFn, float, int]  # predict, training seconds, bytes


def product_of_probabilities(*tables: Sequence[Sequence[float]]) -> list[list[float]]:
    """Row by row, the product of the tables' probabilities, renormalised to sum to one.

    A row where every product is zero (the rungs disagree completely) falls back to the mean
    of the tables' probabilities, so the result is always a distribution.
    """
    if not tables:
        raise ValueError("nothing to combine")
    out = []
    for rows in zip(*tables, strict=True):
        product = [1.0] * len(rows[0])
        for row in rows:
            product = [p * q for p, q in zip(product, row, strict=True)]
        total = sum(product)
        if total <= 0.0:
            product = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
            total = sum(product)
        out.append([p / total for p in product])
    return out


def combined_rung(parts: Sequence[Built]) -> Built:
    """One rung from several built ones: predictions multiplied, training time and memory added."""

    def predict(texts: Sequence[str]) -> list[list[float]]:
        return product_of_probabilities(*(part[0](texts) for part in parts))

    return predict, sum(part[1] for part in parts), sum(part[2] for part in parts)
