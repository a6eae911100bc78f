"""LoRA fine-tuning for generation tasks (`task.kind: generate`): `train_generation(config)`.

The loop is SFT's (`loop.py`): length-bucketed batches, the loss on the answer tokens only
(the prompt is masked), validation loss at every evaluation, the best adapter kept by
validation loss, early stopping. The answer is the reference text's plain tokens and the
chat template's end-of-turn marker (`generate.decode.GenerationFormat`), which is where the
constrained decoder stops. Like extraction it always starts over in its folder.

Rows are cleaned before training: answers that fail the output format are bad rows
(`data.on_bad_rows`), exact duplicates are dropped and counted, and with
`data.gold_manifest` any row that copies a frozen gold row (exactly or as a near-duplicate)
stops the run. The manifest's kind is "generation" and it records the task (output format,
pattern, database) so `Generator.from_run` rebuilds the same prompts and constraint.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
import yaml

from taskling.data.load import Example, bad_rows_report
from taskling.data.split import assert_no_leakage
from taskling.errors import ConfigError, DataError
from taskling.generate.decode import GenerationFormat
from taskling.generate.spec import (
    GenerationConfig,
    GenExample,
    GenLoad,
    generation_hash,
    load_generation_rows,
    write_generation_rows,
)
from taskling.io import write_json, write_jsonl, write_text
from taskling.model.loader import load_tokenizer, resolve_base
from taskling.rundir import GENERATION, RunDir
from taskling.train.checkpoint import TrainState
from taskling.train.defaults import text_answer_settings
from taskling.train.loop import ProgressFn, TrainResult, build_loop, lora_model, new_accelerator, set_seed, train_loop
from taskling.train.resume import clear_run
from taskling.train.select import MetricSelector
from taskling.train.speed import Levers, load_training_base
from taskling.version import __version__

log = logging.getLogger(__name__)


def split_rows(examples: list[GenExample], fraction: float, seed: int) -> tuple[list[GenExample], list[GenExample]]:
    """Seeded random hold-out of `fraction` of the rows (none when there is one row)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * fraction) if len(examples) > 1 else 0
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]


def prepare_rows(config: GenerationConfig) -> tuple[list[GenExample], list[GenExample], GenLoad]:
    """Training and validation rows, cleaned and checked against the frozen gold set."""
    data = config.data
    loaded = load_generation_rows(data.train, config.task, data)
    if data.validation:
        val = load_generation_rows(data.validation, config.task, data)
        train, validation = loaded.examples, val.examples
        loaded.bad_rows += val.bad_rows
        loaded.rows_read += val.rows_read
        loaded.duplicates += val.duplicates
    else:
        train, validation = split_rows(loaded.examples, data.validation_fraction, config.train.seed)
    if not train:
        raise DataError(
            "no usable training rows", path=data.train[0], fix="check the rows against task.output (see bad rows)"
        )
    if data.gold_manifest is not None:
        splits: dict[str, Sequence[Example]] = {
            "train": [ex.as_example() for ex in train],
            "validation": [ex.as_example() for ex in validation],
        }
        assert_no_leakage(splits, data.gold_manifest)
    if loaded.duplicates:
        log.info("dropped %d exact duplicate rows", loaded.duplicates)
    return train, validation, loaded


def train_generation(config: GenerationConfig, *, progress: ProgressFn | None = None) -> TrainResult:
    """Train a LoRA adapter that writes the task's answers; returns where the run is and how it went.

    Always starts over: the old run's files in `run_dir` are removed first.
    """
    settings, run = config.train, RunDir(config.run_dir)
    accelerator = new_accelerator()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    set_seed(settings.seed)

    train_ex, val_ex, loaded = prepare_rows(config)
    settings = text_answer_settings(settings, len(train_ex), "generation")
    config = config.model_copy(update={"train": settings})  # config.yaml records the resolved values
    base_path = resolve_base(config.model.base, config.model.gguf_file, config.model.chat_template)
    tokenizer = load_tokenizer(base_path, config.model.chat_template)
    fmt = GenerationFormat(tokenizer, config.task, config.model.max_length)
    if accelerator.is_main_process:
        clear_run(run.root)
        write_generation_rows(run.train_data, train_ex)
        write_generation_rows(run.validation_data, val_ex)
        write_jsonl(run.bad_rows, bad_rows_report(loaded.bad_rows))
        write_text(run.config, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        tokenizer.save_pretrained(run.tokenizer)
        write_json(run.manifest, run_manifest(config, base_path, fmt, train_ex, val_ex, loaded))
    accelerator.wait_for_everyone()

    train_rows = [fmt.training_ids(ex.text, ex.answer) for ex in train_ex]
    val_rows = [fmt.training_ids(ex.text, ex.answer) for ex in val_ex]
    levers = Levers.resolve(settings, config.model, world=accelerator.num_processes)
    base = load_training_base(config.model, base_path, accelerator.device, train_rows + val_rows, levers)
    model = lora_model(base, config.lora)
    loop = build_loop(
        settings, model, run.root, train_rows, val_rows, tokenizer.pad_token_id, accelerator, checkpoints=False,
        levers=levers,
    )  # fmt: skip
    if settings.select_by == "metric":
        if not val_ex:
            raise ConfigError(
                "train.select_by: metric scores generated validation rows, and this run has none",
                fix="set data.validation_fraction above 0 (or data.validation), or train.select_by: val_loss",
            )
        loop.select = MetricSelector(fmt, val_ex[: settings.metric_rows], accelerator.device, settings.min_delta)
    skipped = len(loaded.bad_rows) + loaded.duplicates
    return train_loop(loop, TrainState(), skipped_rows=skipped, progress=progress)


def run_manifest(
    config: GenerationConfig,
    base_path: str,
    fmt: GenerationFormat,
    train: list[GenExample],
    validation: list[GenExample],
    loaded: GenLoad,
) -> dict[str, Any]:
    """run.json of a generation run: kind, task (output format), base model, data hashes, versions."""
    import peft
    import transformers

    return {
        "kind": GENERATION,
        "taskling_version": __version__,
        "task": config.task.model_dump(mode="json"),
        "base_model": config.model.base,
        "base_model_path": base_path,
        "chat_template": fmt.tokenizer.chat_template,
        "max_length": config.model.max_length,
        "answer_end": fmt.end_text,
        "data": {
            "train_hash": generation_hash(train),
            "validation_hash": generation_hash(validation),
            "train_rows": len(train),
            "validation_rows": len(validation),
            "rows_read": loaded.rows_read,
            "skipped_rows": len(loaded.bad_rows),
            "duplicates_dropped": loaded.duplicates,
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
