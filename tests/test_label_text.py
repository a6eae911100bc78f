"""task.label_text and task.label_descriptions: the model learns "book flight", every user sees "book_flight"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from taskling.config import build_config
from taskling.errors import ConfigError
from taskling.io import read_json, read_jsonl
from taskling.model.loader import ChatFormat, load_tokenizer
from taskling.rundir import RunDir
from taskling.task import Task

FIXTURES = Path(__file__).parent / "fixtures"


def test_readable_labels_are_written_with_spaces_and_mapped_back() -> None:
    task = Task(labels=("transfer_money", "card__declined", "weather"), label_text="readable")
    assert [task.answer(label) for label in task.labels] == ["transfer money", "card declined", "weather"]
    assert task.label_of("transfer money") == "transfer_money"
    assert task.messages("hi", "transfer_money")[-1] == {"role": "assistant", "content": "transfer money"}
    assert Task(labels=("a_b", "c")).answer("a_b") == "a_b"  # as_written is the default


def test_readable_labels_that_collide_are_refused_naming_both() -> None:
    with pytest.raises((ConfigError, ValueError), match=r"'top_up'.*'top up'"):
        Task(labels=("top_up", "top up", "other"), label_text="readable")
    with pytest.raises(ConfigError, match=r"top_up.*top up"):
        build_config({"task": {"labels": ["top_up", "top up"], "label_text": "readable"}, "data": {"train": ["x"]}})


def test_label_descriptions_go_into_the_system_prompt_and_must_name_labels() -> None:
    task = Task(labels=("book_flight", "weather"), label_text="readable", label_descriptions={"weather": "forecasts"})
    assert task.system_prompt().endswith("\nweather: forecasts")
    with pytest.raises((ConfigError, ValueError), match="wether"):
        Task(labels=("book_flight", "weather"), label_descriptions={"wether": "typo"})


def test_the_chat_format_scores_the_readable_text(tiny_model_dir: Path, labels: list[str]) -> None:
    task = Task(labels=tuple(labels), label_text="readable")
    fmt = ChatFormat(load_tokenizer(str(tiny_model_dir)), task, 128)
    assert "book flight" in fmt.answer_text("book_flight") and "book_flight" not in fmt.answer_text("book_flight")
    plain = ChatFormat(load_tokenizer(str(tiny_model_dir)), Task(labels=tuple(labels)), 128)
    assert fmt.answer_ids("book_flight") != plain.answer_ids("book_flight")


def test_a_readable_run_predicts_and_scores_labels_as_written(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    from taskling.evaluate.metrics import evaluate
    from taskling.serve.classifier import Classifier
    from taskling.train.sft import train

    raw = {**tiny_config, "task": {**tiny_config["task"], "label_text": "readable"}}
    raw["train"] = {**raw["train"], "max_steps": 2}
    run = train(build_config(raw)).run_dir
    manifest = read_json(RunDir(run).manifest)
    assert manifest["label_answers"]["book_flight"].startswith("book flight")
    clf = Classifier.from_run(run, device="cpu")
    predictions = clf.predict(["book me a flight to paris", "what's the weather"])
    assert {p.label for p in predictions} <= set(tiny_config["task"]["labels"])
    assert set(predictions[0].probabilities) == set(tiny_config["task"]["labels"])
    evaluate(run, FIXTURES / "clinc8_gold.jsonl", out_dir=tmp_path / "eval", classifier=clf)
    rows = list(read_jsonl(RunDir(tmp_path / "eval").predictions))
    assert {r["label"] for r in rows} <= set(tiny_config["task"]["labels"])
    assert any("_" in r["gold"] for r in rows)
