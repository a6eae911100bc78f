"""taskling: turn a narrow, high-volume task into a small fine-tuned specialist model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "Prediction",
    "ProjectConfig",
    "Task",
    "TasklingError",
    "evaluate",
    "load_config",
    "score",
    "train",
]

if TYPE_CHECKING:
    from taskling.config import ProjectConfig, load_config
    from taskling.errors import TasklingError
    from taskling.evaluate import evaluate, score
    from taskling.predict import Classifier, Prediction
    from taskling.task import Task
    from taskling.train import train

_HOMES = {
    "Classifier": "taskling.predict",
    "Prediction": "taskling.predict",
    "ProjectConfig": "taskling.config",
    "load_config": "taskling.config",
    "Task": "taskling.task",
    "TasklingError": "taskling.errors",
    "evaluate": "taskling.evaluate",
    "score": "taskling.evaluate",
    "train": "taskling.train",
}


def __getattr__(name: str) -> Any:
    # Lazy: `import taskling` stays fast; torch loads only when a model is needed.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'taskling' has no attribute {name!r}")
