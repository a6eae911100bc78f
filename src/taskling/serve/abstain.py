"""Abstention: answer `unknown` when the specialist is not sure enough, for out-of-scope inputs.

A `Classifier` always answers one of its labels (the task's contract). An out-of-scope
message then gets the least-bad label. `AbstainingClassifier` wraps any object with
`predict(texts) -> list[Prediction]` and replaces the label by `unknown` when the top
probability (or the margin to the runner-up) falls under a threshold. The wrapped
classifier's behaviour and probabilities are untouched; only the label changes.

The threshold is chosen on validation data (`calibrate_threshold`):

- with out-of-scope validation rows (any gold label outside the label set, e.g. CLINC's
  `oos`): the threshold that maximises the mean of in-scope accuracy (abstaining counts as
  wrong) and out-of-scope recall;
- with in-scope rows only: the highest threshold that still answers `target_coverage` of
  them (default 95%), i.e. abstain on at most 5% of normal traffic.

It is saved as `RUN_DIR/abstain.json` and loaded by `AbstainingClassifier.from_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from taskling.errors import RunError
from taskling.io import read_json, write_json
from taskling.rundir import RunDir
from taskling.serve.prediction import UNKNOWN, Prediction

Metric = Literal["probability", "margin"]


class Predictor(Protocol):
    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> list[Prediction]: ...


@dataclass
class AbstainThreshold:
    metric: Metric
    value: float
    method: str  # how it was chosen
    n_in_scope: int
    n_out_of_scope: int
    in_scope_accuracy: float  # on the calibration rows, after abstaining
    in_scope_coverage: float  # share of in-scope rows answered (not abstained)
    oos_recall: float | None  # share of out-of-scope rows abstained on

    def save(self, run_dir: str | Path) -> Path:
        path = RunDir(run_dir).abstain
        write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> AbstainThreshold:
        path = RunDir(run_dir).abstain
        if not path.is_file():
            raise RunError(
                f"{path} does not exist: the run has no `unknown` threshold",
                fix=f"calibrate first: taskling calibrate {run_dir} (--oos OOS.jsonl if you have out-of-scope rows)",
            )
        return cls(**read_json(path))


def confidence_score(prediction: Prediction, metric: Metric) -> float:
    return prediction.probability if metric == "probability" else prediction.margin


def _outcome(scores: np.ndarray, correct: np.ndarray, oos: np.ndarray, t: float) -> tuple[float, float, float]:
    answered = scores >= t
    ins = ~oos
    acc = float((answered & correct & ins).sum() / max(ins.sum(), 1))
    coverage = float((answered & ins).sum() / max(ins.sum(), 1))
    recall = float((~answered & oos).sum() / max(oos.sum(), 1))
    return acc, coverage, recall


def calibrate_threshold(
    predictions: Sequence[Prediction],
    gold: Sequence[str],
    labels: Sequence[str],
    *,
    metric: Metric = "probability",
    target_coverage: float = 0.95,
) -> AbstainThreshold:
    """Choose the `unknown` threshold on validation predictions; see the module docstring."""
    if len(predictions) != len(gold) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} gold labels")
    allowed = set(labels)
    scores = np.array([confidence_score(p, metric) for p in predictions])
    oos = np.array([g not in allowed for g in gold])
    correct = np.array([p.label == g for p, g in zip(predictions, gold, strict=True)])
    if oos.any() and (~oos).any():
        candidates = np.unique(np.concatenate([[0.0], scores]))
        best = max(candidates, key=lambda t: (np.mean(_outcome(scores, correct, oos, t)[::2]), -t))
        value, method = float(best), "max mean of in-scope accuracy and OOS recall on validation"
    else:
        value = float(np.quantile(scores[~oos], 1 - target_coverage))
        method = f"answer {target_coverage:.0%} of in-scope validation rows"
    acc, coverage, recall = _outcome(scores, correct, oos, value)
    return AbstainThreshold(
        metric=metric,
        value=value,
        method=method,
        n_in_scope=int((~oos).sum()),
        n_out_of_scope=int(oos.sum()),
        in_scope_accuracy=acc,
        in_scope_coverage=coverage,
        oos_recall=recall if oos.any() else None,
    )


class AbstainingClassifier:
    """`predict` as the wrapped classifier, with `unknown` under the threshold."""

    def __init__(self, classifier: Any, threshold: AbstainThreshold) -> None:
        self.classifier = classifier
        self.threshold = threshold

    def __getattr__(self, name: str) -> Any:  # task, version, ... of the wrapped classifier
        return getattr(self.classifier, name)

    def predict(self, texts: Sequence[str], *, batch_size: int = 32, **kwargs: Any) -> list[Prediction]:
        """The wrapped `predict` (`progress=` and other keywords passed on); only labels change."""
        out = []
        for p in self.classifier.predict(texts, batch_size=batch_size, **kwargs):
            if confidence_score(p, self.threshold.metric) < self.threshold.value:
                p = replace(p, label=UNKNOWN)  # probabilities and stage stay
            out.append(p)
        return out

    def __call__(self, text: str) -> Prediction:
        return self.predict([text])[0]

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs: Any) -> AbstainingClassifier:
        from taskling.serve.classifier import Classifier

        threshold = load_threshold(run_dir)  # a missing abstain.json fails before the model loads
        return cls(Classifier.from_run(run_dir, **kwargs), threshold)


def load_threshold(run_dir: str | Path) -> AbstainThreshold:
    """The run's `unknown` threshold for `--abstain`; a cascade run is refused (it abstains through its stages)."""
    if RunDir(run_dir).cascade.is_file():
        raise RunError(
            f"{run_dir} is a cascade run: --abstain applies to a single classifier",
            fix="drop --abstain (end the cascade with an `unknown` stage to abstain), or serve the run without it",
        )
    return AbstainThreshold.load(run_dir)


def oos_report(predictions: Sequence[Prediction], gold: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """In-scope accuracy (abstaining is wrong), in-scope coverage and OOS recall."""
    allowed = set(labels)
    ins = [(p, g) for p, g in zip(predictions, gold, strict=True) if g in allowed]
    out = [p for p, g in zip(predictions, gold, strict=True) if g not in allowed]
    return {
        "in_scope_rows": len(ins),
        "oos_rows": len(out),
        "in_scope_accuracy": sum(p.label == g for p, g in ins) / max(len(ins), 1),
        "in_scope_coverage": sum(p.label != UNKNOWN for p, _ in ins) / max(len(ins), 1),
        "oos_recall": sum(p.label == UNKNOWN for p in out) / max(len(out), 1),
    }
