"""The monitor's reference: what live traffic is compared with.

A generation run's reference also holds its eval answers' length and validity (`generation.py`).
The run's training rows (label shares, MiniLM embeddings cached in `RUN_DIR/monitor/`),
its validation rows (the OOD similarity cut-off, the input-drift noise level) and the
model's confidence on validation data (`RUN_DIR/monitor/calibration.json`, from `calibrate`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taskling.data.load import Example, content_hash, load_file
from taskling.errors import RunError
from taskling.io import atomic_write, read_json, write_json
from taskling.monitor.config import MonitorConfig
from taskling.monitor.generation import OutputReference, is_generation_run, output_reference
from taskling.rundir import RunDir

log = logging.getLogger(__name__)

Embedder = Callable[[Sequence[str]], np.ndarray]


# ---------------------------------------------------------------- embeddings


def hashing_embedder(texts: Sequence[str]) -> np.ndarray:
    """Character 2-4-gram hashing vectors with unit length: cheap, deterministic, no model."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 4), n_features=2**12, alternate_sign=False)
    return np.asarray(vec.transform(list(texts)).toarray(), dtype=np.float32)


def get_embedder(name: str) -> Embedder:
    if name == "hashing":
        return hashing_embedder
    from taskling.model.embed import embed

    return embed


def max_similarity(queries: np.ndarray, reference: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each query row, the cosine similarity of its nearest reference row (unit rows)."""
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        out[start : start + chunk] = (queries[start : start + chunk] @ reference.T).max(axis=1)
    return out


def centroid_distance(a: np.ndarray, b_mean: np.ndarray) -> float:
    m = a.mean(axis=0)
    denom = float(np.linalg.norm(m) * np.linalg.norm(b_mean)) or 1.0
    return 1.0 - float(m @ b_mean) / denom


# ---------------------------------------------------------------- the reference


@dataclass
class Reference:
    """What the window is compared with: the training data and the model on validation."""

    labels: list[str]
    label_share: dict[str, float]
    train_embeddings: np.ndarray
    val_embeddings: np.ndarray
    ood_similarity: float  # an input less similar than this to every training row is OOD
    mean_words: float
    confidence: float | None = None  # mean top probability on validation
    low_margin_share: float | None = None
    confidence_source: str = "none"
    train_hash: str = ""
    outputs: OutputReference | None = None  # a generation run's answers (no labels, no probabilities)


def text_stats(texts: Sequence[str]) -> dict[str, float]:
    if not texts:
        return {"mean_words": 0.0, "mean_chars": 0.0, "digit_share": 0.0, "non_ascii_share": 0.0}
    return {
        "mean_words": float(np.mean([len(t.split()) for t in texts])),
        "mean_chars": float(np.mean([len(t) for t in texts])),
        "digit_share": float(np.mean([bool(re.search(r"\d", t)) for t in texts])),
        "non_ascii_share": float(np.mean([any(ord(c) > 127 for c in t) for t in texts])),
    }


def build_reference(
    train: Sequence[Example],
    validation: Sequence[Example],
    labels: Sequence[str],
    embedder: Embedder,
    config: MonitorConfig,
    *,
    train_embeddings: np.ndarray | None = None,
    val_embeddings: np.ndarray | None = None,
) -> Reference:
    """The training label shares, embeddings and the OOD similarity cut-off from validation."""
    if not train:
        raise RunError("no training rows to compare the traffic with")
    counts = {label: 0 for label in labels}
    for ex in train:
        counts[ex.label] = counts.get(ex.label, 0) + 1
    share = {label: n / len(train) for label, n in counts.items()}
    t_emb = embedder([ex.text for ex in train]) if train_embeddings is None else train_embeddings
    v_emb = embedder([ex.text for ex in validation]) if val_embeddings is None else val_embeddings
    if len(v_emb):
        cutoff = float(np.quantile(max_similarity(v_emb, t_emb), config.ood_quantile))
    else:  # no held-out rows: leave-one-out within train would need an n^2 pass; be lenient
        log.warning("no validation rows: the OOD cut-off falls back to cosine similarity 0.3")
        cutoff = 0.3
    return Reference(
        labels=list(labels),
        label_share=share,
        train_embeddings=t_emb,
        val_embeddings=v_emb if len(v_emb) else t_emb,
        ood_similarity=cutoff,
        mean_words=text_stats([ex.text for ex in train])["mean_words"],
        train_hash=content_hash(train),
    )


def _cached_embeddings(path: Path, key: str, texts: Sequence[str], embedder: Embedder) -> np.ndarray:
    if path.is_file():
        with np.load(path) as cached:
            if str(cached["key"]) == key:
                return np.asarray(cached["vectors"])
    vectors = embedder(texts)
    with atomic_write(path, "wb") as fh:  # a crash mid-write must not leave a cache that fails to load
        np.savez(fh, key=np.array(key), vectors=vectors)
    return vectors


def run_labels(run_dir: Path) -> list[str]:
    run = RunDir(run_dir)
    if is_generation_run(run_dir):  # free text: no label set
        return []
    if run.manifest.is_file():
        return list(read_json(run.manifest)["task"]["labels"])
    if run.labels.is_file():
        return list(read_json(run.labels))
    raise RunError(f"{run_dir} records no label set (no run.json)", fix="point at a run directory taskling train wrote")


def load_reference(run_dir: str | Path, config: MonitorConfig, embedder: Embedder | None = None) -> Reference:
    """The run's reference; training embeddings are cached in `RUN_DIR/monitor/`."""
    run = RunDir(run_dir)
    if not run.train_data.is_file():
        raise RunError(f"{run.train_data} does not exist", fix="monitor a run directory written by taskling train")
    labels = run_labels(run.root)
    train = load_file(run.train_data).examples
    validation = load_file(run.validation_data).examples if run.validation_data.is_file() else []
    embedder = embedder or get_embedder(config.embedder)
    t_emb = _cached_embeddings(
        run.embedding_cache("train", config.embedder), content_hash(train), [ex.text for ex in train], embedder
    )
    v_emb = _cached_embeddings(
        run.embedding_cache("validation", config.embedder),
        content_hash(validation),
        [ex.text for ex in validation],
        embedder,
    )
    ref = build_reference(train, validation, labels, embedder, config, train_embeddings=t_emb, val_embeddings=v_emb)
    if is_generation_run(run.root):
        ref.outputs = output_reference(run.root)
    calibration = run.calibration
    if calibration.is_file():
        cal = read_json(calibration)
        ref.confidence, ref.low_margin_share = cal["confidence"], cal["low_margin_share"]
        ref.confidence_source = f"validation answers ({calibration})"
    return ref


def confidence_profile(probabilities: Sequence[dict[str, float]], low_margin: float) -> tuple[float, float]:
    """(mean top probability, share of answers with margin below `low_margin`)."""
    tops, margins = _top_and_margin(probabilities)
    return float(tops.mean()), float((margins < low_margin).mean())


def calibrate(run_dir: str | Path, probabilities: Sequence[dict[str, float]], config: MonitorConfig) -> Path:
    """Record the model's confidence on validation data as the monitor's reference."""
    confidence, low = confidence_profile(probabilities, config.low_margin)
    out = RunDir(run_dir).calibration
    payload = {
        "confidence": confidence,
        "low_margin_share": low,
        "low_margin": config.low_margin,
        "n": len(probabilities),
    }
    write_json(out, payload)
    return out


def _top_and_margin(probabilities: Sequence[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    tops, margins = [], []
    for probs in probabilities:
        values = sorted(probs.values(), reverse=True) or [0.0]
        tops.append(values[0])
        margins.append(values[0] - (values[1] if len(values) > 1 else 0.0))
    return np.array(tops, dtype=np.float64), np.array(margins, dtype=np.float64)
