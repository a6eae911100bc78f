"""Answers from a generation run, or from the base model alone: `Generator`.

`Generator.from_run(run_dir)` loads a trained generation run (base model + merged LoRA);
`generate_base(config)` wraps the untrained base model, and `generate_base(config,
examples=[(text, answer), ...])` the few-shot prompt baseline (the examples as earlier
turns). All three decode the same way (`decode.decode_batch`): greedy, batched, held to
the output format. Each `Generation` says whether its output is valid: it fits the format,
was not cut by `max_tokens`, and (SQL with a database) the statement runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from taskling.generate.decode import GenerationFormat, decode_batch, token_texts
from taskling.generate.spec import GenerationConfig, GenerationTask
from taskling.rundir import GENERATION, RunDir, adapter_version, read_manifest

log = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    output: str
    valid: bool
    n_tokens: int
    ms: float
    problem: str = ""  # why it is invalid ("" when valid): cut by max_tokens, fails the format, does not run
    cut: bool = False  # max_tokens reached before the end-of-turn token


class Generator:
    """A model that answers a generation task: `generate(texts)` returns one `Generation` per text."""

    def __init__(
        self,
        model: Any,
        fmt: GenerationFormat,
        device: str = "cpu",
        version: str = "unversioned",
        *,
        constrained: bool = True,
    ) -> None:
        model.eval()
        self.model = model
        self.fmt = fmt
        self.task = fmt.task
        self.device = device
        self.version = version
        self.constrained = constrained

    @cached_property
    def token_table(self) -> list[str | None]:
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        return token_texts(self.fmt.tokenizer, vocab)

    @cached_property
    def database(self) -> Any:
        """The task's SQLite database (read-only), or None."""
        if self.task.sql is None:
            return None
        from taskling.generate.sql import SqlDatabase

        return SqlDatabase(self.task.sql.database)

    def check(self, output: str, cut: bool, max_tokens: int | None = None) -> str:
        """Why `output` is not a valid answer ("" when it is)."""
        if cut:
            return f"cut at max_tokens={max_tokens or self.task.output.max_tokens} before the answer ended"
        problem = self.task.format_problem(output)
        if problem is not None:
            return problem
        if self.database is not None and not self.database.valid(output):
            return f"does not run on {self.task.sql.database if self.task.sql else 'the database'}"
        return ""

    def generate(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
        max_tokens: int | None = None,
    ) -> list[Generation]:
        """One answer per text, in order; `progress(done, total)` after each batch.

        `max_tokens` lowers the answer budget for these texts (at most the task's `output.max_tokens`).
        """
        out: list[Generation] = []
        table = self.token_table if self.constrained and self.task.pattern() is not None else None
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            decoded = decode_batch(
                self.model,
                self.fmt,
                chunk,
                constrained=self.constrained,
                texts_table=table,
                device=self.device,
                max_tokens=max_tokens,
            )
            for text, d in zip(chunk, decoded, strict=True):
                problem = self.check(d.output, d.cut, max_tokens)
                out.append(Generation(text, d.output, not problem, d.n_tokens, d.ms, problem, d.cut))
            if progress is not None:
                progress(len(out), len(texts))
        return out

    def __call__(self, text: str) -> Generation:
        return self.generate([text])[0]

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str | None = None, dtype: str = "auto") -> Generator:
        """A trained generation run (a RunError for any other kind of run)."""
        from peft import PeftModel

        from taskling.model.loader import base_path, default_device, load_model, load_tokenizer, pick_dtype

        manifest = read_manifest(run_dir, kind=GENERATION)
        device = device or default_device()
        base = load_model(base_path(manifest), pick_dtype(dtype), device)
        model = PeftModel.from_pretrained(base, str(RunDir(run_dir).adapter)).merge_and_unload()
        tokenizer = load_tokenizer(str(RunDir(run_dir).tokenizer), manifest.get("chat_template"))
        task = GenerationTask.model_validate(manifest["task"])
        fmt = GenerationFormat(tokenizer, task, int(manifest["max_length"]))
        return cls(model, fmt, device, adapter_version(run_dir))


def generate_base(
    config: GenerationConfig,
    examples: Sequence[tuple[str, str]] = (),
    *,
    device: str | None = None,
    constrained: bool = True,
) -> Generator:
    """The base model without an adapter: zero-shot, or few-shot with `examples` as earlier turns."""
    from taskling.model.loader import default_device, load_model, load_tokenizer, pick_dtype, resolve_base

    device = device or default_device()
    path = resolve_base(config.model.base, config.model.gguf_file, config.model.chat_template)
    tokenizer = load_tokenizer(path, config.model.chat_template)
    task = config.task.with_examples(examples) if examples else config.task
    # Few-shot turns make the prompt longer: give it the room (the answer budget stays the same).
    extra = sum(len(tokenizer(t + a)["input_ids"]) + 16 for t, a in examples)
    fmt = GenerationFormat(tokenizer, task, config.model.max_length + extra)
    model = load_model(path, pick_dtype(config.model.dtype), device)
    name = "few-shot" if examples else "base"
    return Generator(model, fmt, device, f"{name}:{config.model.base}", constrained=constrained)
