"""The generation task (`task.kind: generate`), its config, and its rows.

A `GenerationTask` says what the answer must look like (`output.format`):

- `text`: free text, at most `max_tokens` tokens;
- `regex`: text that fullmatches `output.pattern` (checked with the `regex` package, which
  also answers "can this still become a match?" for the decoder);
- `sql`: one read-only statement (`SELECT` or `WITH` first, no second statement), checked
  against `sql.database` (a SQLite file) when one is given.

`GenerationConfig` reuses the classification config's sections (`DataConfig`,
`ModelConfig`, `LoraSettings`, `TrainSettings`). Rows are instruction/response, Alpaca,
chat or flat teacher-log rows (`taskling.data.load` reads them: the label is the answer
text); an optional `slice` (or `category`) field of a JSONL row is kept for per-slice
metrics. A row whose answer fails the output format is a bad row (`on_bad_rows`), exact
duplicates are dropped and counted, and rows that copy a frozen gold row are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import regex
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taskling.config import (
    DataConfig,
    LoraSettings,
    ModelConfig,
    TrainSettings,
    merge,
    parse_overrides,
    resolve_paths,
    without_label_head,
)
from taskling.data.load import BadRow, Example, content_hash, load_file
from taskling.errors import ConfigError, DataError
from taskling.io import scan_jsonl, write_jsonl

GENERATE = "generate"
DEFAULT_GENERATE_INSTRUCTION = "Answer the user's message."
# A read-only SQL statement while it is being written: SELECT or WITH first, no `;` but a last one.
SQL_PREFIX = r"(?:SELECT|WITH)\s[^;]*;?"
SLICE_FIELDS = ("slice", "category")


class OutputSpec(BaseModel):
    """The answer's shape: free text, a regex it must fullmatch, or one read-only SQL statement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["text", "regex", "sql"] = "text"
    pattern: str | None = None
    max_tokens: int = Field(64, ge=1, le=4096)

    @model_validator(mode="after")
    def _check_pattern(self) -> OutputSpec:
        if self.format == "regex" and not self.pattern:
            raise ValueError("output.format is regex: give output.pattern, the regex every answer must fullmatch")
        if self.format != "regex" and self.pattern:
            raise ValueError(f"output.pattern only applies to output.format: regex (this is {self.format})")
        if self.pattern:
            compile_pattern(self.pattern)
        return self


class SqlSpec(BaseModel):
    """A SQLite database the SQL answers run on (read-only) for execution checks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    database: Path
    dialect: Literal["sqlite"] = "sqlite"


def compile_pattern(pattern: str, flags: int = 0) -> regex.Pattern[str]:
    """The compiled pattern; a ConfigError with the regex engine's message when it does not compile."""
    try:
        return regex.compile(pattern, flags)
    except regex.error as err:
        raise ConfigError(
            f"task.output.pattern {pattern!r} does not compile: {err}",
            fix="fix the regex (it is matched with the `regex` package, Python `re` syntax plus extras)",
        ) from None


class GenerationTask(BaseModel):
    """Text in, text out, in a fixed format: the contract a generation specialist keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["generate"] = "generate"
    name: str = "generate"
    instruction: str = DEFAULT_GENERATE_INSTRUCTION
    output: OutputSpec = Field(default_factory=OutputSpec)
    sql: SqlSpec | None = None
    # Few-shot prompting of a base model without an adapter: (text, answer) pairs as earlier turns.
    examples: tuple[tuple[str, str], ...] = ()

    @model_validator(mode="after")
    def _sql_needs_sql_format(self) -> GenerationTask:
        if self.sql is not None and self.output.format != "sql":
            raise ValueError("task.sql (a database for execution checks) needs task.output.format: sql")
        return self

    def messages(self, text: str, answer: str | None = None) -> list[dict[str, str]]:
        """The chat messages for `text` (few-shot turns first); with `answer`, the assistant turn too."""
        messages = [{"role": "system", "content": self.instruction}]
        for shot_text, shot_answer in self.examples:
            messages += [{"role": "user", "content": shot_text}, {"role": "assistant", "content": shot_answer}]
        messages.append({"role": "user", "content": text})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def with_examples(self, examples: Sequence[tuple[str, str]]) -> GenerationTask:
        return self.model_copy(update={"examples": tuple((t, a) for t, a in examples)})

    def pattern(self) -> regex.Pattern[str] | None:
        """The compiled constraint the decoder keeps: the regex, the SQL prefix rule, or None (free text)."""
        if self.output.format == "regex":
            return compile_pattern(str(self.output.pattern))
        if self.output.format == "sql":
            return compile_pattern(SQL_PREFIX, regex.IGNORECASE | regex.DOTALL)
        return None

    def format_problem(self, answer: str) -> str | None:
        """Why `answer` does not fit the output format, or None when it does (SQL: the statement shape only)."""
        if not answer.strip():
            return "the answer is empty"
        pattern = self.pattern()
        if pattern is not None and pattern.fullmatch(answer) is None:
            if self.output.format == "sql":
                return "not one read-only SQL statement (SELECT or WITH first, nothing after a `;`)"
            return f"does not fullmatch task.output.pattern {self.output.pattern!r}"
        return None


class GenerationConfig(BaseModel):
    """Everything a generation run needs; saved resolved as `RUN_DIR/config.yaml`."""

    model_config = ConfigDict(extra="forbid")

    task: GenerationTask
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    run_dir: Path = Path("runs/generate")

    @field_validator("model")
    @classmethod
    def _no_label_head(cls, model: ModelConfig) -> ModelConfig:
        return without_label_head(model, "generation")


# ---------------------------------------------------------------- config files


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (ConfigError when missing or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} is not valid UTF-8 YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (task, data, ...)")
    return raw


def config_kind(path: str | Path) -> str:
    """`task.kind` of a YAML config before validation ("classification" when absent)."""
    task = read_yaml(path).get("task")
    kind = task.get("kind") if isinstance(task, dict) else None
    return str(kind) if kind else "classification"


def build_generation_config(raw: dict[str, Any], *, source: str = "config") -> GenerationConfig:
    """Validate a generation config dict; errors name the offending key."""
    try:
        return GenerationConfig.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            problems.append(f"  {where}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(problems), fix="see docs/generate.md") from None


def load_generation_config(path: str | Path, overrides: list[str] | None = None) -> GenerationConfig:
    """Read a `task.kind: generate` YAML (paths relative to it), apply `key=value` overrides, validate.

    A missing `task.sql.database` is a ConfigError naming the file.
    """
    path = Path(path)
    root = path.parent.resolve()
    raw = resolve_paths(read_yaml(path), root)
    raw = merge(raw, resolve_paths(parse_overrides(overrides or []), Path.cwd()))
    task = raw.get("task")
    sql = task.get("sql") if isinstance(task, dict) else None
    if isinstance(task, dict) and isinstance(sql, dict) and sql.get("database"):
        database = Path(str(sql["database"])).expanduser()
        database = database if database.is_absolute() else root / database
        if not database.is_file():
            raise ConfigError(
                f"{path}: task.sql.database {database} does not exist",
                fix="point task.sql.database at the SQLite file the SQL answers run on (relative to the config)",
            )
        raw["task"] = {**task, "sql": {**sql, "database": str(database)}}
    return build_generation_config(raw, source=str(path))


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class GenExample:
    """One row: the input text, the reference answer, and its slice ("" when the row names none)."""

    text: str
    answer: str
    slice: str = ""
    source: str = ""
    line: int = 0

    def as_example(self) -> Example:
        return Example(self.text, self.answer, self.source, self.line)


@dataclass
class GenLoad:
    examples: list[GenExample] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    duplicates: int = 0
    rows_read: int = 0


def read_slices(path: Path) -> dict[int, str]:
    """Line -> slice for a JSONL file whose rows carry `slice` or `category` (other files: none)."""
    if path.suffix.lower() not in (".jsonl", ".ndjson") or not path.is_file():
        return {}
    slices = {}
    for parsed in scan_jsonl(path):
        if isinstance(parsed.value, dict):
            value = next((parsed.value[k] for k in SLICE_FIELDS if parsed.value.get(k) not in (None, "")), None)
            if value is not None:
                slices[parsed.line] = str(value)
    return slices


def load_generation_rows(
    paths: Sequence[str | Path], task: GenerationTask, data: DataConfig, *, gold: bool = False
) -> GenLoad:
    """Rows of `paths` whose answers fit the task's format; the others raise or are counted (`on_bad_rows`).

    `gold=True` is for reference sets: a row whose answer fails its own format always raises,
    whatever `on_bad_rows` says (a gold row nobody could match would skew every score).
    Exact duplicates (same text and answer) are dropped and counted.
    """
    out = GenLoad()
    seen: set[tuple[str, str]] = set()
    on_bad = "error" if gold else data.on_bad_rows
    for p in paths:
        path = Path(p)
        loaded = load_file(
            path,
            None,
            fmt=data.format,
            text_field=data.text_field,
            label_field=data.label_field,
            on_bad_rows=on_bad,
        )
        out.rows_read += loaded.rows_read
        out.bad_rows += loaded.bad_rows
        slices = read_slices(path)
        for ex in loaded.examples:
            problem = task.format_problem(ex.label)
            if problem is not None:
                if on_bad == "error":
                    what = "gold reference" if gold else "answer"
                    raise DataError(
                        f"the {what} {ex.label[:80]!r} fails the output format: {problem}",
                        path=path,
                        line=ex.line,
                        fix="fix the row, or the task's output spec"
                        + ("" if gold else "; or set data.on_bad_rows=skip to count and skip such rows"),
                    )
                out.bad_rows.append(BadRow(str(path), ex.line, "answer_fails_format", problem))
                continue
            if (ex.text, ex.label) in seen:
                out.duplicates += 1
                continue
            seen.add((ex.text, ex.label))
            out.examples.append(GenExample(ex.text, ex.label, slices.get(ex.line, ""), str(path), ex.line))
    return out


def write_generation_rows(path: str | Path, examples: Sequence[GenExample]) -> None:
    rows = ({"instruction": ex.text, "response": ex.answer, "slice": ex.slice} for ex in examples)
    write_jsonl(path, ({k: v for k, v in row.items() if v} for row in rows))


def generation_hash(examples: Sequence[GenExample]) -> str:
    """sha256 over (text, answer) pairs in order: identifies a gold or training set by content."""
    return content_hash(ex.as_example() for ex in examples)
