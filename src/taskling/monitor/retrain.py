"""The loop that keeps a shipped specialist honest: sample -> relabel -> retrain -> gate -> promote.

- `sample_rows` / `sample_run` pick fresh production rows from the prediction log for the
  teacher or a human, favouring low-margin answers, inputs unlike the training data and
  rows of categories whose share grew (active learning), under a budget. Rows that copy
  any gold version (exact or near duplicate) and repeats are excluded and counted; a small
  random share keeps the sample honest about the traffic as a whole.
- `new_training_version` takes the relabeled rows through the data-cleaning path
  (`clean.clean_examples`, gold-leak rejection included) into `VERSIONS/vN/`: the previous
  version's rows plus the accepted new ones, with review/rejected files and a manifest.
- `retrain` trains a candidate on a training version, scores candidate and production on
  one gold version (`score_on_gold`; every score names the version and its content hash),
  runs the gate (`evaluate.gate`, non-inferiority margins included) and promotes only a
  passing candidate. Every decision, promotion or block, is appended to
  the registry file (`registry.json`), which also names the current production run.
- `run_cycle` chains monitor -> sample -> relabel -> retrain for a scheduled job.

The trainer and predictor are parameters, so the same loop runs a LoRA run (`lora_trainer`,
`Classifier.from_run`) or any cheap stand-in with `predict(texts) -> list[Prediction]`.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from taskling.data.clean import CleanConfig, clean_examples
from taskling.data.dedupe import find_leaks, normalize
from taskling.data.gold import GoldVersion, all_gold_rows
from taskling.data.load import Example, content_hash, label_counts, load_file, write_examples
from taskling.errors import DataError, RunError
from taskling.evaluate.gate import GateSettings, Scored, gate, write_verdict
from taskling.evaluate.metrics import score
from taskling.io import read_json, write_json, write_jsonl
from taskling.monitor.config import UNKNOWN, MonitorConfig
from taskling.monitor.drift import label_shift, parse_since
from taskling.monitor.reference import Embedder, Reference, get_embedder, load_reference, max_similarity
from taskling.rundir import RunDir
from taskling.task import Task

log = logging.getLogger(__name__)

Trainer = Callable[[Path, Path], None]  # (training file, run dir to create)
Loader = Callable[[Path], Any]  # run dir -> object with predict(texts)


class SampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: int = Field(200, ge=1)
    # Weights of the three reasons to pick a row; each is a rank in [0, 1] over the window.
    uncertainty: float = Field(1.0, ge=0)
    novelty: float = Field(1.0, ge=0)
    drifted_category: float = Field(0.5, ge=0)
    # Share of the budget drawn at random, so the relabeled set also estimates plain accuracy.
    random_share: float = Field(0.1, ge=0, le=1)
    seed: int = 0


@dataclass
class SampleResult:
    rows: list[dict[str, Any]]
    considered: int
    excluded: dict[str, int]
    out: Path | None = None


def _rank(values: np.ndarray) -> np.ndarray:
    if len(values) < 2:
        return np.zeros(len(values))
    return np.argsort(np.argsort(values, kind="stable"), kind="stable") / (len(values) - 1)


def sample_rows(
    rows: Sequence[dict[str, Any]],
    ref: Reference,
    embedder: Embedder,
    gold: Sequence[Example],
    config: SampleConfig | None = None,
) -> SampleResult:
    """Pick up to `budget` log rows to relabel; see the module docstring."""
    config = config or SampleConfig()
    excluded = {"duplicate": 0, "gold_leak": 0}
    unique: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in rows:
        key = normalize(row["text"])
        if key in seen:
            excluded["duplicate"] += 1
            continue
        seen.add(key)
        unique.append(row)
    if gold and unique:
        leaks = find_leaks([Example(r["text"], r["label"]) for r in unique], gold, CleanConfig(label_errors=False))
        drop = {leak["index"] for leak in leaks}
        excluded["gold_leak"] = len(drop)
        unique = [r for i, r in enumerate(unique) if i not in drop]
    if not unique:
        return SampleResult([], len(rows), excluded)
    margins = np.array([_margin(r) for r in unique])
    uncertainty = np.where([r["label"] == UNKNOWN for r in unique], 1.0, 1.0 - margins)
    sims = max_similarity(embedder([r["text"] for r in unique]), ref.train_embeddings)
    _, _, cats = label_shift([r["label"] for r in unique if r["label"] != UNKNOWN], ref.label_share)
    growth = {c.label: max(0.0, c.window_share - c.train_share) for c in cats}
    top_growth = max(growth.values(), default=0.0) or 1.0
    drift = np.array([growth.get(r["label"], 0.0) / top_growth for r in unique])
    score = config.uncertainty * _rank(uncertainty) + config.novelty * _rank(-sims) + config.drifted_category * drift
    budget = min(config.budget, len(unique))
    n_random = round(budget * config.random_share)
    order = list(np.argsort(-score, kind="stable"))
    chosen = order[: budget - n_random]
    rest = order[budget - n_random :]
    random.Random(config.seed).shuffle(rest)
    chosen_random = rest[:n_random]
    picked = []
    for i, reason in [*((i, "active") for i in chosen), *((i, "random") for i in chosen_random)]:
        row = unique[int(i)]
        picked.append(
            {
                "text": row["text"],
                "label": row["label"],  # the model's answer: correct it when relabeling
                "model_label": row["label"],
                "probability": row.get("probability"),
                "margin": float(margins[i]),
                "max_similarity": float(sims[i]),
                "score": float(score[i]),
                "picked": reason,
                "id": row.get("id"),
                "time": row.get("time"),
            }
        )
    return SampleResult(picked, len(rows), excluded)


def _margin(row: dict[str, Any]) -> float:
    values = sorted(row["probabilities"].values(), reverse=True) or [0.0]
    return values[0] - (values[1] if len(values) > 1 else 0.0)


def sample_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    since: str = "7d",
    gold_roots: Sequence[str | Path] = (),
    url: str | None = None,
    config: SampleConfig | None = None,
    monitor_config: Any = None,
) -> SampleResult:
    """`taskling sample`: read the log window, pick rows, write them as a relabeling file."""
    from taskling.serve.predlog import default_url, read_rows

    mcfg = monitor_config or MonitorConfig()
    embedder = get_embedder(mcfg.embedder)
    rows = list(read_rows(url or default_url(run_dir), since=parse_since(since)))
    ref = load_reference(run_dir, mcfg, embedder)
    result = sample_rows(rows, ref, embedder, all_gold_rows(gold_roots), config)
    write_jsonl(out, result.rows)
    result.out = Path(out)
    return result


# ---------------------------------------------------------------- training set versions


def version_names(root: Path) -> list[str]:
    names = [p.name for p in root.iterdir() if p.is_dir() and p.name[1:].isdigit()] if root.is_dir() else []
    return sorted((n for n in names if n.startswith("v")), key=lambda n: int(n[1:]))


@dataclass
class DataVersion:
    name: str
    path: Path
    train_file: Path
    counts: dict[str, int]


def _load_relabeled(files: Sequence[str | Path], task: Task) -> tuple[list[Example], list[dict[str, Any]]]:
    """The usable relabeled rows, and every skipped one with its file, line and reason."""
    rows: list[Example] = []
    skipped: list[dict[str, Any]] = []
    for file in files:
        loaded = load_file(file, task, on_bad_rows="skip")
        rows.extend(loaded.examples)
        skipped.extend(
            {"source": b.path, "line": b.line, "reason": b.reason, "detail": b.detail} for b in loaded.bad_rows
        )
    return rows, skipped


def new_training_version(
    versions_root: str | Path,
    relabeled: Sequence[str | Path],
    labels: Sequence[str],
    *,
    base_train: str | Path | None = None,
    gold_roots: Sequence[str | Path] = (),
    clean_config: CleanConfig | None = None,
) -> DataVersion:
    """Previous version (or `base_train` for the first) + relabeled rows, cleaned, as `vN/`.

    Relabeled rows whose label is outside the set (e.g. `unknown`, `oos`: the rater says it
    is out of scope) are skipped with their reason in `vN/skipped.jsonl`. The cleaning path
    decides train / review / rejected (duplicates, conflicts, copies of any gold version).
    """
    root = Path(versions_root)
    task = Task(labels=tuple(labels))
    names = version_names(root)
    previous = root / names[-1] / "train.jsonl" if names else (Path(base_train) if base_train else None)
    if previous is None:
        raise DataError(
            "no earlier training version and no --base-train",
            path=root,
            fix="pass the production run's data/train.jsonl",
        )
    old = load_file(previous, task).examples
    new, skipped = _load_relabeled(relabeled, task)
    gold = all_gold_rows(gold_roots)
    config = (clean_config or CleanConfig(label_errors=False)).model_copy()
    # Only the new rows go through cleaning: the old version was cleaned when it was made.
    # A new row that repeats an old row is still caught: old rows join the dedupe pass first.
    combined = [*old, *new]
    result = clean_examples(combined, labels, config, gold=gold)
    accepted_new = [ex for i, ex in enumerate(new) if result.decisions[len(old) + i].destination == "train"]
    review = [
        {"text": ex.text, "label": ex.label, "reason": d.reason, "detail": d.detail}
        for ex, d in zip(new, result.decisions[len(old) :], strict=True)
        if d.destination == "review"
    ]
    rejected = [
        {"text": ex.text, "label": ex.label, "reason": d.reason, "detail": d.detail}
        for ex, d in zip(new, result.decisions[len(old) :], strict=True)
        if d.destination == "rejected"
    ]
    rows = [*old, *accepted_new]
    number = int(names[-1][1:]) + 1 if names else 1
    folder = root / f"v{number}"
    folder.mkdir(parents=True, exist_ok=False)
    write_examples(folder / "train.jsonl", rows)
    write_jsonl(folder / "review.jsonl", review)
    write_jsonl(folder / "rejected.jsonl", rejected)
    write_jsonl(folder / "skipped.jsonl", skipped)
    counts = {
        "previous_rows": len(old),
        "relabeled_rows": len(new) + len(skipped),
        "added": len(accepted_new),
        "review": len(review),
        "rejected": len(rejected),
        "skipped_out_of_label_set": len(skipped),
        "rows": len(rows),
    }
    manifest = {
        "version": folder.name,
        "parent": str(previous),
        "sources": [str(f) for f in relabeled],
        "content_hash": content_hash(rows),
        "counts": counts,
        "label_counts": label_counts(rows),
        "gold_excluded": [str(r) for r in gold_roots],
        "created": _now(),
    }
    write_json(folder / "manifest.json", manifest)
    log.info("training version %s: %s", folder, counts)
    return DataVersion(folder.name, folder, folder / "train.jsonl", counts)


# ---------------------------------------------------------------- retrain, gate, promote


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_registry(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        return {"production": None, "events": []}
    return dict(read_json(path))


def record(path: str | Path, event: dict[str, Any], *, promote: str | None = None) -> dict[str, Any]:
    """Append `event` to the registry (and make `promote` the production run); atomic write."""
    path = Path(path)
    registry = read_registry(path)
    registry["events"].append({"time": _now(), **event})
    if promote is not None:
        registry["production"] = promote
    write_json(path, registry)
    return registry


def production_run(registry: str | Path, default: str | Path | None = None) -> Path:
    current = read_registry(registry).get("production") or default
    if current is None:
        raise RunError(f"no production run in {registry}", fix="pass --production RUN_DIR once; promotions update it")
    return Path(current)


@dataclass
class RetrainResult:
    candidate: Path
    production: Path
    promoted: bool
    gold: str  # the gold tag: version@hash
    candidate_accuracy: float
    production_accuracy: float
    verdict: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def score_on_gold(predictor: Any, gold: GoldVersion, labels: Sequence[str], out_dir: str | Path) -> dict[str, Any]:
    """Score `predictor` on a gold version; writes metrics.json and predictions.jsonl naming it."""
    texts = [ex.text for ex in gold.rows]
    predicted = [p.label for p in predictor.predict(texts)]
    metrics = score([ex.label for ex in gold.rows], predicted, labels)
    out = RunDir(out_dir)
    payload = {
        "gold_version": gold.name,
        "gold_tag": gold.tag,
        "gold_hash": gold.content_hash,
        "gold_file": str(gold.path / "gold.jsonl"),
        "metrics": metrics.to_dict(),
    }
    write_json(out.metrics, payload)
    write_jsonl(
        out.predictions,
        ({"text": ex.text, "gold": ex.label, "label": p} for ex, p in zip(gold.rows, predicted, strict=True)),
    )
    return {**payload, "predicted": predicted}


def retrain(
    train_file: str | Path,
    candidate: str | Path,
    *,
    production: str | Path,
    gold: GoldVersion,
    labels: Sequence[str],
    registry: str | Path,
    trainer: Trainer,
    loader: Loader,
    gate_settings: GateSettings | dict[str, Any] | None = None,
) -> RetrainResult:
    """Train `candidate` on `train_file`, gate it against `production` on `gold`, promote if it passes.

    `gate_settings` sets the gate's margins (`GateSettings`, or a dict of its fields): a candidate
    lower than production by more than the margin is blocked even when the drop is not significant.
    """
    candidate, production = Path(candidate), Path(production)
    if not RunDir(candidate).manifest.is_file():  # an already trained candidate is gated as it is
        trainer(Path(train_file), candidate)
    scores = {
        name: score_on_gold(loader(run), gold, labels, RunDir(run).gold_evals(gold.name))
        for name, run in (("candidate", candidate), ("production", production))
    }
    texts = [ex.text for ex in gold.rows]
    golds = [ex.label for ex in gold.rows]
    cand = Scored(candidate.name, list(labels), texts, golds, scores["candidate"]["predicted"])
    prod = Scored(production.name, list(labels), texts, golds, scores["production"]["predicted"])
    settings = gate_settings if isinstance(gate_settings, GateSettings) else None
    overrides = gate_settings if isinstance(gate_settings, dict) else {}
    verdict = gate(cand, prod, settings, **overrides)
    gate_file = write_verdict(verdict, RunDir(RunDir(candidate).gold_evals(gold.name)).gate)
    result = RetrainResult(
        candidate=candidate,
        production=production,
        promoted=verdict.passed,
        gold=gold.tag,
        candidate_accuracy=scores["candidate"]["metrics"]["accuracy"],
        production_accuracy=scores["production"]["metrics"]["accuracy"],
        verdict={
            "passed": verdict.passed,
            "failed": [f"{c.name}: {c.detail}" for c in verdict.failed_checks],
            "non_inferiority": verdict.non_inferiority,
        },
    )
    event = {
        "event": "promoted" if verdict.passed else "blocked",
        "candidate": str(candidate),
        "production": str(production),
        "train_file": str(train_file),
        "gold": gold.tag,
        "candidate_accuracy": result.candidate_accuracy,
        "production_accuracy": result.production_accuracy,
        "gate": str(gate_file),
        "failed_checks": result.verdict["failed"],
    }
    record(registry, event, promote=str(candidate) if verdict.passed else None)
    log.info("%s %s on gold %s", event["event"], candidate, gold.tag)
    return result


def lora_trainer(config_path: str | Path, overrides: Sequence[str] = ()) -> Trainer:
    """A `Trainer` that trains the project config's LoRA run on a given training file."""
    from taskling.config import load_config
    from taskling.train.sft import train

    def run(train_file: Path, run_dir: Path) -> None:
        config = load_config(config_path, list(overrides))
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"train": [train_file]}), "run_dir": run_dir}
        )
        train(config)

    return run


def classifier_loader(run_dir: Path) -> Any:
    from taskling.serve.classifier import Classifier

    return Classifier.from_run(run_dir)


# ---------------------------------------------------------------- one scheduled cycle


@dataclass
class CycleResult:
    alarm: bool
    sampled: int = 0
    version: str | None = None
    retrain: RetrainResult | None = None
    steps: list[str] = field(default_factory=list)


def run_cycle(
    report: Any,
    sample: Callable[[], SampleResult],
    labeler: Callable[[list[dict[str, Any]]], Path],
    make_version: Callable[[Path], DataVersion],
    retrain_fn: Callable[[DataVersion], RetrainResult],
) -> CycleResult:
    """monitor -> sample -> relabel -> new version -> retrain through the gate, when the monitor alarms."""
    result = CycleResult(alarm=bool(report.alarm))
    result.steps.append(
        "monitor: " + ("alarm: " + ", ".join(s.name for s in report.moved) if report.alarm else "quiet")
    )
    if not report.alarm:
        return result
    sampled = sample()
    result.sampled = len(sampled.rows)
    result.steps.append(f"sample: {len(sampled.rows)} rows (excluded {sampled.excluded})")
    labeled = labeler(sampled.rows)
    version = make_version(labeled)
    result.version = version.name
    result.steps.append(f"relabel: {version.name} {version.counts}")
    result.retrain = retrain_fn(version)
    result.steps.append(("promoted " if result.retrain.promoted else "blocked ") + str(result.retrain.candidate))
    return result
