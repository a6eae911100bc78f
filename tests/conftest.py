"""Shared fixtures: a tiny random chat model built from a config in seconds, and small data.

The tiny model is a 2-layer Llama with hidden size 64 and a byte-level BPE tokenizer
trained on the fixture texts, with a ChatML chat template like SmolLM2's. It knows
nothing, which is the point: tests check behaviour, not quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from taskling.model.tiny import build_tiny_model as build_random_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models gain nothing from a second thread, and threads oversubscribe a busy 2-core box.
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"


def clinc8_labels() -> list[str]:
    return (FIXTURES / "clinc8_labels.txt").read_text().split()


def build_tiny_model(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Llama and a trained-on-fixtures BPE tokenizer to `out`."""
    texts = [json.loads(line)["text"] for line in (FIXTURES / "clinc8_train.jsonl").read_text().splitlines()]
    texts += [*clinc8_labels(), "Classify the user's message. Answer with exactly one category name."]
    return build_random_model(out, texts=texts, seed=seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def labels() -> list[str]:
    return clinc8_labels()


def tiny_raw_config(model_dir: Path, labels: list[str], run_dir: Path) -> dict[str, Any]:
    """A raw config dict training the tiny model on the fixture data (fast: a few seconds)."""
    return {
        "task": {"name": "clinc8", "labels": labels},
        "data": {"train": [str(FIXTURES / "clinc8_train.jsonl")], "validation_fraction": 0.2},
        "model": {"base": str(model_dir), "dtype": "float32", "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 16, "learning_rate": 5e-3, "seed": 0, "threads": 1},
        "run_dir": str(run_dir),
    }


@pytest.fixture
def tiny_config(tiny_model_dir: Path, tmp_path: Path, labels: list[str]) -> dict[str, Any]:
    return tiny_raw_config(tiny_model_dir, labels, tmp_path / "run")


@pytest.fixture(scope="session")
def fmt(tiny_model_dir: Path, labels: list[str]) -> Any:
    """The tiny model's ChatFormat over the clinc8 labels."""
    from taskling.model.loader import ChatFormat, load_tokenizer
    from taskling.task import Task

    return ChatFormat(load_tokenizer(str(tiny_model_dir)), Task(labels=tuple(labels)), 128)


@pytest.fixture(scope="session")
def examples() -> list[tuple[str, str]]:
    """Seven (text, label) rows of the clinc8 fixture, spread over the file."""
    rows = [json.loads(line) for line in (FIXTURES / "clinc8_train.jsonl").read_text().splitlines()]
    return [(r["text"], r["label"]) for r in rows[::23][:7]]


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, labels: list[str]) -> Path:
    """One tiny run trained once per session, for tests that only need a finished run."""
    from taskling.config import build_config
    from taskling.train.sft import train

    run = tmp_path_factory.mktemp("trained") / "run"
    config = build_config(
        {
            "task": {"name": "clinc8", "labels": labels},
            "data": {"train": [str(FIXTURES / "clinc8_train.jsonl")], "validation_fraction": 0.2},
            "model": {"base": str(tiny_model_dir), "dtype": "float32", "max_length": 128},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "seed": 0, "threads": 1},
            "run_dir": str(run),
        }
    )
    train(config)
    return run
