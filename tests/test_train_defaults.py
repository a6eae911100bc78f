"""Defaults by data size: unset epochs, learning rate, warmup and batch size come from the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from taskling.config import TrainSettings, build_config
from taskling.io import read_json
from taskling.rundir import RunDir
from taskling.train.defaults import resolve_defaults, size_defaults


def test_the_table_by_rows_and_rows_per_label() -> None:
    assert size_defaults(100, 8) == {"epochs": 5.0, "learning_rate": 2e-4, "warmup_ratio": 0.10, "batch_size": 8}
    # the demo's size (20 intents x 40 rows): the old one-size defaults
    assert size_defaults(800, 20) == {"epochs": 3.0, "learning_rate": 2e-4, "warmup_ratio": 0.05, "batch_size": 8}
    assert size_defaults(3000, 150)["epochs"] == 4.0  # 20 rows per label: one more epoch
    assert size_defaults(15000, 150) == {"epochs": 2.0, "learning_rate": 3e-4, "warmup_ratio": 0.03, "batch_size": 16}
    assert size_defaults(50000)["batch_size"] == 32


def test_values_the_user_gave_are_kept() -> None:
    settings, filled = resolve_defaults(TrainSettings(epochs=7, batch_size=4), 15000, 150)
    assert (settings.epochs, settings.batch_size) == (7, 4)
    assert filled == {"learning_rate": 3e-4, "warmup_ratio": 0.03}
    same, none = resolve_defaults(settings, 10)
    assert same is settings and none == {}


def test_a_run_records_the_resolved_values(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    from taskling.train.sft import train

    raw = {**tiny_config, "train": {"max_steps": 1, "seed": 0, "threads": 1}}
    run = train(build_config(raw)).run_dir
    saved = yaml.safe_load(RunDir(run).config.read_text())["train"]
    assert saved["batch_size"] == 8 and saved["epochs"] == 5.0 and saved["warmup_ratio"] == 0.1  # 128 rows
    assert read_json(RunDir(run).manifest)["train_defaults_by_size"]["learning_rate"] == 2e-4
