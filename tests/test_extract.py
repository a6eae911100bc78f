"""Extraction and multi-output tasks: schema, constrained decoding, training, metrics, CLI."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest
import torch
from pydantic import BaseModel
from typer.testing import CliRunner

from taskling.errors import ConfigError, DataError
from taskling.evaluate.extraction import char_f1, evaluate_extraction, rouge_l, score_records, score_texts
from taskling.evaluate.metrics import Metrics
from taskling.extract.extractor import ConstrainedDecoder, RecordFormat
from taskling.extract.schema import ExtractionTask, build_extraction_config, load_records
from taskling.model.loader import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMA = FIXTURES / "extract8_schema.json"

# Every field type, optional and required, with tight limits so the limits are exercised.
ALL_TYPES = {
    "fields": [
        {"name": "intent", "type": "enum", "values": ["balance", "book_flight", "card_declined"]},
        {"name": "priority", "type": "enum", "values": ["low", "high"], "required": False},
        {"name": "urgent", "type": "boolean"},
        {"name": "flag", "type": "boolean", "required": False},
        {"name": "count", "type": "integer", "max_digits": 4},
        {"name": "amount", "type": "number", "required": False, "max_digits": 5},
        {"name": "note", "type": "string", "max_length": 12},
        {"name": "city", "type": "string", "required": False, "max_length": 8},
    ]
}


class Ticket(BaseModel):
    category: Literal["billing", "tech"]
    priority: Literal["low", "high"] | None = None
    amount: float | None = None
    summary: str


def test_task_forms_agree() -> None:
    from_schema = ExtractionTask.model_validate({"json_schema": str(SCHEMA)})
    assert from_schema.field_names == ["intent", "domain", "amount", "number", "day", "city"]
    kinds = {f.name: (f.type, f.required) for f in from_schema.fields}
    assert kinds["intent"] == ("enum", True) and kinds["amount"] == ("number", False)
    assert kinds["day"] == ("enum", False) and kinds["city"] == ("string", False)
    assert from_schema.fields[-1].max_length == 24

    multi = ExtractionTask.model_validate(
        {"label_sets": {"category": ["billing", "tech"], "sentiment": ["pos", "neg"]}}
    )
    assert multi.kind == "multi_label_set" and [f.type for f in multi.fields] == ["enum", "enum"]

    from_model = ExtractionTask.model_validate({"pydantic_model": f"{__name__}:Ticket"})
    spec = {f.name: (f.type, f.required, f.values) for f in from_model.fields}
    assert spec == {
        "category": ("enum", True, ("billing", "tech")),
        "priority": ("enum", False, ("low", "high")),
        "amount": ("number", False, ()),
        "summary": ("string", True, ()),
    }
    # The task's own JSON Schema round-trips to the same fields.
    again = ExtractionTask.model_validate({"json_schema": from_model.json_schema()})
    assert again.fields == from_model.fields


def test_records_are_checked_against_the_schema(tmp_path: Path) -> None:
    task = ExtractionTask.model_validate(ALL_TYPES)
    good = {"intent": "balance", "urgent": True, "count": 3, "note": "hi", "amount": 2.5}
    record = task.validate_record(good)
    assert list(record) == task.field_names and record["priority"] is None and record["city"] is None
    assert task.parse(task.render(record)) == record
    for bad, why in [
        ({**good, "intent": "nope"}, "not one of"),
        ({**good, "count": "3"}, "expected an integer"),
        ({**good, "urgent": None}, "required"),
        ({**good, "extra": 1}, "unknown fields"),
    ]:
        with pytest.raises(ValueError, match=why):
            task.validate_record(bad)
    with pytest.raises(ConfigError, match="give one of"):
        ExtractionTask.model_validate({"label_sets": {"a": ["x"]}, "json_schema": str(SCHEMA)})

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "a", "record": good}) + "\n" + json.dumps({"text": "b", "record": {}}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2"):
        load_records([data], task)
    loaded = load_records([data], task, on_bad_rows="skip")
    assert len(loaded.examples) == 1 and loaded.rows_read == 2
    assert [b.line for b in loaded.bad_rows] == [2] and loaded.bad_rows[0].detail == "intent: missing"


def test_answer_tokens_decode_to_the_rendered_record(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    task = ExtractionTask.model_validate({"json_schema": str(SCHEMA)})
    fmt = RecordFormat(tokenizer, task, 160)
    assert fmt.end_text == "<|im_end|>"
    for ex in load_records([FIXTURES / "extract8_train.jsonl"], task).examples:
        text = tokenizer.decode(fmt.answer_ids(ex.record), clean_up_tokenization_spaces=False)
        assert text == task.render(ex.record) + "<|im_end|>"


class OracleModel(torch.nn.Module):
    """Puts all probability on the next token of a target sequence: shows the decoder can emit it."""

    def __init__(self, vocab: int, prompt_len: int, target: list[int]) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, vocab, bias=False)
        self.prompt_len, self.target = prompt_len, target

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, **_: Any) -> SimpleNamespace:
        seen = (past_key_values or 0) + input_ids.shape[1]
        logits = torch.zeros(1, 1, self.head.out_features)
        pos = seen - self.prompt_len
        if pos < len(self.target):
            logits[0, 0, self.target[pos]] = 50.0
        return SimpleNamespace(logits=logits, past_key_values=seen)


class NoiseModel(OracleModel):
    """Random logits at every step: an adversary that tries every path the constraints leave open."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__(vocab, 0, [])
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, **_: Any) -> SimpleNamespace:
        logits = torch.randn(1, 1, self.head.out_features, generator=self.gen) * 8
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_decoder_can_emit_every_training_answer(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    task = ExtractionTask.model_validate({"json_schema": str(SCHEMA)})
    fmt = RecordFormat(tokenizer, task, 160)
    examples = load_records([FIXTURES / "extract8_train.jsonl"], task).examples
    vocab = len(tokenizer)
    decoder = ConstrainedDecoder(OracleModel(vocab, 0, []), fmt)
    for ex in examples[:60]:
        decoder.model = OracleModel(vocab, len(fmt.prompt_ids(ex.text)), fmt.answer_ids(ex.record))
        out = decoder.decode(ex.text)
        assert out.valid and out.record == ex.record
        assert out.answer == task.render(ex.record)


def test_random_logits_always_give_schema_valid_records(tiny_model_dir: Path) -> None:
    import jsonschema

    tokenizer = load_tokenizer(str(tiny_model_dir))
    task = ExtractionTask.model_validate(ALL_TYPES)
    fmt = RecordFormat(tokenizer, task, 200)
    seen_null, seen_value = set(), set()
    decoder = ConstrainedDecoder(NoiseModel(len(tokenizer), 0), fmt)
    for seed in range(150):
        decoder.model = NoiseModel(len(tokenizer), seed)
        out = decoder.decode(f"message {seed}")
        assert out.valid, out.answer
        record = json.loads(out.answer)
        jsonschema.validate(record, task.json_schema())
        assert len(record["note"]) <= 12 and (record["city"] is None or len(record["city"]) <= 8)
        assert abs(record["count"]) < 10**4
        for name, value in record.items():
            (seen_null if value is None else seen_value).add(name)
    # The adversary reached both null and non-null for every optional field.
    assert {"priority", "flag", "amount", "city"} <= seen_null
    assert set(task.field_names) <= seen_value


def test_untrained_tiny_model_only_emits_valid_records(tiny_model_dir: Path) -> None:
    from taskling.model.loader import load_model

    tokenizer = load_tokenizer(str(tiny_model_dir))
    task = ExtractionTask.model_validate({"json_schema": str(SCHEMA)})
    fmt = RecordFormat(tokenizer, task, 160)
    model = load_model(str(tiny_model_dir), torch.float32)
    decoder = ConstrainedDecoder(model, fmt)
    rng = random.Random(0)
    words = ["pay", "transfer", "40", "dollars", "to", "paris", "on", "friday", "weather"]
    words += ["timer", "$12.50", "book", "flight", "tomorrow"]
    for _ in range(25):
        out = decoder.decode(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
        assert out.valid and task.parse(out.answer) == out.record
        assert set(out.confidence) == set(task.field_names)
        assert all(0.0 < c <= 1.0 for c in out.confidence.values())


def test_record_metrics_on_known_values() -> None:
    task = ExtractionTask.model_validate(
        {
            "fields": [
                {"name": "intent", "type": "enum", "values": ["a", "b"]},
                {"name": "city", "type": "string", "required": False},
            ]
        }
    )
    gold = [{"intent": "a", "city": "New York"}, {"intent": "b", "city": None}, {"intent": "a", "city": "Paris"}]
    pred = [{"intent": "a", "city": "new york"}, {"intent": "a", "city": None}, None]
    m = score_records(gold, pred, task)
    assert m["n"] == 3 and m["invalid_output_rate"] == pytest.approx(1 / 3)
    assert m["fields"]["intent"]["accuracy"] == pytest.approx(1 / 3)
    assert m["fields"]["city"]["exact_match"] == pytest.approx(1 / 3)  # only the null row matches exactly
    assert m["fields"]["city"]["normalised_match"] == pytest.approx(2 / 3)
    assert m["fields"]["city"]["char_f1_non_null"] == pytest.approx(0.5)  # "new york" right, invalid row 0
    assert m["record_exact_match"] == 0.0
    # Both fields at 1/3: ties go to the first name, as for the worst category.
    assert m["worst_field"] == "city" and m["worst_category"] == "city"
    metrics = Metrics(**{k: m[k] for k in Metrics.__dataclass_fields__})
    assert metrics.per_category["city"]["accuracy"] == pytest.approx(1 / 3)

    assert char_f1("Paris", "paris") == 1.0 and char_f1("abc", "xyz") == 0.0
    assert char_f1("abcd", "ab") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * 1.0 * (5 / 6) / (1 + 5 / 6))
    texts = score_texts(["Hello world", "a b c"], ["hello world!", "x y z"])
    assert texts["exact_match"] == 0.0 and texts["normalised_match"] == 0.5 and texts["rouge_l"] == 0.5


def _config(tiny_model_dir: Path, run: Path) -> dict[str, Any]:
    return {
        "task": {"name": "clinc-extract", "json_schema": str(SCHEMA)},
        "data": {"train": [str(FIXTURES / "extract8_train.jsonl")], "validation_fraction": 0.2},
        "model": {"base": str(tiny_model_dir), "dtype": "float32", "max_length": 160},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "seed": 0, "threads": 1},
        "run_dir": str(run),
    }


@pytest.fixture(scope="module")
def extraction_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from taskling.train.extraction import train_extraction

    run = tmp_path_factory.mktemp("extract") / "run"
    result = train_extraction(build_extraction_config(_config(tiny_model_dir, run)))
    assert result.steps == 16 and result.train_rows == 128 and result.validation_rows == 32
    return run


def test_training_then_evaluation_writes_gate_ready_files(extraction_run: Path, tmp_path: Path) -> None:
    from taskling.evaluate.gate import gate, load_predictions
    from taskling.evaluate.report import build_report

    manifest = json.loads((extraction_run / "run.json").read_text())
    assert manifest["kind"] == "extraction" and manifest["data"]["train_rows"] == 128
    history = [json.loads(x) for x in (extraction_run / "history.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in history if "train_loss" in r]
    assert losses[-1] < losses[0]  # the adapter learns the record format

    result = evaluate_extraction(extraction_run, FIXTURES / "extract8_test.jsonl", out_dir=tmp_path / "eval")
    m = json.loads(result.metrics_path.read_text())
    assert m["n"] == 40 and m["invalid_output_rate"] == 0.0
    assert set(m["fields"]) == {"intent", "domain", "amount", "number", "day", "city"}
    rows = [json.loads(x) for x in result.predictions_path.read_text().splitlines()]
    assert len(rows) == 40 and all(r["valid"] for r in rows)
    # The scores, recomputed independently from predictions.jsonl (gold is the rendered record).
    gold = [json.loads(r["gold"]) for r in rows]
    assert m["record_exact_match"] == pytest.approx(sum(g == r["record"] for g, r in zip(gold, rows, strict=True)) / 40)
    exact = {f: sum(g[f] == r["record"][f] for g, r in zip(gold, rows, strict=True)) / 40 for f in m["fields"]}
    assert {f: m["fields"][f]["exact_match"] for f in exact} == pytest.approx(exact)
    # Every field type here scores accuracy as exact match; ties go to the first name.
    assert m["worst_field"] == min(exact, key=lambda f: (exact[f], f))
    assert m["worst_field_accuracy"] == pytest.approx(min(exact.values()))
    # Each enum field is a classification run directory in miniature: the gate and report take it.
    intent = load_predictions(tmp_path / "eval" / "fields" / "intent")
    assert len(intent.labels) == 8 and intent.gold == [_field_label(g["intent"]) for g in gold]
    assert intent.predicted == [_field_label(r["record"]["intent"]) for r in rows]
    perfect = dataclasses.replace(intent, name="perfect", predicted=list(intent.gold))
    wrong = [next(x for x in intent.labels if x != g) for g in intent.gold]
    hopeless = dataclasses.replace(intent, name="hopeless", predicted=wrong)
    misses = sum(p != g for p, g in zip(intent.predicted, intent.gold, strict=True))
    assert gate(intent, perfect).discordant == (misses, 0)
    assert gate(perfect, intent).passed  # a better candidate passes
    assert not gate(hopeless, perfect).passed  # wrong on every row: must fail
    assert "Per-category accuracy" in build_report(tmp_path / "eval" / "fields" / "day")


def _field_label(value: Any) -> str:
    return "null" if value is None else str(value)


def test_cli_extract_commands(extraction_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from taskling.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(extraction_run), "send 40 dollars to paris on friday"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert ExtractionTask.model_validate({"json_schema": str(SCHEMA)}).validate_record(record) == record

    result = runner.invoke(
        app,
        ["extract-eval", str(extraction_run), "--data", str(FIXTURES / "extract8_test.jsonl"), "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert "invalid outputs" in result.output and "0.00%" in result.output

    config = tmp_path / "bad.yaml"
    config.write_text(f"task:\n  json_schema: {SCHEMA}\n  colour: red\ndata:\n  train: [x.jsonl]\n")
    result = runner.invoke(app, ["extract-train", str(config)])
    assert result.exit_code == 2 and "task.colour: unknown key" in result.output


@pytest.mark.slow
def test_bundled_model_untrained_emits_valid_records() -> None:
    """The real tokenizer (49k tokens, byte-level BPE) with the decoder: every answer still validates."""
    from taskling.model.loader import load_model, resolve_base

    path = resolve_base("bundled:smollm2-135m")
    tokenizer = load_tokenizer(path)
    task = ExtractionTask.model_validate(ALL_TYPES)
    fmt = RecordFormat(tokenizer, task, 256)
    assert fmt.end_text == "<|im_end|>"
    row = json.loads((FIXTURES / "extract8_train.jsonl").read_text().splitlines()[0])
    schema_task = ExtractionTask.model_validate({"json_schema": str(SCHEMA)})
    schema_fmt = RecordFormat(tokenizer, schema_task, 256)
    assert tokenizer.decode(schema_fmt.answer_ids(row["record"])) == schema_task.render(row["record"]) + "<|im_end|>"
    decoder = ConstrainedDecoder(load_model(path, torch.float32), fmt)
    for text in ["send $40.50 to paris on friday", "set a timer for 10 minutes", "is it raining in tokyo"]:
        out = decoder.decode(text)
        assert out.valid and task.parse(out.answer) == out.record
