"""Config: defaults that work, unknown keys are errors, overrides and paths behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from taskling.config import load_config, parse_overrides
from taskling.errors import ConfigError
from taskling.task import Task


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


MINIMAL = {"task": {"labels": ["a", "b"]}, "data": {"train": ["train.jsonl"]}}


def test_minimal_config_gets_defaults_and_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, MINIMAL))
    assert cfg.data.train == [tmp_path / "train.jsonl"]
    assert cfg.lora.target_modules == "all-linear"
    assert (cfg.train.schedule, cfg.train.learning_rate, cfg.lora.r) == ("cosine", None, 16)  # None: by data size
    assert cfg.model.base == "bundled:smollm2-135m"


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    raw = {**MINIMAL, "train": {"epoch": 3}}
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key"):
        load_config(write_config(tmp_path, raw))


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    raw = {**MINIMAL, "lora": {"r": "sixteen"}}
    with pytest.raises(ConfigError, match=r"lora\.r"):
        load_config(write_config(tmp_path, raw))


def test_overrides_parse_yaml_values_and_cli_paths_are_cwd_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parse_overrides(["train.epochs=2", "task.name=x", "lora.target_modules=[q_proj,v_proj]"]) == {
        "train": {"epochs": 2},
        "task": {"name": "x"},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
    }
    conf = tmp_path / "conf"
    conf.mkdir()
    path = write_config(conf, MINIMAL)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path, ["train.epochs=1.5", "run_dir=runs/x"])
    assert cfg.train.epochs == 1.5
    assert cfg.run_dir == elsewhere / "runs" / "x"
    with pytest.raises(ConfigError, match="no '='"):
        load_config(path, ["train.epochs"])


def test_labels_file_and_label_validation(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("billing\n\nbug\n")
    cfg = load_config(write_config(tmp_path, {**MINIMAL, "task": {"labels_file": "labels.txt"}}))
    assert cfg.task.labels == ("billing", "bug")
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(write_config(tmp_path, {**MINIMAL, "task": {"labels": ["a", "b", "a"]}}))


def test_task_messages_put_the_instruction_in_the_system_turn() -> None:
    task = Task(labels=("a", "b"), instruction="Pick one.", list_labels_in_prompt=True)
    assert task.messages("hello", "a") == [
        {"role": "system", "content": "Pick one.\nCategories: a, b"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "a"},
    ]
