"""Building a cascade: fit the cheap stages, calibrate each, sweep thresholds, write cascade.json.

`build_cascade(run_dir, stages=["tfidf", "minilm", "lora"])`:

1. fits the cheap stages (`taskling.serve.rungs`) on the run's own training rows
   (`data/train.jsonl`, checked against run.json's hash) and saves them under `cascade/`;
2. runs every stage on the run's validation rows (plus out-of-scope rows, `oos_file`, when
   the last stage is `unknown`) and times it: batch-1 ms per message (median of samples)
   and batched ms per message;
3. calibrates each routing stage's confidence on those rows (temperature scaling or
   isotonic regression of "was it right" on the score);
4. sweeps a threshold grid per routing stage, simulating the cascade on the stored
   predictions: accuracy, share answered by each stage, p50/p99 latency (the sum of
   the batch-1 ms of the stages a message visits) and cost per million calls (local
   stages priced by time at `hardware_per_hour`, as `taskling cost` does; the teacher at
   its cost per call);
5. chooses the point that keeps accuracy within `max_loss` of the last model stage alone
   while sending the fewest messages to the expensive stages (last stage first);
6. writes `cascade.json` with the Pareto curve (accuracy vs cost) and the chosen index.

With `unknown` last, the last model stage's threshold is the abstain threshold
(`taskling.serve.abstain.calibrate_threshold`: with OOS rows it maximises the mean of
in-scope accuracy and OOS recall; without, it answers 95% of in-scope rows). Accuracy then
counts an out-of-scope row as right when the cascade abstains on it.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from taskling.data.load import Example, content_hash, load_file
from taskling.errors import ConfigError, RunError
from taskling.evaluate.stats import CATEGORY_MARGIN
from taskling.extras import needs
from taskling.rundir import RunDir, read_manifest
from taskling.serve.abstain import calibrate_threshold
from taskling.serve.cascade import (
    Calibration,
    CascadeSpec,
    StageModel,
    StageSpec,
    confidences,
    raw_scores,
    train_hash_of,
)
from taskling.serve.prediction import UNKNOWN, Prediction
from taskling.serve.rungs import RUNG_KINDS, Rung
from taskling.task import Task

__all__ = ["StageRun", "build_cascade", "fit_calibration", "sweep"]

log = logging.getLogger(__name__)

GRID = 12  # thresholds tried per routing stage (quantiles of its calibrated confidence)
CURVE_POINTS = 40


@dataclass
class StageRun:
    """One stage run on the calibration rows: its answers, whether each was right, its speed and price."""

    spec: StageSpec
    model: StageModel | None
    predictions: list[Prediction] = field(default_factory=list)
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ms: float = 0.0  # batch-1 milliseconds per message (median)
    batched_ms: float = 0.0  # milliseconds per message, batched
    cost_per_call: float = 0.0


def check_stages(stages: Sequence[str]) -> list[str]:
    """Validate a stage list: known kinds, no repeats, a model last or `teacher`/`unknown` last."""
    stages = [s.strip() for s in stages if s.strip()]
    kinds = (*RUNG_KINDS, "lora", "teacher", UNKNOWN)
    bad = [s for s in stages if s not in kinds]
    if bad or not stages:
        raise ConfigError(f"unknown cascade stage(s): {', '.join(bad) or '(none)'}", fix=f"choose from {kinds}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"a stage is named twice in {','.join(stages)}", fix="name each stage once")
    for late in ("teacher", UNKNOWN):
        if late in stages and stages.index(late) != len(stages) - 1:
            raise ConfigError(f"`{late}` must be the last stage", fix=f"--stages ...,{late}")
    if stages[0] == UNKNOWN:
        raise ConfigError("`unknown` needs a model stage before it", fix="--stages tfidf,lora,unknown")
    return stages


def fit_calibration(
    predictions: Sequence[Prediction], gold: Sequence[str], labels: Sequence[str], metric: str, method: str
) -> Calibration:
    """Temperature (minimising the gold label's negative log-likelihood) or isotonic (P(right | score))."""
    if method == "none" or not len(predictions):
        return Calibration()
    probs = np.array([[p.probabilities.get(label, 0.0) for label in labels] for p in predictions])
    if method == "isotonic":
        with needs("data"):
            from sklearn.isotonic import IsotonicRegression

        correct = np.array([p.label == g for p, g in zip(predictions, gold, strict=True)], dtype=float)
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw_scores(probs, metric), correct)
        return Calibration("isotonic", x=[float(v) for v in iso.X_thresholds_], y=[float(v) for v in iso.y_thresholds_])
    if method != "temperature":
        raise ConfigError(f"unknown calibration {method!r}", fix="temperature or isotonic")
    index = {label: j for j, label in enumerate(labels)}
    rows = [i for i, g in enumerate(gold) if g in index]
    if not rows:
        return Calibration("temperature")
    logp = np.log(np.clip(probs[rows], 1e-12, 1.0))
    target = np.array([index[gold[i]] for i in rows])
    best, best_nll = 1.0, float("inf")
    for t in np.geomspace(0.05, 20.0, 61):
        z = logp / t
        z -= z.max(axis=1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(rows)), target]))
        if nll < best_nll:
            best, best_nll = float(t), nll
    return Calibration("temperature", temperature=best)


def time_stage(
    model: StageModel, texts: Sequence[str], batch_size: int, samples: int
) -> tuple[list[Prediction], float, float]:
    """(predictions, batch-1 ms per message (median), batched ms per message)."""
    model.predict(list(texts[:2]), batch_size=batch_size)  # warm-up
    started = time.perf_counter()
    preds = model.predict(list(texts), batch_size=batch_size)
    batched = (time.perf_counter() - started) * 1000 / max(len(texts), 1)
    step = max(1, len(texts) // max(samples, 1))
    single = []
    for text in list(texts)[::step][:samples]:
        t0 = time.perf_counter()
        model.predict([text], batch_size=1)
        single.append((time.perf_counter() - t0) * 1000)
    return preds, statistics.median(single) if single else batched, batched


def simulate(
    runs: Sequence[StageRun], thresholds: Sequence[float | None], gold: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """The cascade on stored predictions with these thresholds (None: answers all that reach it)."""
    n = len(gold)
    out_of_scope = np.array([g not in set(labels) for g in gold], dtype=bool)
    pending = np.ones(n, dtype=bool)
    right = np.zeros(n, dtype=bool)
    latency = np.zeros(n)
    share: dict[str, float] = {}
    cost = 0.0
    for run, t in zip(runs, thresholds, strict=True):
        reach = pending.copy()
        if run.model is None:  # unknown: right where the row is out of scope
            right |= reach & out_of_scope
            share[run.spec.name] = float(reach.mean()) if n else 0.0
            pending[:] = False
            break
        latency += reach * run.ms
        cost += float(reach.mean()) * run.cost_per_call if n else 0.0
        decided = reach & (np.ones(n, dtype=bool) if t is None else run.confidence >= t)
        right |= decided & run.correct
        share[run.spec.name] = float(decided.mean()) if n else 0.0
        pending &= ~decided
    last = runs[-1] if runs[-1].model is not None else None
    if pending.any() and last is not None:  # a last stage with a threshold: its answer stands
        right |= pending & last.correct
        share[last.spec.name] += float(pending.mean())
    return {
        "_right": right,  # per row, for the category check in `sweep` (dropped before the curve is kept)
        "thresholds": {r.spec.name: t for r, t in zip(runs, thresholds, strict=True) if r.model is not None},
        "share": share,
        "accuracy": float(right.mean()) if n else 0.0,
        "p50_ms": float(np.percentile(latency, 50)) if n else 0.0,
        "p99_ms": float(np.percentile(latency, 99)) if n else 0.0,
        "cost_per_million": cost * 1e6,
    }


def _grid(confidence: np.ndarray) -> list[float]:
    qs = np.quantile(confidence, np.linspace(0.0, 1.0, GRID - 1)) if len(confidence) else np.zeros(0)
    return sorted({float(v) for v in qs} | {1.01})  # 1.01: the stage never answers on its own


def _reach_key(point: dict[str, Any], names: Sequence[str]) -> tuple[float, ...]:
    """Share of traffic reaching each stage, the most expensive first: smaller is cheaper."""
    answered = [point["share"].get(n, 0.0) for n in names]
    return tuple(sum(answered[i:]) for i in range(len(names) - 1, 0, -1))


def worst_category_drop(right: np.ndarray, reference: np.ndarray, gold: Sequence[str]) -> float:
    """The largest fall in one gold category's accuracy from `reference` to `right` (0 when none falls)."""
    golds = np.asarray(gold)
    drops = [float(reference[golds == g].mean() - right[golds == g].mean()) for g in set(gold)]
    return max([0.0, *drops])


def sweep(
    runs: Sequence[StageRun],
    gold: Sequence[str],
    labels: Sequence[str],
    max_loss: float,
    abstain: float | None = None,
    category_margin: float = CATEGORY_MARGIN,
) -> tuple[list[dict[str, Any]], int, float]:
    """(curve, chosen index, reference accuracy): every threshold combination of the routing stages.

    A point is eligible when it passes the gate's two rules against the last model stage on
    the calibration rows: accuracy at most `max_loss` lower, and no category's accuracy more
    than `category_margin` lower (a cheap stage that is sure and wrong on one category
    would otherwise hide behind the aggregate). Of those, the one sending the least traffic to
    the expensive stages is chosen.
    """
    model_runs = [r for r in runs if r.model is not None]
    routing = model_runs[:-1]
    tail: list[float | None] = [abstain] + ([None] if runs[-1].model is None else [])
    reference = simulate(runs, [1.01] * len(routing) + tail, gold, labels)
    grids = itertools.product(*(_grid(r.confidence) for r in routing))
    points = [simulate(runs, [*combo, *tail], gold, labels) for combo in grids]
    names = [r.spec.name for r in runs]
    ok = [
        p
        for p in points
        if p["accuracy"] >= reference["accuracy"] - max_loss - 1e-12
        and worst_category_drop(p["_right"], reference["_right"], gold) <= category_margin + 1e-12
    ] or [reference]
    for p in [*points, reference]:
        p.pop("_right", None)
    chosen = min(ok, key=lambda p: (_reach_key(p, names), -p["accuracy"], p["p50_ms"]))
    front = pareto(points)
    if chosen not in front:
        front.append(chosen)
    if reference not in front:
        front.append(reference)
    front.sort(key=lambda p: (p["cost_per_million"], p["p50_ms"], -p["accuracy"]))
    return front, front.index(chosen), float(reference["accuracy"])


def pareto(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on accuracy and on cost (ties broken by p50), thinned to CURVE_POINTS."""
    ranked = sorted(points, key=lambda p: (p["cost_per_million"], p["p50_ms"], -p["accuracy"]))
    front, best = [], -1.0
    for p in ranked:
        if p["accuracy"] > best + 1e-12:
            front.append(p)
            best = p["accuracy"]
    step = max(1, len(front) // CURVE_POINTS)
    return front[::step]


# ---------------------------------------------------------------- building


def run_rows(run_dir: str | Path, task: Task, manifest: dict[str, Any]) -> tuple[list[Example], list[Example], str]:
    """(training rows, validation rows, the training rows' hash), checked against run.json."""
    run = RunDir(run_dir)
    train = load_file(run.train_data, task).examples
    data_hash = content_hash(train)
    recorded = train_hash_of(manifest)
    if recorded and recorded != data_hash:
        raise RunError(
            f"{run.train_data} is not the data the run was trained on (hash {data_hash[:12]} vs run.json's "
            f"{recorded[:12]})",
            fix="retrain the run, or restore its data/ folder",
        )
    validation = load_file(run.validation_data, task).examples if run.validation_data.is_file() else []
    if not validation:
        raise RunError(
            f"{run.validation_data} has no rows to calibrate on", fix="train with data.validation_fraction > 0"
        )
    return train, validation, data_hash


def extra_calibration_rows(
    path: str | Path, task: Task, train: Sequence[Example], validation: Sequence[Example]
) -> list[Example]:
    """Labelled rows from `path` to calibrate on besides the validation rows; a row the specialist
    trained on is refused (it would look surer than live traffic), one already among the
    validation rows is skipped and counted."""
    rows = load_file(path, task).examples
    trained = {ex.text for ex in train}
    leaked = [ex.text for ex in rows if ex.text in trained]
    if leaked:
        raise ConfigError(
            f"{path}: {len(leaked)} row(s) are training rows of the run (first: {leaked[0][:60]!r})",
            fix="calibrate on rows the run never trained on (e.g. a held-out split)",
        )
    seen = {ex.text for ex in validation}
    extra = [ex for ex in rows if ex.text not in seen]
    log.info("cascade: %d calibration rows from %s (%d already validation rows, skipped)", len(extra), path,
             len(rows) - len(extra))  # fmt: skip
    return extra


def stage_model(
    kind: str,
    run_dir: Path,
    train: Sequence[Example],
    labels: Sequence[str],
    data_hash: str,
    *,
    lora: StageModel | None,
    teacher: StageModel | None,
    teacher_settings: dict[str, Any] | None,
    task: Task,
) -> tuple[StageModel | None, str | None]:
    """The stage's model and its artifact path relative to the run (cheap stages are fitted and saved)."""
    run = RunDir(run_dir)
    if kind in RUNG_KINDS:
        rung = Rung.fit(kind, [ex.text for ex in train], [ex.label for ex in train], labels, data_hash=data_hash)
        path = rung.save(run.cascade_stage(kind))
        return rung, str(path.relative_to(run.root))
    if kind == "lora":
        if lora is None:
            from taskling.serve.classifier import Classifier

            lora = Classifier.from_run(run_dir, cascade=False)
        return lora, str(run.adapter.relative_to(run.root))
    if kind == "teacher":
        if teacher is None:
            if not teacher_settings:
                raise ConfigError("a teacher stage needs an endpoint", fix="--teacher-url URL --teacher-model NAME")
            from taskling.serve.teacher_stage import TeacherStage

            built = TeacherStage.from_settings(teacher_settings, task, where="--teacher-*")
            built.check()
            teacher = built
        return teacher, None
    return None, None


def build_cascade(
    run_dir: str | Path,
    stages: Sequence[str] = ("tfidf", "minilm", "lora"),
    *,
    max_loss: float = 0.005,
    category_margin: float = CATEGORY_MARGIN,
    metric: str = "probability",
    calibration: str = "isotonic",
    teacher: StageModel | None = None,
    teacher_settings: dict[str, Any] | None = None,
    lora: StageModel | None = None,
    oos_file: str | Path | None = None,
    calibration_file: str | Path | None = None,
    batch_size: int = 32,
    latency_samples: int = 20,
    hardware_per_hour: float = 0.10,
    progress: Callable[[int, int], None] | None = None,
) -> CascadeSpec:
    """Fit, calibrate and sweep the cascade `stages` on the run's data; write and return cascade.json.

    `calibration_file` adds labelled rows to the run's validation rows for calibrating and
    choosing the thresholds (more rows per category loosen the per-category rule's steps)."""
    names = check_stages(stages)
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    task = Task.model_validate(manifest["task"])
    labels = list(task.labels)
    train, validation, data_hash = run_rows(run_dir, task, manifest)
    rows = list(validation)
    if calibration_file is not None:
        rows += extra_calibration_rows(calibration_file, task, train, validation)
    if oos_file is not None:
        if names[-1] != UNKNOWN:
            raise ConfigError("--oos calibrates the abstain threshold", fix="end --stages with ,unknown")
        rows += [ex for ex in load_file(oos_file).examples if ex.label not in set(labels)]
    texts, gold = [ex.text for ex in rows], [ex.label for ex in rows]
    runs: list[StageRun] = []
    for done, kind in enumerate(names):
        if progress is not None:
            progress(done, len(names))
        model, path = stage_model(
            kind, run_dir, train, labels, data_hash, lora=lora, teacher=teacher,
            teacher_settings=teacher_settings, task=task,
        )  # fmt: skip
        spec = StageSpec(
            kind, kind, path, metric=metric, settings=dict(teacher_settings or {}) if kind == "teacher" else {}
        )
        runs.append(measure_stage(spec, model, texts, gold, labels, batch_size, latency_samples, hardware_per_hour))
    if progress is not None:
        progress(len(names), len(names))
    return choose_and_write(run_dir, runs, gold, labels, calibration, (max_loss, category_margin), data_hash)


def measure_stage(
    spec: StageSpec,
    model: StageModel | None,
    texts: Sequence[str],
    gold: Sequence[str],
    labels: Sequence[str],
    batch_size: int,
    samples: int,
    hardware_per_hour: float,
) -> StageRun:
    """Run one stage on every calibration row and time it."""
    run = StageRun(spec, model)
    if model is None:
        return run
    run.predictions, run.ms, run.batched_ms = time_stage(model, texts, batch_size, samples)
    run.correct = np.array([p.label == g for p, g in zip(run.predictions, gold, strict=True)], dtype=bool)
    # Local stages cost their time on the hardware (as `taskling cost`); a teacher its price per call.
    run.cost_per_call = float(getattr(model, "cost_per_call", hardware_per_hour / 3600 * run.batched_ms / 1000))
    log.info("cascade stage %s: %.2f ms batch-1, %.2f ms batched, %.1f%% right", spec.name, run.ms, run.batched_ms,
             100 * run.correct.mean())  # fmt: skip
    return run


def choose_and_write(
    run_dir: Path,
    runs: list[StageRun],
    gold: Sequence[str],
    labels: Sequence[str],
    calibration: str,
    margins: tuple[float, float],
    data_hash: str,
) -> CascadeSpec:
    """Calibrate the routing stages, set the abstain threshold, sweep, and write cascade.json."""
    model_runs = [r for r in runs if r.model is not None]
    abstain: float | None = None
    if runs[-1].model is None:  # `unknown` last: the last model stage's threshold is the abstain threshold
        last = model_runs[-1]
        threshold = calibrate_threshold(last.predictions, gold, labels, metric=last.spec.metric)  # type: ignore[arg-type]
        abstain = threshold.value
        last.confidence = confidences(last.predictions, labels, last.spec.metric, last.spec.calibration)
    for run in model_runs[:-1]:
        run.spec.calibration = fit_calibration(run.predictions, gold, labels, run.spec.metric, calibration)
        run.confidence = confidences(run.predictions, labels, run.spec.metric, run.spec.calibration)
    max_loss, category_margin = margins  # the gate's two rules: accuracy, any one category
    curve, chosen, reference = sweep(runs, gold, labels, max_loss, abstain, category_margin)
    for run in runs:
        run.spec.threshold = curve[chosen]["thresholds"].get(run.spec.name)
    spec = CascadeSpec(
        stages=[r.spec for r in runs],
        labels=list(labels),
        data_hash=data_hash,
        max_loss=max_loss,
        curve=curve,
        chosen=chosen,
        validation={
            "n": len(gold),
            "reference_stage": model_runs[-1].spec.name,
            "reference_accuracy": reference,
            "cascade_accuracy": curve[chosen]["accuracy"],
            "stage_ms": {r.spec.name: r.ms for r in model_runs},
            "stage_batched_ms": {r.spec.name: r.batched_ms for r in model_runs},
        },
    )
    spec.save(run_dir)
    log.info("cascade: chose point %d of %d: %s", chosen, len(curve), curve[chosen])
    return spec


def stage_scores(gold: Sequence[str], predictions: Sequence[Prediction]) -> dict[str, dict[str, float]]:
    """Per deciding stage: the share of messages it answered and its accuracy on them (metrics.json `stages`)."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(p.stage for p in predictions if p.stage):
        rows = [(g, p) for g, p in zip(gold, predictions, strict=True) if p.stage == name]
        right = sum(p.label == g or (p.label == UNKNOWN and name == UNKNOWN and g == UNKNOWN) for g, p in rows)
        out[str(name)] = {"share": len(rows) / max(len(gold), 1), "n": len(rows), "accuracy": right / max(len(rows), 1)}
    return out
