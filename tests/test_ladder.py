"""The right-size ladder on the fixture data: every rung scored on the same gold rows, the
smallest that clears the bar named, each rung's files usable by the gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.config import build_config
from taskling.data.load import Example
from taskling.evaluate.gate import gate_paths, load_predictions
from taskling.evaluate.ladder import Bar, few_shot_examples, run_ladder
from taskling.model.loader import ChatFormat, load_tokenizer
from taskling.task import Task

FIXTURES = Path(__file__).parent / "fixtures"
GOLD = FIXTURES / "clinc8_gold.jsonl"


def test_few_shot_examples_cover_every_label_shortest_first() -> None:
    train = [Example("a longer text", "x"), Example("short", "x"), Example("yy", "y"), Example("z1", "z")]
    shots = few_shot_examples(train, ["x", "y", "z"], 1)
    assert shots == (("short", "x"), ("yy", "y"), ("z1", "z"))
    assert few_shot_examples(train, ["x", "y", "z"], 2) == (*shots, ("a longer text", "x"))


def test_task_examples_render_as_earlier_turns_and_default_is_unchanged() -> None:
    plain = Task(labels=("a", "b"))
    assert [m["role"] for m in plain.messages("hi")] == ["system", "user"]
    shot = Task(labels=("a", "b"), examples=(("one", "a"), ("two", "b")))
    msgs = shot.messages("hi", "a")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs[1:]] == ["one", "a", "two", "b", "hi", "a"]


def test_few_shot_prompt_keeps_answers_after_the_generation_prompt(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    task = Task(labels=("balance", "timer"), list_labels_in_prompt=True, examples=(("set a timer", "timer"),))
    fmt = ChatFormat(tok, task, max_length=512)
    prompt = tok.decode(fmt.prompt_ids("how much money"))
    assert "Categories: balance, timer" in prompt
    assert prompt.index("set a timer") < prompt.index("how much money")
    assert fmt.answer_text("timer").startswith("timer")


def test_ladder_scores_every_rung_and_names_the_smallest_that_clears(
    tiny_config: dict[str, Any], trained_run: Path, tmp_path: Path
) -> None:
    config = build_config(tiny_config)
    out = tmp_path / "ladder"
    bar = Bar(min_accuracy=0.5)
    result = run_ladder(
        config, GOLD, out, rungs=["tfidf", "zero-shot", "few-shot", "lora"], lora_run=trained_run, bar=bar
    )
    names = [r.name for r in result.rungs]
    assert names == ["tfidf", "zero-shot", "few-shot", "lora"]
    assert result.gold_rows == 80
    by_name = {r.name: r for r in result.rungs}
    # TF-IDF on 8 well-separated intents is far above chance; the random tiny LLM is not.
    assert by_name["tfidf"].accuracy > 0.5 and by_name["tfidf"].clears
    assert by_name["zero-shot"].accuracy < 0.5 and by_name["zero-shot"].clears is False
    assert "accuracy" in by_name["zero-shot"].why
    assert result.smallest == "tfidf"
    for r in result.rungs:
        assert r.latency_ms > 0 and r.messages_per_second > 0 and r.memory_mb > 0
        assert r.out_of_label_set_rate == 0.0
    assert by_name["lora"].memory_mb > by_name["tfidf"].memory_mb
    saved = json.loads((out / "ladder.json").read_text())
    assert saved["smallest"] == "tfidf" and len(saved["rungs"]) == 4
    # Every rung left a predictions file on the same gold rows: the gate can hold one to another.
    rung = load_predictions(out / "tfidf")
    assert len(rung.gold) == 80 and rung.gold_hash == saved["gold_hash"]
    verdict = gate_paths(out / "zero-shot", out / "tfidf", write=False)
    assert not verdict.passed and verdict.assessment == "regression"


def test_ladder_command_rejects_an_unknown_rung(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    import yaml

    cfg = tmp_path / "task.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(
        app, ["ladder", str(cfg), "--gold", str(GOLD), "--rungs", "tfidf,bert", "--out", str(tmp_path / "l")]
    )
    assert result.exit_code == 2
    assert "unknown rung(s): bert" in result.output


@pytest.mark.slow
def test_minilm_rung_on_fixture_data(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("all_minilm_l6_v2")
    result = run_ladder(build_config(tiny_config), GOLD, tmp_path / "ladder", rungs=["minilm"])
    (rung,) = result.rungs
    assert rung.accuracy > 0.8  # sentence embeddings separate 8 CLINC intents easily
    assert 80 < rung.memory_mb < 100  # 22.7M float32 parameters
