"""LoRA fine-tuning for extraction and multi-output tasks: `train_extraction(config)`.

The loop is SFT's (`loop.py`): the same length-bucketed batches, answer-only loss computed
on the answer positions only, validation loss, best-adapter saving and early stopping. Only
the answer differs: the record rendered as JSON and tokenized segment by segment
(`extract.RecordFormat.answer_ids`), exactly as the constrained decoder emits it. Unlike
`train`, it keeps no resumable checkpoint and always starts over in its folder.

The run folder is a sibling of a classification run's (`taskling.rundir.RunDir`): config,
data (rows as {"text", "record"}), tokenizer, adapter, history and a manifest whose kind is
"extraction" and which records the task's fields and JSON schema.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import yaml

from taskling.data.load import bad_rows_report
from taskling.errors import DataError
from taskling.extract.extractor import RecordFormat
from taskling.extract.schema import (
    ExtractionConfig,
    RecordExample,
    load_records,
    records_hash,
    split_records,
    write_records,
)
from taskling.io import write_json, write_jsonl, write_text
from taskling.model.loader import load_tokenizer, resolve_base
from taskling.rundir import EXTRACTION, RunDir
from taskling.train.checkpoint import TrainState
from taskling.train.defaults import text_answer_settings
from taskling.train.loop import (
    ProgressFn,
    TrainResult,
    build_loop,
    lora_model,
    new_accelerator,
    set_seed,
    train_loop,
)
from taskling.train.resume import clear_run
from taskling.train.speed import Levers, load_training_base
from taskling.version import __version__

log = logging.getLogger(__name__)


def prepare_records(config: ExtractionConfig) -> tuple[list[RecordExample], list[RecordExample], Any]:
    opts: dict[str, Any] = {
        "text_field": config.data.text_field,
        "record_field": config.data.record_field,
        "on_bad_rows": config.data.on_bad_rows,
    }
    loaded = load_records(config.data.train, config.task, **opts)
    if config.data.validation:
        val = load_records(config.data.validation, config.task, **opts)
        train, validation = loaded.examples, val.examples
        loaded.bad_rows += val.bad_rows
        loaded.rows_read += val.rows_read
    else:
        train, validation = split_records(loaded.examples, config.data.validation_fraction, config.train.seed)
    if not train:
        raise DataError("no usable training rows", path=config.data.train[0], fix="check the rows against the fields")
    return train, validation, loaded


def train_extraction(config: ExtractionConfig, *, progress: ProgressFn | None = None) -> TrainResult:
    """Train a LoRA adapter that writes the task's records; returns where the run is and how it went.

    Always starts over: the old run's files in `run_dir` are removed first. Ctrl-C or
    SIGTERM stops after the current step and raises `TrainingInterrupted`.
    """
    settings, run = config.train, RunDir(config.run_dir)
    accelerator = new_accelerator()
    main = accelerator.is_main_process
    if settings.threads:
        torch.set_num_threads(settings.threads)
    set_seed(settings.seed)

    train_ex, val_ex, loaded = prepare_records(config)
    settings = text_answer_settings(settings, len(train_ex), "extraction")
    config = config.model_copy(update={"train": settings})  # config.yaml records the resolved values
    base_path = resolve_base(config.model.base, config.model.gguf_file, config.model.chat_template)
    tokenizer = load_tokenizer(base_path, config.model.chat_template)
    fmt = RecordFormat(tokenizer, config.task, config.model.max_length)
    if main:
        clear_run(run.root)
        write_records(run.train_data, train_ex)
        write_records(run.validation_data, val_ex)
        write_jsonl(run.bad_rows, bad_rows_report(loaded.bad_rows))
        write_text(run.config, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        tokenizer.save_pretrained(run.tokenizer)
        write_json(run.manifest, run_manifest(config, base_path, fmt, train_ex, val_ex, loaded))
    accelerator.wait_for_everyone()

    train_rows = [fmt.training_ids(ex.text, ex.record) for ex in train_ex]
    val_rows = [fmt.training_ids(ex.text, ex.record) for ex in val_ex]
    levers = Levers.resolve(settings, config.model, world=accelerator.num_processes)
    base = load_training_base(config.model, base_path, accelerator.device, train_rows + val_rows, levers)
    model = lora_model(base, config.lora)
    pad_id = tokenizer.pad_token_id
    loop = build_loop(
        settings, model, run.root, train_rows, val_rows, pad_id, accelerator, checkpoints=False, levers=levers
    )
    return train_loop(loop, TrainState(), skipped_rows=len(loaded.bad_rows), progress=progress)


def run_manifest(
    config: ExtractionConfig,
    base_path: str,
    fmt: RecordFormat,
    train: list[RecordExample],
    validation: list[RecordExample],
    loaded: Any,
) -> dict[str, Any]:
    """run.json of an extraction run: kind, fields, JSON schema, base model, data hashes, versions."""
    import peft
    import transformers

    return {
        "kind": EXTRACTION,
        "taskling_version": __version__,
        "task": config.task.model_dump(mode="json"),
        "json_schema": config.task.json_schema(),
        "base_model": config.model.base,
        "base_model_path": base_path,
        "chat_template": fmt.tokenizer.chat_template,
        "max_length": config.model.max_length,
        "answer_end": fmt.end_text,
        "data": {
            "train_hash": records_hash(train),
            "validation_hash": records_hash(validation),
            "train_rows": len(train),
            "validation_rows": len(validation),
            "rows_read": loaded.rows_read,
            "skipped_rows": len(loaded.bad_rows),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
