"""One answer: the label, its probability, every label's probability, and who decided.

Every predictor in `taskling.serve` (the LoRA classifier, the cheap rungs, the cascade, the
teacher stage) returns `Prediction`s, so callers never care which one answered. `UNKNOWN`
is the label of an abstained answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["UNKNOWN", "Prediction", "from_row"]

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    probability: float
    probabilities: dict[str, float]
    stage: str | None = None  # which cascade stage decided; None outside a cascade

    @property
    def margin(self) -> float:
        """Top probability minus the runner-up's: low margins mark uncertain answers."""
        top = sorted(self.probabilities.values(), reverse=True)
        return top[0] - (top[1] if len(top) > 1 else 0.0)


def from_row(text: str, labels: Sequence[str], row: Sequence[float], stage: str | None = None) -> Prediction:
    """The prediction for one row of probabilities in label order: the most probable label."""
    best = max(range(len(labels)), key=row.__getitem__)
    return Prediction(text, labels[best], float(row[best]), dict(zip(labels, map(float, row), strict=True)), stage)
