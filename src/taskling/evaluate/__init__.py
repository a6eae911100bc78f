"""evaluate: everything that says how good a run is and whether it may ship.

It owns the metrics (`metrics.py`: `score` and `evaluate`, re-exported here), the paired
statistics (`stats.py`), scored label lists and the frozen baseline (`baseline.py`), the
ship gate with its non-inferiority margins (`gate.py`), the right-size ladder, the HTML
report, the run registry and comparison (`runs.py`), the cost model and the extraction
metrics. Scores made on different gold sets are never compared: every artifact records
its gold set's content hash and every comparison checks it. It may import `errors`,
`version`, `io`, `task`, `config`, `rundir`, `model`, `data`, `extract`, `serve` and
`train`, never `export`, `monitor` or `cli`.
"""

from taskling.evaluate.metrics import evaluate, score

__all__ = ["evaluate", "score"]
