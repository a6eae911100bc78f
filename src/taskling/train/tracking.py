"""Experiment tracking, opt-in with `train.report_to`: TensorBoard, MLflow, Trackio, Weights & Biases.

The loop calls one `Trackers` object at its logging points: the resolved config once at
the start (`log_params`), each history record (training loss and learning rate per step,
validation loss per evaluation), tokens/s per step, and the final summary (`finish`).
Every tracker talks through its own library (`torch.utils.tensorboard`, `mlflow`,
`trackio`, `wandb`); none is a dependency of taskling, so a missing one is a `ConfigError`
naming the pip package. A tracker that fails while logging (a full disk, a dropped
connection) is logged and switched off: tracking never stops a training run.

Where the records go: TensorBoard event files in `RUN_DIR/tracking/tensorboard/`; W&B's
offline/online folder under `RUN_DIR/tracking/`; MLflow and Trackio wherever their own
settings point (`MLFLOW_TRACKING_URI`, Trackio's local database), project "taskling" unless
`WANDB_PROJECT` / `TRACKIO_PROJECT` / `MLFLOW_EXPERIMENT_NAME` say otherwise.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import yaml

from taskling.config import TrainSettings
from taskling.errors import ConfigError
from taskling.rundir import RunDir

log = logging.getLogger(__name__)

# report_to name -> (module imported, pip package to install)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}

# history.jsonl keys -> the metric names trackers show
METRIC_NAMES = {"train_loss": "train/loss", "lr": "train/learning_rate", "val_loss": "val/loss"}


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, final: dict[str, float]) -> None: ...


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"epochs": 3}}` -> `{"train.epochs": 3}`; lists become JSON text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, ensure_ascii=False)
        else:
            flat[name] = value
    return flat


def import_tracker(name: str) -> Any:
    """The tracker's library; a ConfigError naming the pip package when it is not installed."""
    module, package = TRACKERS[name]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"train.report_to names {name!r}, but its library cannot be imported ({err})",
            fix=f"pip install {package}, or remove {name!r} from train.report_to",
        ) from None


class TensorBoardTracker:
    def __init__(self, run: RunDir) -> None:
        writer_cls = import_tracker("tensorboard").SummaryWriter
        self.writer = writer_cls(log_dir=str(run.tracking / "tensorboard"))
        self.params: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        table = "\n".join(f"| {k} | {v} |" for k, v in self.params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, final: dict[str, float]) -> None:
        if final:  # the HParams tab: the config beside the final numbers, comparable across runs
            self.writer.add_hparams(self.params, final, run_name="hparams")
        self.writer.close()


class MlflowTracker:
    def __init__(self, run: RunDir) -> None:
        self.mlflow = import_tracker("mlflow")
        self.mlflow.start_run(run_name=run.root.name)

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self, final: dict[str, float]) -> None:
        self.mlflow.log_metrics(final)
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, run: RunDir) -> None:
        self.wandb = import_tracker("wandb")
        run.tracking.mkdir(parents=True, exist_ok=True)
        project = os.environ.get("WANDB_PROJECT", "taskling")
        self.run = self.wandb.init(project=project, name=run.root.name, dir=str(run.tracking))

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, final: dict[str, float]) -> None:
        self.run.summary.update(final)
        self.run.finish()


class TrackioTracker:
    def __init__(self, run: RunDir) -> None:
        self.trackio = import_tracker("trackio")
        self.name = run.root.name
        self.project = os.environ.get("TRACKIO_PROJECT", "taskling")

    def log_params(self, params: dict[str, Any]) -> None:
        # trackio takes the config when the run starts.
        self.trackio.init(project=self.project, name=self.name, config=params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def finish(self, final: dict[str, float]) -> None:
        self.trackio.log(final)
        self.trackio.finish()


BUILDERS: dict[str, Callable[[RunDir], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
    "wandb": WandbTracker,
}


class Trackers:
    """The trackers `train.report_to` names, called together; one that fails is switched off."""

    def __init__(self, names: Sequence[str], run: RunDir) -> None:
        for name in names:
            import_tracker(name)  # every missing package is reported before any tracker starts
        self.active: dict[str, Tracker] = {}
        for name in dict.fromkeys(names):
            try:
                self.active[name] = BUILDERS[name](run)
            except Exception as err:
                self.finish({})
                raise ConfigError(
                    f"train.report_to: {name} could not start ({type(err).__name__}: {err})",
                    fix=f"check {name}'s own settings (login, WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...) "
                    f"or remove {name!r} from train.report_to",
                ) from err

    def _call(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.active.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # tracking must never stop training
                why = f"{type(err).__name__}: {err}"
                log.warning("tracking with %s failed (%s); it is off for the rest of this run", name, why)
                del self.active[name]

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("log_params", flatten(params))

    def log_record(self, record: Mapping[str, Any]) -> None:
        """One history.jsonl record: its losses and learning rate, at its step."""
        metrics = {METRIC_NAMES[k]: float(v) for k, v in record.items() if k in METRIC_NAMES}
        if metrics:
            self._call("log_metrics", metrics, int(record["step"]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log_metrics", metrics, step)

    def finish(self, final: Mapping[str, Any]) -> None:
        """The final numbers (`final/...`), then close every tracker."""
        numbers = {f"final/{k}": float(v) for k, v in final.items() if isinstance(v, (int, float)) and v is not None}
        self._call("finish", numbers)
        self.active.clear()


def open_trackers(settings: TrainSettings, run: RunDir) -> Trackers | None:
    """The trackers `settings.report_to` names, given the run's resolved config (RUN_DIR/config.yaml);
    None when it names none."""
    if not settings.report_to:
        return None
    trackers = Trackers(settings.report_to, run)
    params = yaml.safe_load(run.config.read_text(encoding="utf-8")) if run.config.is_file() else None
    trackers.log_params(params or {"train": settings.model_dump(mode="json")})
    return trackers
