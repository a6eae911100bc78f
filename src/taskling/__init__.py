"""taskling: turn a narrow, high-volume task into a small fine-tuned specialist model.

The package is laid out by pipeline stage, in the order data flows (see docs/architecture.md):
`model/` -> `data/` -> `train/` -> `evaluate/` -> `serve/`, with `extract/`, `export/` and
`monitor/` beside them and `cli/` on top. `train` and `evaluate` are subpackages, so their
entry points are imported from them: `from taskling.train import train`,
`from taskling.evaluate import evaluate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskling.version import __version__

__all__ = [
    "Classifier",
    "Prediction",
    "ProjectConfig",
    "Task",
    "TasklingError",
    "__version__",
    "load_config",
    "score",
]

if TYPE_CHECKING:
    from taskling.config import ProjectConfig, load_config
    from taskling.errors import TasklingError
    from taskling.evaluate.metrics import score
    from taskling.serve.classifier import Classifier, Prediction
    from taskling.task import Task

_HOMES = {
    "Classifier": "taskling.serve.classifier",
    "Prediction": "taskling.serve.classifier",
    "ProjectConfig": "taskling.config",
    "load_config": "taskling.config",
    "Task": "taskling.task",
    "TasklingError": "taskling.errors",
    "score": "taskling.evaluate.metrics",
}


def __getattr__(name: str) -> Any:
    # Lazy: `import taskling` stays fast; torch loads only when a model is needed.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'taskling' has no attribute {name!r}")
