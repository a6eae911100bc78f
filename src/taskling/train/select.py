"""Best checkpoint by the task metric (`train.select_by: metric`, generation runs only).

At each evaluation the training loop (`train.loop.evaluate`) calls a `MetricSelector`: it
generates answers for the first `train.metric_rows` validation rows with the adapter as it
is (greedy, with the output constraint, exactly as `taskling generate` decodes) and scores
them on the run's primary metric: execution match for SQL with a database, ROUGE-L
otherwise. The loop keeps the adapter with the best mean, instead of the lowest validation
loss, and history.jsonl records the mean at every evaluation (`metric`, `metric_name`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from taskling.generate.decode import GenerationFormat
from taskling.generate.generator import Generator
from taskling.generate.metrics import score_rows
from taskling.generate.spec import GenExample

log = logging.getLogger(__name__)


class MetricSelector:
    """Called with the model being trained: ({"metric", "metric_name"}, whether it is the best so far)."""

    def __init__(self, fmt: GenerationFormat, rows: Sequence[GenExample], device: Any, min_delta: float = 0.0) -> None:
        self.fmt = fmt
        self.rows = list(rows)
        self.device = device
        self.min_delta = min_delta
        self.name = "execution" if fmt.task.sql is not None else "rouge_l"
        self.best: float | None = None
        self._generator: Generator | None = None

    def score(self, model: Any) -> float:
        """The mean primary metric of the model's answers to the sample (the model is left in train mode)."""
        if self._generator is None:
            self._generator = Generator(model, self.fmt, str(self.device))
        gen = self._generator
        model.eval()
        try:
            answers = gen.generate([ex.text for ex in self.rows])
        finally:
            model.train()
        outputs = [a.output for a in answers]
        if self.name == "execution":
            db = gen.database
            pairs = zip(self.rows, answers, strict=True)
            values = [float(a.valid and db.execution_match(ex.answer, a.output)) for ex, a in pairs]
        else:
            values = [r["rouge_l"] for r in score_rows([ex.answer for ex in self.rows], outputs, embed=False)]
        return sum(values) / len(values)

    def __call__(self, model: Any) -> tuple[dict[str, Any], bool]:
        value = self.score(model)
        improved = self.best is None or value > self.best + self.min_delta
        if improved:
            self.best = value
        log.info("validation %s on %d rows: %.4f%s", self.name, len(self.rows), value, " (best)" if improved else "")
        return {"metric": value, "metric_name": self.name}, improved
