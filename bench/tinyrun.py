"""A tiny trained run for the bench scripts: the test suite's 2-layer random Llama, trained once.

`tiny_run(root)` builds it under `root` (default /tmp/taskling-bench) on first use and reuses it
after. Numbers measured with it say how the machinery holds up, not how a real model scores.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent.parent / "tests"


def tiny_run(root: str | Path = "/tmp/taskling-bench") -> Path:
    """The run directory of a tiny model trained on the clinc8 fixtures (built once)."""
    root = Path(root)
    run = root / "run"
    if (run / "train_summary.json").is_file() and (root / "tiny-llama" / "config.json").is_file():
        return run
    sys.path.insert(0, str(TESTS))
    from conftest import FIXTURES, build_tiny_model, clinc8_labels  # type: ignore[import-not-found]
    from taskling.config import build_config
    from taskling.train.sft import train

    model = build_tiny_model(root / "tiny-llama")
    config = build_config(
        {
            "task": {"name": "clinc8", "labels": clinc8_labels()},
            "data": {"train": [str(FIXTURES / "clinc8_train.jsonl")], "validation_fraction": 0.2},
            "model": {"base": str(model), "dtype": "float32", "max_length": 128},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "seed": 0, "threads": 1},
            "run_dir": str(run),
        }
    )
    train(config)
    return run
