"""The right-size ladder: the cheapest model that clears the bar, found by trying them in order.

On one training set and one gold set, `run_ladder` trains and scores, smallest first:

    tfidf       TF-IDF word/bigram features + logistic regression
    minilm      all-MiniLM-L6-v2 sentence embeddings + logistic regression
    zero-shot   the base LLM, no adapter, labels listed in the prompt, constrained to the set
    few-shot    the same with `shots` training examples per label as earlier chat turns
    lora        the LoRA fine-tune (an existing finished run directory, or trained here)
    lora+minilm the product of the lora and minilm probabilities, renormalised (evaluate/combine.py)

For each it records accuracy, macro-F1, the worst category, median single-message latency,
batch throughput and the model's memory (parameters and buffers; the pickled estimator
for scikit-learn), writes `OUT/<rung>/predictions.jsonl` and `metrics.json` (so any rung
can be gated or reported on its own), and names the first rung, in the order above, that
clears the bar: either a pinned baseline (the gate's checks) or a minimum accuracy and
worst-category accuracy. `OUT/ladder.json` holds the table.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from taskling.config import ProjectConfig
from taskling.data.load import Example, content_hash, load_file
from taskling.errors import TasklingError
from taskling.evaluate.combine import combined_rung
from taskling.evaluate.metrics import Metrics, score
from taskling.io import write_json, write_jsonl
from taskling.rundir import RunDir

log = logging.getLogger(__name__)

RUNGS = ("tfidf", "minilm", "zero-shot", "few-shot", "lora", "lora+minilm")
# Probabilities for every label, in label order, one row per text.
PredictFn = Callable[[Sequence[str]], list[list[float]]]


@dataclass
class Rung:
    name: str
    description: str
    accuracy: float
    macro_f1: float
    worst_category: str
    worst_category_accuracy: float
    out_of_label_set_rate: float
    latency_ms: float  # median over single-message calls
    messages_per_second: float  # batched, over the whole gold set
    memory_mb: float
    train_seconds: float
    clears: bool | None = None
    why: str = ""


@dataclass
class Bar:
    """What a rung must do to clear: a pinned baseline's gate, or minimum accuracies."""

    against: Path | None = None
    min_accuracy: float | None = None
    min_category_accuracy: float | None = None
    gate_settings: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.against is not None:
            return f"gate against {self.against}"
        parts = []
        if self.min_accuracy is not None:
            parts.append(f"accuracy >= {self.min_accuracy:.0%}")
        if self.min_category_accuracy is not None:
            parts.append(f"every category >= {self.min_category_accuracy:.0%}")
        return " and ".join(parts) or "no bar given"

    def judge(self, metrics: Metrics, predictions_dir: Path) -> tuple[bool | None, str]:
        if self.against is not None:
            from taskling.evaluate.gate import gate_paths

            verdict = gate_paths(predictions_dir, self.against, **(self.gate_settings or {}))
            failed = verdict.failed_checks
            return not failed, "; ".join(f"{c.name}: {c.detail}" for c in failed) or "gate passed"
        if self.min_accuracy is None and self.min_category_accuracy is None:
            return None, ""
        reasons = []
        if self.min_accuracy is not None and metrics.accuracy < self.min_accuracy:
            reasons.append(f"accuracy {metrics.accuracy:.1%} < {self.min_accuracy:.0%}")
        if self.min_category_accuracy is not None and metrics.worst_category_accuracy < self.min_category_accuracy:
            reasons.append(
                f"{metrics.worst_category} {metrics.worst_category_accuracy:.0%} < {self.min_category_accuracy:.0%}"
            )
        if metrics.out_of_label_set_rate > 0:
            reasons.append(f"{metrics.out_of_label_set_rate:.1%} outside the label set")
        return not reasons, "; ".join(reasons) or "clears"


@dataclass
class LadderResult:
    rungs: list[Rung]
    smallest: str | None
    bar: str
    out_dir: Path
    gold_rows: int
    train_rows: int
    gold_hash: str


# ---------------------------------------------------------------- rungs


def _sklearn_rung(kind: str, train: Sequence[Example], labels: Sequence[str]) -> tuple[PredictFn, float, int]:
    """Fit a `taskling.serve.rungs.Rung`; returns (predict_proba in label order, seconds, bytes)."""
    from taskling.serve.rungs import Rung

    rung = Rung.fit(kind, [ex.text for ex in train], [ex.label for ex in train], labels)

    def predict(texts: Sequence[str]) -> list[list[float]]:
        return [[float(p) for p in row] for row in rung.predict_proba(texts)]

    return predict, rung.train_seconds, rung.nbytes()


def tfidf_rung(train: Sequence[Example], labels: Sequence[str]) -> tuple[PredictFn, float, int]:
    return _sklearn_rung("tfidf", train, labels)


def minilm_rung(train: Sequence[Example], labels: Sequence[str]) -> tuple[PredictFn, float, int]:
    return _sklearn_rung("minilm", train, labels)


def _model_bytes(model: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def few_shot_examples(train: Sequence[Example], labels: Sequence[str], shots: int) -> tuple[tuple[str, str], ...]:
    """`shots` examples per label, interleaved label by label, the shortest texts first (cheap prompts)."""
    by_label: dict[str, list[str]] = {label: [] for label in labels}
    for ex in train:
        by_label[ex.label].append(ex.text)
    picked = {label: sorted(texts, key=lambda t: (len(t), t))[:shots] for label, texts in by_label.items()}
    return tuple((picked[label][k], label) for k in range(shots) for label in labels if k < len(picked[label]))


def prompted_rung(config: ProjectConfig, examples: tuple[tuple[str, str], ...] = ()) -> tuple[PredictFn, float, int]:
    """The base LLM without an adapter, labels listed in the prompt, scored over the label set only."""
    from taskling.model.loader import ChatFormat, default_device, load_model, load_tokenizer, pick_dtype, resolve_base
    from taskling.serve.classifier import Classifier

    mc = config.model
    path = resolve_base(mc.base, mc.gguf_file, mc.chat_template)
    tokenizer = load_tokenizer(path, mc.chat_template)
    model = load_model(path, pick_dtype(mc.dtype), default_device())
    task = config.task.model_copy(update={"list_labels_in_prompt": True, "examples": examples})
    fmt = ChatFormat(tokenizer, task, max_length=max(mc.max_length, 4096))
    clf = Classifier(model, fmt)
    return _classifier_predict(clf), 0.0, _model_bytes(model)


def lora_rung(config: ProjectConfig, lora_run: Path | None) -> tuple[PredictFn, float, int]:
    """A finished LoRA run (reused as is), or one trained here from `config`."""
    from taskling.serve.classifier import Classifier

    run = lora_run or Path(config.run_dir)
    files = RunDir(run)
    if files.manifest.is_file() and files.adapter.is_dir():
        log.info("lora: reusing the finished run %s", run)
        # train() writes run.json when it starts and train_summary.json when it ends (a run
        # stopped after a checkpoint has no summary: its best adapter's time stands in).
        end = files.summary if files.summary.is_file() else files.adapter
        seconds = end.stat().st_mtime - files.manifest.stat().st_mtime
    else:
        from taskling.train.sft import train

        log.info("lora: training %s", run)
        started = time.perf_counter()
        train(config.model_copy(update={"run_dir": run}) if lora_run else config)
        seconds = time.perf_counter() - started
    clf = Classifier.from_run(run, cascade=False)
    assert isinstance(clf, Classifier)
    return _classifier_predict(clf), max(float(seconds), 0.0), _model_bytes(clf.model)


def lora_and_minilm(
    config: ProjectConfig, train_rows: Sequence[Example], labels: list[str], lora_run: Path | None
) -> tuple[PredictFn, float, int]:
    """The lora and minilm rungs pooled, their weights fitted on the lora run's validation rows
    (held out of both rungs' training when the run was trained from `config`)."""
    lora = lora_rung(config, lora_run)
    validation = load_file(RunDir(lora_run or Path(config.run_dir)).validation_data, config.task).examples
    held_out = ([ex.text for ex in validation], [labels.index(ex.label) for ex in validation])
    return combined_rung([lora, minilm_rung(train_rows, labels)], held_out)


def _classifier_predict(clf: Any) -> PredictFn:
    labels = clf.task.labels

    def predict(texts: Sequence[str]) -> list[list[float]]:
        return [[p.probabilities[label] for label in labels] for p in clf.predict(list(texts))]

    return predict


# ---------------------------------------------------------------- scoring


def _measure(
    name: str, predict: PredictFn, gold: Sequence[Example], labels: Sequence[str], latency_samples: int
) -> tuple[list[list[float]], float, float]:
    texts = [ex.text for ex in gold]
    predict(texts[:2])  # warm-up: first-call costs (lazy init, allocator) are not latency
    started = time.perf_counter()
    probs = predict(texts)
    seconds = time.perf_counter() - started
    step = max(1, len(texts) // max(latency_samples, 1))
    timings = []
    for text in texts[::step][:latency_samples]:
        t0 = time.perf_counter()
        predict([text])
        timings.append((time.perf_counter() - t0) * 1000)
    latency = statistics.median(timings) if timings else float("nan")
    log.info("%s: %d rows in %.1fs, median latency %.1f ms", name, len(texts), seconds, latency)
    return probs, len(texts) / max(seconds, 1e-9), latency


def _write_rung(
    out: Path, gold: Sequence[Example], labels: Sequence[str], probs: list[list[float]], extra: dict[str, Any]
) -> Metrics:
    predicted, rows = [], []
    for ex, row in zip(gold, probs, strict=True):
        ranked = sorted(range(len(labels)), key=lambda j: -row[j])
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else ranked[0]
        predicted.append(labels[best])
        rows.append(
            {
                "text": ex.text,
                "gold": ex.label,
                "label": labels[best],
                "probability": row[best],
                "margin": row[best] - (row[second] if second != best else 0.0),
            }
        )
    metrics = score([ex.label for ex in gold], predicted, labels)
    rung = RunDir(out)
    write_jsonl(rung.predictions, rows)
    write_json(rung.metrics, {"gold_hash": content_hash(gold), **extra, **metrics.to_dict()})
    write_json(rung.labels, list(labels))
    return metrics


def rung_builders(
    config: ProjectConfig, train_rows: Sequence[Example], labels: list[str], shots: int, lora_run: str | Path | None
) -> dict[str, tuple[str, Callable[[], tuple[PredictFn, float, int]]]]:
    """Each rung's description and how to build it (a predict function, training seconds, bytes)."""
    return {
        "tfidf": ("TF-IDF 1-2 grams + logistic regression", lambda: tfidf_rung(train_rows, labels)),
        "minilm": ("all-MiniLM-L6-v2 embeddings + logistic regression", lambda: minilm_rung(train_rows, labels)),
        "zero-shot": (f"{config.model.base}, no adapter, labels in prompt", lambda: prompted_rung(config)),
        "few-shot": (
            f"{config.model.base}, no adapter, {shots} example(s) per label",
            lambda: prompted_rung(config, few_shot_examples(train_rows, labels, shots)),
        ),
        "lora": (
            f"{config.model.base} + LoRA r={config.lora.r}",
            lambda: lora_rung(config, Path(lora_run) if lora_run else None),
        ),
        "lora+minilm": (  # evaluate/combine.py: weighted product of the two rungs' probabilities
            "lora and minilm probabilities pooled, weights fitted on the lora run's validation rows",
            lambda: lora_and_minilm(config, train_rows, labels, Path(lora_run) if lora_run else None),
        ),
    }


def run_ladder(
    config: ProjectConfig,
    gold_file: str | Path,
    out_dir: str | Path,
    *,
    rungs: Sequence[str] = RUNGS,
    lora_run: str | Path | None = None,
    shots: int = 1,
    bar: Bar | None = None,
    latency_samples: int = 20,
    progress: Callable[[int, int], None] | None = None,
) -> LadderResult:
    """Train and score every rung on the same data; name the smallest that clears `bar`.

    `progress(done, total)` is called with the rungs done so far, from 0 up."""
    from taskling.train.sft import prepare_data

    unknown = [r for r in rungs if r not in RUNGS]
    if unknown:
        raise TasklingError(f"unknown rung(s): {', '.join(unknown)}", fix=f"choose from {', '.join(RUNGS)}")
    bar = bar or Bar()
    out_dir = Path(out_dir)
    labels = list(config.task.labels)
    train_rows = prepare_data(config).train
    gold = load_file(gold_file, config.task).examples
    builders = rung_builders(config, train_rows, labels, shots, lora_run)
    results: list[Rung] = []
    chosen = [r for r in RUNGS if r in rungs]
    if progress is not None:
        progress(0, len(chosen))
    for name in chosen:
        description, build = builders[name]
        log.info("ladder: %s (%s)", name, description)
        predict, train_seconds, size = build()
        probs, rate, latency = _measure(name, predict, gold, labels, latency_samples)
        rung_dir = out_dir / name
        extra = {
            "gold_file": str(gold_file),
            "rung": name,
            "messages_per_second": rate,
            "latency_ms": latency,
            "memory_mb": size / 2**20,
        }
        metrics = _write_rung(rung_dir, gold, labels, probs, extra)
        rung = Rung(
            name=name,
            description=description,
            accuracy=metrics.accuracy,
            macro_f1=metrics.macro_f1,
            worst_category=metrics.worst_category,
            worst_category_accuracy=metrics.worst_category_accuracy,
            out_of_label_set_rate=metrics.out_of_label_set_rate,
            latency_ms=latency,
            messages_per_second=rate,
            memory_mb=size / 2**20,
            train_seconds=train_seconds,
        )
        rung.clears, rung.why = bar.judge(metrics, rung_dir)
        results.append(rung)
        if progress is not None:
            progress(len(results), len(chosen))
        del predict  # let the rung's model go before the next one loads
    smallest = next((r.name for r in results if r.clears), None)
    result = LadderResult(
        rungs=results,
        smallest=smallest,
        bar=bar.describe(),
        out_dir=out_dir,
        gold_rows=len(gold),
        train_rows=len(train_rows),
        gold_hash=content_hash(gold),
    )
    payload = {**asdict(result), "out_dir": str(out_dir), "gold_file": str(gold_file)}
    write_json(RunDir(out_dir).ladder, payload)
    return result
