"""Combined rungs: the specialist and the MiniLM rung voting together (`lora+minilm` in the ladder).

Two classifiers over the same label set, each giving a probability per label, are pooled
log-linearly: p(label) proportional to the product of each rung's probability raised to its
weight, renormalised over the labels (a weighted product of experts: a label wins when both
find it likely, and one confident expert can veto a label the other half-believes).

The weights are fitted on held-out validation rows (`fit_weights`: the grid point with the
lowest validation log-loss), never on the rows the rung is scored on. An equal-weight product
is one grid point, and so is "this rung alone", so the fit can tell a weak partner to stand
aside. Without validation rows the weights are 1 (the plain product). A label some weighted
rung gives probability 0 keeps probability 0. The combination is a rung of its own: scored,
timed and gated like any other (`evaluate/ladder.py`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np

# Probabilities for every label, in label order, one row per text (as evaluate/ladder.py's rungs).
PredictFn = Callable[[Sequence[str]], list[list[float]]]
Built = tuple[PredictFn, float, int]  # predict, training seconds, bytes
# Each rung's weight is tried at these values (0: left out; 1: as is; >1: sharpened).
WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
log = logging.getLogger(__name__)
_FLOOR = 1e-12  # a zero probability's log, for weighted sums; exact zeros are kept zero afterwards


def pooled(tables: Sequence[Sequence[Sequence[float]]], weights: Sequence[float] | None = None) -> np.ndarray:
    """Row by row, the product of the tables' probabilities raised to `weights` (default 1), renormalised.

    A row where every product is zero (the rungs disagree completely) falls back to the mean
    of the tables' probabilities, so the result is always a distribution.
    """
    if not tables:
        raise ValueError("nothing to combine")
    arrays = [np.asarray(t, dtype=np.float64) for t in tables]
    weights = [1.0] * len(arrays) if weights is None else list(weights)
    logp = sum(w * np.log(np.maximum(a, _FLOOR)) for a, w in zip(arrays, weights, strict=True))
    possible = np.all([(a > 0) | (w == 0) for a, w in zip(arrays, weights, strict=True)], axis=0)
    logp = np.where(possible, logp, -np.inf)
    top = logp.max(axis=1, keepdims=True)
    dead = ~np.isfinite(top[:, 0])
    out = np.exp(logp - np.where(np.isfinite(top), top, 0.0))
    out = out / np.maximum(out.sum(axis=1, keepdims=True), _FLOOR)
    if dead.any():
        out[dead] = np.mean([a[dead] for a in arrays], axis=0)
    return out


def product_of_probabilities(*tables: Sequence[Sequence[float]]) -> list[list[float]]:
    """The equal-weight product of the tables' probabilities, renormalised (see `pooled`)."""
    return pooled(tables).tolist()


def fit_weights(tables: Sequence[Sequence[Sequence[float]]], gold: Sequence[int]) -> tuple[float, ...]:
    """The weights on `WEIGHT_GRID` whose pooled probabilities give the validation rows' gold labels
    the lowest mean log-loss (ties: the plainer, equal-weight point first)."""
    rows, picked = np.arange(len(gold)), list(gold)

    def loss_then_plainness(weights: tuple[float, ...]) -> tuple[float, float]:
        probs = pooled(tables, weights)
        loss = float(-np.log(np.maximum(probs[rows, picked], _FLOOR)).mean())
        return loss, sum(abs(w - 1.0) for w in weights)

    candidates = [w for w in itertools.product(WEIGHT_GRID, repeat=len(tables)) if any(w)]
    return min(candidates, key=loss_then_plainness)


def combined_rung(parts: Sequence[Built], validation: tuple[Sequence[str], Sequence[int]] | None = None) -> Built:
    """One rung from several built ones: pooled with weights fitted on `validation` (texts, gold
    label indices) when given, else the plain product; training time and memory added."""
    weights: tuple[float, ...] = (1.0,) * len(parts)
    if validation is not None and len(validation[0]):
        texts, gold = validation
        weights = fit_weights([part[0](texts) for part in parts], gold)
        log.info("combined rung: weights %s fitted on %d validation rows", weights, len(texts))

    def predict(texts: Sequence[str]) -> list[list[float]]:
        return pooled([part[0](texts) for part in parts], weights).tolist()

    return predict, sum(part[1] for part in parts), sum(part[2] for part in parts)
