"""monitor: keeping a shipped specialist honest after it ships.

It owns the drift report over the prediction log (`drift.py`, with its thresholds and
result types in `config.py`, the training-data reference in `reference.py` and the HTML
page in `html.py`) and the relabel loop (`retrain.py`: sample rows to relabel, new
training set versions, scoring on a gold version, retraining through the gate and
promoting only a passing candidate). `monitor` is re-exported here. It may import every
stage below it (`errors`, `io`, `task`, `config`, `rundir`, `model`, `data`, `extract`,
`serve`, `train`, `evaluate`), never `export` or `cli`.
"""

from taskling.monitor.drift import monitor

__all__ = ["monitor"]
