"""The cheap rungs: TF-IDF or MiniLM features + logistic regression, over the task's labels.

A `Rung` is a fitted scikit-learn pipeline that answers like the LoRA classifier:
`predict(texts) -> list[Prediction]`, probabilities over the task's labels in label order
(a label missing from the training rows gets probability 0). The ladder scores rungs as
models of their own; the cascade puts them in front of the specialist.

    tfidf   TF-IDF word 1-2 grams + logistic regression (~2 ms a message on a CPU)
    minilm  all-MiniLM-L6-v2 sentence embeddings + logistic regression (~20 ms)

`save` writes one joblib file holding the pipeline, the label set and the hash of the rows
it was fitted on; `load` reads it back (joblib unpickles: load only files you wrote). The
MiniLM encoder's weights are never pickled: they come from the bundled model package.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from taskling.errors import RunError, TasklingError
from taskling.extras import needs
from taskling.io import atomic_write
from taskling.serve.prediction import Prediction, from_row

__all__ = ["RUNG_KINDS", "Embedder", "Rung"]

log = logging.getLogger(__name__)

RUNG_KINDS = ("tfidf", "minilm")


class Embedder:
    """A scikit-learn transformer over all-MiniLM-L6-v2 embeddings (`taskling.model.embed`, frozen)."""

    def __init__(self) -> None:
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from taskling.model.embed import load_model

            self._model = load_model()
        return self._model

    def fit(self, texts: Sequence[str], y: Any = None) -> Embedder:
        return self

    def transform(self, texts: Sequence[str]) -> Any:
        from taskling.model.embed import embed

        self.model  # noqa: B018 - load (or fail with the install hint) before encoding
        return embed(texts)

    def __getstate__(self) -> dict[str, Any]:
        # The encoder's weights come from the model package, not from the pickle.
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._model = None


def _features(kind: str) -> Any:
    if kind == "tfidf":
        with needs("data"):
            from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    if kind == "minilm":
        return Embedder()
    raise TasklingError(f"unknown rung kind {kind!r}", fix=f"choose from {', '.join(RUNG_KINDS)}")


class Rung:
    """A fitted features + logistic-regression pipeline answering over `labels`."""

    def __init__(self, kind: str, pipeline: Any, labels: Sequence[str], *, data_hash: str = "") -> None:
        self.kind = kind
        self.pipeline = pipeline
        self.labels = list(labels)
        self.data_hash = data_hash
        self.train_seconds = 0.0
        classes = [str(c) for c in pipeline.classes_]
        self._order = [classes.index(label) if label in classes else -1 for label in self.labels]

    @classmethod
    def fit(
        cls, kind: str, texts: Sequence[str], targets: Sequence[str], labels: Sequence[str], *, data_hash: str = ""
    ) -> Rung:
        """Fit `kind` ('tfidf' or 'minilm') on (text, label) rows; answers range over `labels`."""
        with needs("data"):
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline

        features = _features(kind)
        started = time.perf_counter()
        pipeline = make_pipeline(features, LogisticRegression(max_iter=2000, C=10.0))
        pipeline.fit(list(texts), list(targets))
        rung = cls(kind, pipeline, labels, data_hash=data_hash)
        rung.train_seconds = time.perf_counter() - started
        log.info("%s rung: fitted on %d rows in %.1fs", kind, len(texts), rung.train_seconds)
        return rung

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), len(labels)] probabilities, columns in label order."""
        if not texts:
            return np.zeros((0, len(self.labels)))
        probs = self.pipeline.predict_proba(list(texts))
        out = np.zeros((len(texts), len(self.labels)))
        for j, k in enumerate(self._order):
            if k >= 0:
                out[:, j] = probs[:, k]
        return out

    def predict(self, texts: Sequence[str], *, batch_size: int = 256) -> list[Prediction]:
        """One Prediction per text, in input order (scikit-learn batches on its own; `batch_size` bounds memory)."""
        out: list[Prediction] = []
        for start in range(0, len(texts), max(batch_size, 1)):
            chunk = list(texts[start : start + batch_size])
            rows = self.predict_proba(chunk).tolist()
            out += [from_row(t, self.labels, row) for t, row in zip(chunk, rows, strict=True)]
        return out

    def __call__(self, text: str) -> Prediction:
        return self.predict([text])[0]

    def nbytes(self) -> int:
        """The pickled pipeline's size, plus the encoder's weights for MiniLM."""
        size = len(pickle.dumps(self.pipeline))
        if self.kind == "minilm":
            encoder = self.pipeline.steps[0][1].model
            size += sum(t.numel() * t.element_size() for t in [*encoder.parameters(), *encoder.buffers()])
        return size

    def save(self, path: str | Path) -> Path:
        import joblib

        payload = {"kind": self.kind, "labels": self.labels, "data_hash": self.data_hash, "pipeline": self.pipeline}
        with atomic_write(Path(path), "wb") as fh:
            joblib.dump(payload, fh)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Rung:
        import joblib

        path = Path(path)
        if not path.is_file():
            raise RunError(f"{path} does not exist", fix="rebuild the cascade: taskling cascade RUN_DIR --stages ...")
        with needs("data"):
            payload = joblib.load(path)
        if not isinstance(payload, dict) or not {"kind", "labels", "pipeline"} <= set(payload):
            raise RunError(f"{path} is not a taskling rung", fix="rebuild the cascade: taskling cascade RUN_DIR")
        return cls(payload["kind"], payload["pipeline"], payload["labels"], data_hash=payload.get("data_hash", ""))
