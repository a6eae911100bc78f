"""The cascade: each message goes to the cheapest stage that is sure, only the hard ones further.

`RUN_DIR/cascade.json` (written by `taskling cascade`, `taskling.evaluate.cascade`) lists
the stages in order, e.g. `tfidf -> minilm -> lora -> teacher` or `... -> lora -> unknown`:

    {"stages": [{"name", "kind", "path", "calibration", "threshold", "metric"}, ...],
     "labels", "labels_hash", "data_hash", "max_loss", "curve": [...], "chosen", "validation"}

`Cascade.predict` runs stage 1 on the whole batch; a message whose calibrated confidence
(`metric`: top probability or margin, through the stage's temperature or isotonic map) is
at or above the stage's threshold is answered there, the rest go on as one smaller batch
to the next stage. A stage without a threshold answers everything that reaches it. A last
`unknown` stage abstains on what reaches it: label `unknown`, the previous stage's
probabilities. Every answer records its `stage`; probabilities are the deciding stage's own.

Load one with `Classifier.from_run(RUN_DIR)` (it returns the cascade when the run has
`cascade.json`); the LoRA stage is the run's own adapter. A cascade whose stages were
fitted on another label set or other training rows than the run is refused at load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from taskling.errors import RunError
from taskling.io import read_json, write_json
from taskling.rundir import RunDir, adapter_version, read_manifest
from taskling.serve.prediction import UNKNOWN, Prediction
from taskling.serve.rungs import RUNG_KINDS, Rung
from taskling.task import Task

__all__ = [
    "STAGE_KINDS",
    "Calibration",
    "Cascade",
    "CascadeSpec",
    "StageModel",
    "StageSpec",
    "confidences",
    "labels_hash",
    "train_hash_of",
]

log = logging.getLogger(__name__)

STAGE_KINDS = (*RUNG_KINDS, "lora", "teacher", UNKNOWN)
METRICS = ("probability", "margin")
REBUILD = "rebuild the cascade: taskling cascade RUN_DIR --stages ..."


class StageModel(Protocol):
    """What a stage runs: the LoRA classifier, a rung, a teacher (which also has `cost_per_call`)."""

    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> list[Prediction]: ...


def train_hash_of(manifest: dict[str, Any]) -> str | None:
    """The training rows' content hash run.json records (None for runs written before it did)."""
    data = manifest.get("data")
    return data.get("train_hash") if isinstance(data, dict) else None


def labels_hash(labels: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(labels), ensure_ascii=False).encode()).hexdigest()


@dataclass
class Calibration:
    """Raw confidence -> calibrated confidence: `temperature` rescales the probabilities,
    `isotonic` maps the score through a monotone step function fitted on validation rows
    (`x` -> `y`, the probability of being right), `none` leaves it as it is."""

    method: str = "none"
    temperature: float = 1.0
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        if self.method == "temperature":
            return {"method": self.method, "temperature": self.temperature}
        if self.method == "isotonic":
            return {"method": self.method, "x": self.x, "y": self.y}
        return {"method": "none"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        method = data.get("method", "none")
        if method not in ("none", "temperature", "isotonic"):
            raise RunError(f"unknown calibration method {method!r} in cascade.json", fix=REBUILD)
        return cls(method, float(data.get("temperature", 1.0)), list(data.get("x", [])), list(data.get("y", [])))


def raw_scores(probs: np.ndarray, metric: str) -> np.ndarray:
    """Top probability, or top minus runner-up, per row of a [n, labels] array."""
    if probs.shape[1] < 2:
        return probs.max(axis=1) if probs.size else np.zeros(len(probs))
    top2 = -np.sort(-probs, axis=1)[:, :2]
    return top2[:, 0] if metric == "probability" else top2[:, 0] - top2[:, 1]


def confidences(predictions: Sequence[Prediction], labels: Sequence[str], metric: str, cal: Calibration) -> np.ndarray:
    """The calibrated confidence of each prediction, the number a stage's threshold is compared with."""
    if not predictions:
        return np.zeros(0)
    probs = np.array([[p.probabilities.get(label, 0.0) for label in labels] for p in predictions], dtype=np.float64)
    if cal.method == "temperature":
        logits = np.log(np.clip(probs, 1e-12, 1.0)) / max(cal.temperature, 1e-6)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
    scores = raw_scores(probs, metric)
    if cal.method == "isotonic" and cal.x:
        scores = np.interp(scores, cal.x, cal.y)
    return scores


@dataclass
class StageSpec:
    name: str
    kind: str
    path: str | None = None  # the stage's artifact, relative to the run directory
    calibration: Calibration = field(default_factory=Calibration)
    threshold: float | None = None  # None: answers every message that reaches it
    metric: str = "probability"
    settings: dict[str, Any] = field(default_factory=dict)  # a teacher's url, model, cost per call

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "calibration": self.calibration.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageSpec:
        try:
            spec = cls(**{**data, "calibration": Calibration.from_dict(data.get("calibration") or {})})
        except TypeError as err:
            raise RunError(f"a cascade.json stage is malformed ({err})", fix=REBUILD) from None
        if spec.kind not in STAGE_KINDS:
            raise RunError(f"cascade.json: unknown stage kind {spec.kind!r}", fix=f"one of {', '.join(STAGE_KINDS)}")
        if spec.metric not in METRICS:
            raise RunError(f"cascade.json: unknown metric {spec.metric!r}", fix="probability or margin")
        return spec


@dataclass
class CascadeSpec:
    """The contents of `cascade.json`."""

    stages: list[StageSpec]
    labels: list[str]
    data_hash: str
    labels_hash: str = ""
    max_loss: float = 0.005
    curve: list[dict[str, Any]] = field(default_factory=list)
    chosen: int | None = None
    validation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels_hash = self.labels_hash or labels_hash(self.labels)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stages": [s.to_dict() for s in self.stages]}

    def save(self, run_dir: str | Path) -> Path:
        path = RunDir(run_dir).cascade
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> CascadeSpec:
        path = RunDir(run_dir).cascade
        if not path.is_file():
            raise RunError(f"{path} does not exist", fix="build one: taskling cascade RUN_DIR --stages tfidf,lora")
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            raise RunError(f"{path} is not a cascade (no stages list)", fix=REBUILD)
        try:
            spec = cls(**{**data, "stages": [StageSpec.from_dict(s) for s in data["stages"]]})
        except TypeError as err:
            raise RunError(f"{path} is malformed ({err})", fix=REBUILD) from None
        if spec.labels_hash != labels_hash(spec.labels):
            raise RunError(f"{path}: labels_hash does not match its labels", fix=REBUILD)
        return spec

    def check_run(self, run_dir: str | Path, manifest: dict[str, Any]) -> None:
        """Refuse a cascade built on another label set or other training rows than this run."""
        run_labels = list(manifest["task"]["labels"])
        if run_labels != self.labels:
            raise RunError(
                f"{RunDir(run_dir).cascade}: the cascade's labels differ from the run's "
                f"({len(self.labels)} vs {len(run_labels)}; e.g. {sorted(set(self.labels) ^ set(run_labels))[:3]})",
                fix=REBUILD,
            )
        train_hash = train_hash_of(manifest)
        if train_hash and train_hash != self.data_hash:
            raise RunError(
                f"{RunDir(run_dir).cascade}: the cascade was built on other training rows than the run "
                f"(data_hash {self.data_hash[:12]} vs the run's {train_hash[:12]})",
                fix=REBUILD,
            )


def check_rung(rung: Rung, spec: CascadeSpec, path: Path) -> None:
    """Refuse a cheap stage fitted on another label set or other rows than the cascade."""
    if rung.labels != spec.labels:
        raise RunError(f"{path}: the stage was fitted on another label set than the cascade", fix=REBUILD)
    if rung.data_hash != spec.data_hash:
        raise RunError(
            f"{path}: the stage was fitted on other training rows (data_hash {rung.data_hash[:12]} vs "
            f"{spec.data_hash[:12]})",
            fix=REBUILD,
        )


class Cascade:
    """Stages in order; each answers what it is sure of and passes the rest on."""

    def __init__(self, stages: Sequence[tuple[StageSpec, StageModel | None]], task: Task, version: str) -> None:
        if not stages:
            raise RunError("a cascade needs at least one stage", fix=REBUILD)
        self.stages = list(stages)
        self.task = task
        self.version = version
        self.last_seconds: dict[str, float] = {}  # per-stage wall time of the last `predict`

    @property
    def stage_names(self) -> list[str]:
        return [spec.name for spec, _ in self.stages]

    def predict(
        self, texts: Sequence[str], *, batch_size: int = 32, progress: Callable[[int, int], None] | None = None
    ) -> list[Prediction]:
        """One Prediction per text, in input order, each with the `stage` that decided it.

        `progress(done, total)` is called after each stage with the messages answered so far."""
        results: list[Prediction | None] = [None] * len(texts)
        pending = list(range(len(texts)))
        previous: dict[int, Prediction] = {}
        self.last_seconds = {}
        for spec, model in self.stages:
            if not pending:
                break
            if model is None:  # `unknown`: abstain on everything that got this far
                for i in pending:
                    p = previous.get(i) or Prediction(texts[i], UNKNOWN, 0.0, {})
                    results[i] = replace(p, label=UNKNOWN, stage=spec.name)
                pending = []
                break
            started = time.perf_counter()
            preds = model.predict([texts[i] for i in pending], batch_size=batch_size)
            self.last_seconds[spec.name] = time.perf_counter() - started
            decided = np.ones(len(preds), dtype=bool)
            if spec.threshold is not None:
                decided = confidences(preds, self.task.labels, spec.metric, spec.calibration) >= spec.threshold
            still = []
            for i, p, done in zip(pending, preds, decided.tolist(), strict=True):
                if done:
                    results[i] = replace(p, stage=spec.name)
                else:
                    previous[i] = p
                    still.append(i)
            pending = still
            if progress is not None:
                progress(len(texts) - len(pending), len(texts))
        for i in pending:  # the last stage had a threshold and no `unknown` after it: its answer stands
            results[i] = replace(previous[i], stage=self.stages[-1][0].name)
        return [r for r in results if r is not None]

    def __call__(self, text: str) -> Prediction:
        return self.predict([text])[0]

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        lora: StageModel | Callable[[], StageModel] | None = None,
        teacher: StageModel | None = None,
    ) -> Cascade:
        """The run's cascade. `lora`: the run's classifier (or a function loading it), needed when a
        stage is `lora`; `Classifier.from_run(run_dir)` passes it. `teacher`: the teacher stage, else
        built from cascade.json's settings (`taskling.serve.teacher_stage`)."""
        manifest = read_manifest(run_dir)
        spec = CascadeSpec.load(run_dir)
        spec.check_run(run_dir, manifest)
        run = RunDir(run_dir)
        task = Task.model_validate(manifest["task"])
        stages = [(stage, _load_stage(run, stage, spec, lora, teacher, task)) for stage in spec.stages]
        digest = hashlib.sha256(run.cascade.read_bytes()).hexdigest()[:8]
        version = f"{adapter_version(run_dir)}+cascade@{digest}"
        log.info("cascade %s: %s", version, " -> ".join(spec.stage_names))
        return cls(stages, task, version)


def _load_stage(
    run: RunDir,
    stage: StageSpec,
    spec: CascadeSpec,
    lora: StageModel | Callable[[], StageModel] | None,
    teacher: StageModel | None,
    task: Task,
) -> StageModel | None:
    if stage.kind in RUNG_KINDS:
        path = run.root / (stage.path or "")
        rung = Rung.load(path)
        check_rung(rung, spec, path)
        return rung
    if stage.kind == "lora":
        if lora is None:
            raise RunError("this cascade has a lora stage and no classifier was given", fix="Classifier.from_run(RUN)")
        return lora() if callable(lora) and not hasattr(lora, "predict") else lora
    if stage.kind == "teacher":
        if teacher is not None:
            return teacher
        from taskling.serve.teacher_stage import TeacherStage

        built = TeacherStage.from_settings(stage.settings, task, where=f"{run.cascade}: stage {stage.name}")
        built.check()  # an unreachable endpoint fails at start-up, not on the first request
        return built
    return None
