"""Task kinds beyond one label: multi-output label sets and extraction schemas.

An `ExtractionTask` is a fixed, ordered list of fields. Each field is an enum (one value of
a fixed set), a string, an integer, a number or a boolean, required or optional (optional
fields may be `null`). A multi-output task (`category` + `priority` + `sentiment`, each from
its own set) is an extraction task whose fields are all enums. A task is declared in YAML
as `fields:`, as `label_sets:` (multi-output shorthand), as `json_schema:` (a JSON Schema
file or mapping) or as `pydantic_model: module:Class`.

The assistant's answer is the record as one JSON object, keys in field order, rendered by
`json.dumps` with its default separators. Training and constrained decoding
(`taskling.extract.extractor`) build that text in one place: `render`.

Data files are JSONL rows `{"text": ..., "record": {...}}`; every row is checked against the
schema, and bad rows stop the load or are skipped and counted (`on_bad_rows`).
"""

from __future__ import annotations

import importlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taskling.config import (
    LoraSettings,
    ModelConfig,
    TrainSettings,
    loss_selected,
    merge,
    parse_overrides,
    resolve_paths,
    without_label_head,
)
from taskling.data.load import BadRow, is_unicode
from taskling.errors import ConfigError, DataError
from taskling.io import read_json, scan_jsonl, write_jsonl

FieldType = Literal["enum", "string", "integer", "number", "boolean"]
DEFAULT_EXTRACT_INSTRUCTION = "Extract the fields from the user's message. Answer with one JSON object."


class FieldSpec(BaseModel):
    """One output field: its name, type, allowed values (enums) and whether it may be null."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: FieldType = "enum"
    values: tuple[str, ...] = ()
    required: bool = True
    # Longest string (characters) the decoder may write for a string field.
    max_length: int = Field(48, ge=1)
    # Most digits the decoder may write for a number.
    max_digits: int = Field(12, ge=1)

    @model_validator(mode="after")
    def _check(self) -> FieldSpec:
        if self.type == "enum":
            if len(self.values) < 1:
                raise ValueError(f"field {self.name!r}: an enum field needs `values`")
            if len(set(self.values)) != len(self.values):
                raise ValueError(f"field {self.name!r}: enum values must be unique")
        elif self.values:
            raise ValueError(f"field {self.name!r}: `values` only applies to enum fields")
        return self

    def check(self, value: Any) -> Any:
        """`value` if it fits this field, else ValueError saying why."""
        if value is None:
            if self.required:
                raise ValueError(f"{self.name}: required, got null")
            return None
        if self.type == "enum" and value not in self.values:
            raise ValueError(f"{self.name}: {value!r} is not one of {', '.join(self.values[:8])}")
        if self.type == "string" and not isinstance(value, str):
            raise ValueError(f"{self.name}: expected a string, got {value!r}")
        if self.type == "boolean" and not isinstance(value, bool):
            raise ValueError(f"{self.name}: expected true or false, got {value!r}")
        if self.type == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{self.name}: expected an integer, got {value!r}")
        if self.type == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{self.name}: expected a number, got {value!r}")
        return value


def fields_from_json_schema(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Field specs from a JSON Schema object (also what pydantic's `model_json_schema` gives)."""
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        raise ConfigError("task.json_schema: expected an object schema with `properties`")
    required = set(schema.get("required", []))
    defs = schema.get("$defs", {})
    out = []
    for name, prop in props.items():
        options = prop.get("anyOf") or prop.get("oneOf") or [prop]
        options = [defs.get(o["$ref"].split("/")[-1], o) if "$ref" in o else o for o in options]
        nullable = any(o.get("type") == "null" for o in options)
        real = [o for o in options if o.get("type") != "null"]
        if len(real) != 1:
            raise ConfigError(f"task.json_schema: property {name!r} must have one non-null type")
        kind = real[0].get("type")
        if isinstance(kind, list):
            nullable = nullable or "null" in kind
            kind = next((k for k in kind if k != "null"), None)
        spec: dict[str, Any] = {"name": name, "required": name in required and not nullable}
        if "enum" in real[0] or "const" in real[0]:
            values = real[0].get("enum") or [real[0]["const"]]
            spec.update(type="enum", values=[str(v) for v in values if v is not None])
        elif kind in ("string", "integer", "number", "boolean"):
            spec["type"] = kind
            if kind == "string" and "maxLength" in real[0]:
                spec["max_length"] = int(real[0]["maxLength"])
        else:
            raise ConfigError(f"task.json_schema: property {name!r} has unsupported type {kind!r}")
        out.append(spec)
    return out


def _import_model(spec: str) -> type[BaseModel]:
    module, _, attr = spec.partition(":")
    try:
        model = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"task.pydantic_model: cannot import {spec!r} ({err})", fix="write it as module:Class"
        ) from None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigError(f"task.pydantic_model: {spec!r} is not a pydantic model")
    return model


class ExtractionTask(BaseModel):
    """A fixed set of fields to fill from each message; answers are one JSON object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["extraction", "multi_label_set"] = "extraction"
    name: str = "extraction"
    instruction: str = DEFAULT_EXTRACT_INSTRUCTION
    fields: tuple[FieldSpec, ...]

    @model_validator(mode="before")
    @classmethod
    def _from_other_forms(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = [k for k in ("fields", "label_sets", "json_schema", "pydantic_model") if k in data]
        if len(given) > 1:
            raise ConfigError(f"task: give one of fields, label_sets, json_schema, pydantic_model (got {given})")
        if "label_sets" in data:
            sets = data.pop("label_sets")
            data["fields"] = [{"name": k, "type": "enum", "values": v} for k, v in sets.items()]
            data.setdefault("kind", "multi_label_set")
        elif "json_schema" in data:
            schema = data.pop("json_schema")
            if not isinstance(schema, dict):
                path = Path(str(schema))
                if not path.is_file():
                    raise ConfigError(f"task.json_schema: {path} does not exist")
                schema = read_json(path)
            data["fields"] = fields_from_json_schema(schema)
        elif "pydantic_model" in data:
            data["fields"] = fields_from_json_schema(_import_model(data.pop("pydantic_model")).model_json_schema())
        return data

    @field_validator("fields")
    @classmethod
    def _unique(cls, fields: tuple[FieldSpec, ...]) -> tuple[FieldSpec, ...]:
        names = [f.name for f in fields]
        if not names:
            raise ValueError("an extraction task needs at least one field")
        if len(set(names)) != len(names):
            raise ValueError("field names must be unique")
        return fields

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def messages(self, text: str, answer: str | None = None) -> list[dict[str, str]]:
        """The chat messages for `text`; with `answer` (a rendered record), the assistant turn too."""
        messages = [{"role": "system", "content": self.instruction}, {"role": "user", "content": text}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def validate_record(self, record: Any) -> dict[str, Any]:
        """The record with exactly the task's fields, in order; ValueError naming what is wrong."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        extra = sorted(set(record) - set(self.field_names))
        if extra:
            raise ValueError(f"unknown fields: {', '.join(extra)}")
        out = {}
        for spec in self.fields:
            if spec.name not in record and spec.required:
                raise ValueError(f"{spec.name}: missing")
            out[spec.name] = spec.check(record.get(spec.name))
        return out

    def render(self, record: dict[str, Any]) -> str:
        """The answer text for a (valid) record: one JSON object, keys in field order."""
        return json.dumps({f.name: record.get(f.name) for f in self.fields}, ensure_ascii=False)

    def parse(self, answer: str) -> dict[str, Any]:
        """Parse and validate an answer text; ValueError when it does not fit the schema."""
        return self.validate_record(json.loads(answer))

    def json_schema(self) -> dict[str, Any]:
        """The task as a JSON Schema (field order kept)."""
        kinds = {"enum": "string", "string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}
        props: dict[str, Any] = {}
        for f in self.fields:
            prop: dict[str, Any] = {"type": kinds[f.type] if f.required else [kinds[f.type], "null"]}
            if f.type == "enum":
                prop["enum"] = [*f.values, *([] if f.required else [None])]
            props[f.name] = prop
        return {"type": "object", "properties": props, "required": self.field_names, "additionalProperties": False}


# ---------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordDataConfig(_Strict):
    train: list[Path]
    validation: list[Path] = Field(default_factory=list)
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    text_field: str = "text"
    record_field: str = "record"
    on_bad_rows: Literal["error", "skip"] = "error"


class ExtractionConfig(_Strict):
    """Everything an extraction (or multi-output) run needs; saved as `RUN_DIR/config.yaml`."""

    task: ExtractionTask
    data: RecordDataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    run_dir: Path = Path("runs/extract")

    @field_validator("train")
    @classmethod
    def _select_by_loss(cls, train: TrainSettings) -> TrainSettings:
        return loss_selected(train)

    @field_validator("model")
    @classmethod
    def _no_label_head(cls, model: ModelConfig) -> ModelConfig:
        return without_label_head(model, "extraction")


def build_extraction_config(raw: dict[str, Any], *, source: str = "config") -> ExtractionConfig:
    try:
        return ExtractionConfig.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            problems.append(f"  {where}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(problems), fix="see docs/extraction.md") from None


def load_extraction_config(path: str | Path, overrides: list[str] | None = None) -> ExtractionConfig:
    """Read an extraction YAML config (paths relative to it), apply `key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (task, data, ...)")
    root = path.parent.resolve()
    raw = resolve_paths(raw, root)
    task = raw.get("task")
    if isinstance(task, dict) and isinstance(task.get("json_schema"), str):
        schema = Path(task["json_schema"]).expanduser()
        raw["task"] = {**task, "json_schema": str(schema if schema.is_absolute() else root / schema)}
    extra = resolve_paths(parse_overrides(overrides or []), Path.cwd())
    return build_extraction_config(merge(raw, extra), source=str(path))


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class RecordExample:
    text: str
    record: dict[str, Any]
    source: str = ""
    line: int = 0


@dataclass
class RecordLoad:
    examples: list[RecordExample] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    rows_read: int = 0


def load_records(
    paths: list[Path] | list[str],
    task: ExtractionTask,
    *,
    text_field: str = "text",
    record_field: str = "record",
    on_bad_rows: str = "error",
) -> RecordLoad:
    """Rows `{"text": ..., "record": {...}}` checked against the task; bad rows raise or are counted."""
    out = RecordLoad()
    fix = (
        f'each line must be {{"{text_field}": ..., "{record_field}": {{...}}}} fitting the task fields, '
        "or set data.on_bad_rows=skip"
    )
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"{path} does not exist", path=path)
        for parsed in scan_jsonl(path):
            out.rows_read += 1
            try:
                text, record = _record_row(parsed.value, parsed.reason, parsed.detail, task, text_field, record_field)
            except _BadRecord as bad:
                if on_bad_rows == "error":
                    raise DataError(f"{bad.reason}: {bad.detail}", path=path, line=parsed.line, fix=fix) from None
                out.bad_rows.append(BadRow(str(path), parsed.line, bad.reason, bad.detail))
                continue
            out.examples.append(RecordExample(text, record, str(path), parsed.line))
    return out


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _record_row(
    row: Any, error: str, detail: str, task: ExtractionTask, text_field: str, record_field: str
) -> tuple[str, dict[str, Any]]:
    if error:
        raise _BadRecord("not UTF-8" if error == "not_utf8" else "bad json", detail)
    if not isinstance(row, dict):
        raise _BadRecord("bad json", f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in (text_field, record_field) if k not in row]
    if missing:
        raise _BadRecord("missing field", f"missing {missing}")
    text = row[text_field]
    if not isinstance(text, str) or not text.strip():
        raise _BadRecord("record does not fit the schema", f"`{text_field}` must be a non-empty string")
    if not is_unicode(json.dumps(row, ensure_ascii=False)):
        raise _BadRecord("not valid Unicode", "an unpaired surrogate escape (\\ud800-\\udfff)")
    try:
        return text, task.validate_record(row[record_field])
    except (ValueError, TypeError) as err:
        raise _BadRecord("record does not fit the schema", str(err)) from None


def split_records(
    examples: list[RecordExample], fraction: float, seed: int
) -> tuple[list[RecordExample], list[RecordExample]]:
    """Seeded random hold-out of `fraction` of the rows."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * fraction) if len(examples) > 1 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


def write_records(path: str | Path, examples: list[RecordExample]) -> None:
    write_jsonl(path, ({"text": ex.text, "record": ex.record} for ex in examples))


def records_hash(examples: list[RecordExample]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.text, ex.record], ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
    return digest.hexdigest()
