"""task.kind: generate — config, rows, constrained decoding on the tiny model, bad input."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import regex
import torch
import yaml

from taskling.config import DataConfig
from taskling.errors import ConfigError, DataError
from taskling.generate.decode import GenerationFormat, PrefixConstraint
from taskling.generate.generator import Generator
from taskling.generate.spec import (
    GenerationTask,
    config_kind,
    load_generation_config,
    load_generation_rows,
)
from taskling.model.loader import load_model, load_tokenizer

CODE = r"[A-Z]{2}-\d{3}"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, task: dict[str, Any], data: str = "train.jsonl") -> Path:
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump({"task": {"kind": "generate", **task}, "data": {"train": [data]}}))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir), torch.float32)


def generator(tiny: tuple[Any, Any], task: dict[str, Any], **kwargs: Any) -> Generator:
    tokenizer, model = tiny
    return Generator(model, GenerationFormat(tokenizer, GenerationTask.model_validate(task), 128), **kwargs)


# ---------------------------------------------------------------- config


def test_a_generate_config_is_told_apart_and_validated(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"output": {"format": "regex", "pattern": CODE, "max_tokens": 8}})
    assert config_kind(path) == "generate"
    cfg = load_generation_config(path, ["train.epochs=2"])
    assert cfg.task.output.pattern == CODE and cfg.train.epochs == 2
    assert cfg.data.train == [tmp_path / "train.jsonl"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"task": {"labels": ["a", "b"]}, "data": {"train": ["x.jsonl"]}}))
    assert config_kind(plain) == "classification"


def test_a_regex_that_does_not_compile_names_the_pattern_and_the_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"output": {"format": "regex", "pattern": "[A-Z{2"}})
    with pytest.raises(ConfigError) as err:
        load_generation_config(path)
    assert "[A-Z{2" in str(err.value) and "does not compile" in str(err.value)
    assert "task.output" in str(err.value) and "fix:" in str(err.value)


def test_a_regex_format_needs_a_pattern(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"output\.pattern"):
        load_generation_config(write_config(tmp_path, {"output": {"format": "regex"}}))


def test_a_missing_sql_database_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"output": {"format": "sql"}, "sql": {"database": "nope.sqlite"}})
    with pytest.raises(ConfigError) as err:
        load_generation_config(path)
    assert str(tmp_path / "nope.sqlite") in str(err.value) and "fix:" in str(err.value)


# ---------------------------------------------------------------- rows


def test_rows_in_every_shape_with_slices_duplicates_and_bad_answers(tmp_path: Path) -> None:
    rows = [
        {"instruction": "ticket one", "response": "AB-123", "slice": "short"},
        {"instruction": "ticket one", "response": "AB-123", "slice": "short"},  # exact duplicate
        {"instruction": "do it", "input": "ticket two", "output": "CD-456", "category": "alpaca"},
        {"messages": [{"role": "user", "content": "ticket three"}, {"role": "assistant", "content": "EF-789"}]},
        {"instruction": "ticket four", "response": "not a code"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    task = GenerationTask.model_validate({"output": {"format": "regex", "pattern": CODE}})
    with pytest.raises(DataError) as err:
        load_generation_rows([path], task, DataConfig(train=[path]))
    assert f"{path}:5" in str(err.value) and "fails the output format" in str(err.value)
    loaded = load_generation_rows([path], task, DataConfig(train=[path], on_bad_rows="skip"))
    assert [(ex.text, ex.answer, ex.slice) for ex in loaded.examples] == [
        ("ticket one", "AB-123", "short"),
        ("ticket two", "CD-456", "alpaca"),
        ("ticket three", "EF-789", ""),
    ]
    assert loaded.duplicates == 1 and loaded.rows_read == 5
    assert [(b.line, b.reason) for b in loaded.bad_rows] == [(5, "answer_fails_format")]


def test_a_gold_reference_failing_its_format_always_stops(tmp_path: Path) -> None:
    from taskling.evaluate.generation import load_gold_rows

    path = write_jsonl(tmp_path / "gold.jsonl", [{"text": "a", "label": "AB-123"}, {"text": "b", "label": "ab-12"}])
    task = GenerationTask.model_validate({"output": {"format": "regex", "pattern": CODE}})
    with pytest.raises(DataError) as err:
        load_gold_rows(path, task)
    assert f"{path}:2" in str(err.value) and "gold reference" in str(err.value)


def test_sql_answers_must_be_one_read_only_statement() -> None:
    task = GenerationTask.model_validate({"output": {"format": "sql"}})
    assert task.format_problem("SELECT name FROM t WHERE id = 1;") is None
    assert task.format_problem("with x as (select 1) select * from x") is None
    assert task.format_problem("DELETE FROM t") is not None
    assert task.format_problem("SELECT 1; DROP TABLE t") is not None


# ---------------------------------------------------------------- constrained decoding


# Bounded patterns: an unbounded one (`[a-z]+`) may run into max_tokens on random weights (that case is below).
@pytest.mark.parametrize("pattern", [CODE, r"(yes|no), because [a-z]{1,6}( [a-z]{1,6}){0,2}\.", r"\d{1,3} (kg|lb)"])
def test_every_constrained_output_fullmatches_on_random_weights(tiny: tuple[Any, Any], pattern: str) -> None:
    gen = generator(tiny, {"output": {"format": "regex", "pattern": pattern, "max_tokens": 40}})
    texts = ["book a flight to london", "what is my balance", "set a timer", "pay the bill", "weather in boston"]
    results = gen.generate(texts, batch_size=2)
    assert len(results) == len(texts)
    for r in results:
        assert regex.fullmatch(pattern, r.output), r
        assert r.valid and r.problem == "" and r.n_tokens > 0


def test_the_unconstrained_path_differs(tiny: tuple[Any, Any]) -> None:
    task = {"output": {"format": "regex", "pattern": CODE, "max_tokens": 12}}
    texts = ["book a flight to london", "what is my balance"]
    free = generator(tiny, task, constrained=False).generate(texts)
    held = generator(tiny, task).generate(texts)
    assert [r.output for r in free] != [r.output for r in held]
    assert not all(regex.fullmatch(CODE, r.output) for r in free)
    assert all(not r.valid for r in free if not regex.fullmatch(CODE, r.output))


def test_an_answer_cut_by_max_tokens_is_counted_invalid(tiny: tuple[Any, Any]) -> None:
    gen = generator(tiny, {"output": {"format": "regex", "pattern": r"[a-z]{30}", "max_tokens": 3}})
    (r,) = gen.generate(["book a flight"])
    assert not r.valid and r.n_tokens == 3 and "max_tokens=3" in r.problem
    assert regex.fullmatch(r"[a-z]{30}", r.output, partial=True)  # a prefix of a match, cut short


def test_batched_and_one_by_one_decoding_agree(tiny: tuple[Any, Any]) -> None:
    gen = generator(tiny, {"output": {"format": "regex", "pattern": CODE, "max_tokens": 10}})
    texts = ["book a flight to london tomorrow morning", "hi", "pay the electric bill before friday"]
    assert [r.output for r in gen.generate(texts, batch_size=3)] == [
        r.output for r in gen.generate(texts, batch_size=1)
    ]


def test_the_constraint_takes_the_best_allowed_token() -> None:
    texts: list[str | None] = ["x", "A", "B", "-", None]
    c = PrefixConstraint(regex.compile("[AB]-"), texts, end_id=4, prompt_width=0)
    scores = torch.tensor([9.0, 1.0, 2.0, 8.0, 7.0])
    assert c.choose("", scores) == 2  # "x" and "-" cannot start a match; "B" beats "A"
    assert c.choose("B", scores) == 3
    assert c.choose("B-", scores) == 4  # a full match: the end token is allowed again


def test_sql_decoding_starts_a_read_only_statement_and_checks_it_runs(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    db = tmp_path / "shop.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER, name TEXT)")
    task = {"output": {"format": "sql", "max_tokens": 24}, "sql": {"database": str(db)}}
    results = generator(tiny, task).generate(["how many rows", "list the names"])
    for r in results:
        assert regex.match(r"\s*(select|with)\s", r.output, regex.IGNORECASE), r
        assert ";" not in r.output.rstrip().rstrip(";")
        if r.valid:
            assert r.problem == ""
        else:  # random weights: the statement is cut or does not compile
            assert r.problem


def test_generate_base_zero_and_few_shot(tiny_model_dir: Path, tmp_path: Path) -> None:
    from taskling.generate.generator import generate_base
    from taskling.generate.spec import build_generation_config

    config = build_generation_config(
        {
            "task": {"kind": "generate", "output": {"format": "regex", "pattern": CODE, "max_tokens": 8}},
            "data": {"train": [str(tmp_path / "train.jsonl")]},
            "model": {"base": str(tiny_model_dir), "dtype": "float32", "max_length": 96},
        }
    )
    base = generate_base(config, device="cpu")
    shots = generate_base(
        config, [("ticket about my flight", "FL-123"), ("ticket about my bill", "BI-456")], device="cpu"
    )
    assert base.version.startswith("base:") and shots.version.startswith("few-shot:")
    prompt = shots.fmt.tokenizer.decode(shots.fmt.prompt_ids("ticket about rain"))
    assert (
        "FL-123" in prompt
        and "BI-456" in prompt
        and "FL-123" not in base.fmt.tokenizer.decode(base.fmt.prompt_ids("x"))
    )
    for gen in (base, shots):
        assert all(regex.fullmatch(CODE, r.output) for r in gen.generate(["ticket about rain", "hi"]))
