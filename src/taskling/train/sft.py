"""LoRA fine-tuning of a classifier: `train(config)`.

In order: load and check the data (every bad row counted), hold out a validation split,
tokenize with the model's chat template (loss on answer tokens only), make sure the run
folder holds this run or nothing (`resume.py`), write the run's config, data, tokenizer and
manifest, then run the shared loop (`loop.py`): AdamW with a schedule, validation loss every
epoch (or every N steps), the best adapter kept, early stopping, resumable checkpoints.
The files it writes are named by `taskling.rundir.RunDir`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from taskling.config import ProjectConfig, dump_config
from taskling.data.load import (
    Example,
    LoadResult,
    bad_rows_report,
    content_hash,
    label_counts,
    load_files,
    stratified_split,
    write_examples,
)
from taskling.errors import DataError
from taskling.io import write_json, write_jsonl, write_text
from taskling.model.head import attach_head, head_training_row
from taskling.model.loader import ChatFormat, load_tokenizer, resolve_base
from taskling.model.presets import apply_preset
from taskling.rundir import RunDir
from taskling.train.checkpoint import has_checkpoint
from taskling.train.defaults import resolve_defaults
from taskling.train.loop import (
    ProgressFn,
    TrainingInterrupted,
    TrainResult,
    build_loop,
    iter_history,
    lora_model,
    new_accelerator,
    set_seed,
    start_state,
    train_loop,
)
from taskling.train.loss import answer_logits, answer_loss, batches, collate, head_logits, validation_loss
from taskling.train.objective import Objective
from taskling.train.resume import check_resumable, clear_run, holds_a_run
from taskling.train.speed import Levers, load_training_base
from taskling.version import __version__

__all__ = [
    "PreparedData",
    "ProgressFn",
    "TrainResult",
    "TrainingInterrupted",
    "answer_logits",
    "answer_loss",
    "batches",
    "collate",
    "head_logits",
    "iter_history",
    "prepare_data",
    "run_manifest",
    "tokenize",
    "train",
    "validation_loss",
]

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    loaded: LoadResult

    def hashes(self) -> dict[str, str]:
        """Content hashes of the train and validation rows, as run.json records them."""
        return {"train_hash": content_hash(self.train), "validation_hash": content_hash(self.validation)}


def prepare_data(config: ProjectConfig) -> PreparedData:
    """Load train (and validation) files, checking every row against the task."""
    opts: dict[str, Any] = {
        "fmt": config.data.format,
        "text_field": config.data.text_field,
        "label_field": config.data.label_field,
        "on_bad_rows": config.data.on_bad_rows,
    }
    loaded = load_files(config.data.train, config.task, **opts)
    if config.data.validation:
        val = load_files(config.data.validation, config.task, **opts)
        train, validation = loaded.examples, val.examples
        loaded.extend(LoadResult(bad_rows=val.bad_rows, rows_read=val.rows_read))
    else:
        train, validation = stratified_split(loaded.examples, config.data.validation_fraction, config.train.seed)
    if not train:
        raise DataError(
            "no usable training rows", path=config.data.train[0], fix="check the data format and the label set"
        )
    missing = [label for label in config.task.labels if label not in label_counts(train)]
    if missing:
        log.warning("labels with no training rows: %s", ", ".join(missing))
    if config.data.gold_manifest is not None:
        from taskling.data.split import assert_no_leakage

        assert_no_leakage({"train": train, "validation": validation}, config.data.gold_manifest)
    return PreparedData(train, validation, loaded)


def tokenize(examples: Sequence[Example], fmt: ChatFormat, head: str = "labels") -> list[tuple[list[int], list[int]]]:
    """Training rows: prompt and answer tokens, or (`model.head: linear`) the prompt and the label's index."""
    if head == "linear":
        return [head_training_row(fmt, ex.text, ex.label) for ex in examples]
    return [fmt.training_ids(ex.text, ex.label) for ex in examples]


def run_manifest(config: ProjectConfig, base_path: str, fmt: ChatFormat, data: PreparedData) -> dict[str, Any]:
    """run.json: what a classifier needs to load the run, and what the run was trained on."""
    import peft
    import transformers

    return {
        "taskling_version": __version__,
        "task": config.task.model_dump(mode="json"),
        "base_model": config.model.base,
        "base_model_path": base_path,
        "chat_template": fmt.tokenizer.chat_template,
        "max_length": config.model.max_length,
        "head": config.model.head,
        "label_answers": {label: fmt.answer_text(label) for label in config.task.labels},
        "data": {
            **data.hashes(),
            "train_rows": len(data.train),
            "validation_rows": len(data.validation),
            "rows_read": data.loaded.rows_read,
            "skipped_rows": len(data.loaded.bad_rows),
            "skipped_by_reason": data.loaded.skipped_by_reason,
            "train_label_counts": label_counts(data.train),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


def claim_run_dir(run: RunDir, config: ProjectConfig, data: PreparedData, *, resume: bool, main: bool) -> bool:
    """Make the folder this run's; True when there is a checkpoint of it to resume.

    With `resume`, a folder holding a different run (config or data) is refused. Starting at
    step 0, every file of the old run is removed first.
    """
    if resume and holds_a_run(run.root):
        check_resumable(run.root, config.model_dump(mode="json"), data.hashes())
    resuming = resume and has_checkpoint(run.root)
    if main and not resuming:
        clear_run(run.root)
    return resuming


def write_run_files(
    run: RunDir, config: ProjectConfig, data: PreparedData, manifest: dict[str, Any], tokenizer: Any
) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    write_examples(run.train_data, data.train)
    write_examples(run.validation_data, data.validation)
    write_jsonl(run.bad_rows, bad_rows_report(data.loaded.bad_rows))
    write_text(run.config, dump_config(config))
    write_json(run.manifest, manifest)
    tokenizer.save_pretrained(run.tokenizer)


def train(
    config: ProjectConfig,
    *,
    resume: bool = True,
    progress: ProgressFn | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train a LoRA adapter as `config` says; returns where the run is and how it went.

    With `resume=True` a run directory holding a checkpoint of the same run (same resolved
    config, same data) continues from it, and one holding a different run is a RunError.
    `resume=False` removes the old run's files and starts over. `stop_after_steps`
    checkpoints and returns after that many optimizer steps, as an interrupted run would
    leave things (`TrainResult.interrupted` is then True). Ctrl-C or SIGTERM checkpoints the
    current step and raises `TrainingInterrupted`.
    """
    config = apply_preset(config)  # model.base names a preset: its settings fill what config leaves unset
    settings, run = config.train, RunDir(config.run_dir)
    accelerator = new_accelerator()
    main = accelerator.is_main_process
    if settings.threads:
        torch.set_num_threads(settings.threads)
    set_seed(settings.seed)

    data = prepare_data(config)
    settings, auto = resolve_defaults(settings, len(data.train), len(config.task.labels))
    config = config.model_copy(update={"train": settings})  # config.yaml records the resolved values
    resuming = claim_run_dir(run, config, data, resume=resume, main=main)
    base_path = resolve_base(config.model.base, config.model.gguf_file, config.model.chat_template)
    tokenizer = load_tokenizer(base_path, config.model.chat_template)
    fmt = ChatFormat(tokenizer, config.task, config.model.max_length)
    fmt.label_sequences  # noqa: B018 -- fail early if two labels tokenize alike
    if main:
        manifest = {**run_manifest(config, base_path, fmt, data), "train_defaults_by_size": auto}
        write_run_files(run, config, data, manifest, tokenizer)
    accelerator.wait_for_everyone()

    train_rows, val_rows = (
        tokenize(data.train, fmt, config.model.head),
        tokenize(data.validation, fmt, config.model.head),
    )
    levers = Levers.resolve(settings, config.model, world=accelerator.num_processes)
    base = load_training_base(config.model, base_path, accelerator.device, train_rows + val_rows, levers)
    if config.model.head == "linear":
        attach_head(base, len(config.task.labels), [seq[0] for seq in fmt.label_sequences])
    model = lora_model(base, config.lora)
    pad_id = tokenizer.pad_token_id
    kind = "head" if config.model.head == "linear" else settings.objective
    objective = Objective.for_labels(kind, fmt.label_sequences, label_weight=settings.label_loss_weight)
    loop = build_loop(
        settings, model, run.root, train_rows, val_rows, pad_id, accelerator, levers=levers, objective=objective
    )
    state = start_state(loop, resume=resuming)
    return train_loop(
        loop, state, skipped_rows=len(data.loaded.bad_rows), progress=progress, stop_after_steps=stop_after_steps
    )
