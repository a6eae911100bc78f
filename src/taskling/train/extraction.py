"""LoRA fine-tuning for extraction and multi-output tasks, on `taskling.train.sft`'s building blocks.

The loop is `train.train`'s, minus resumable checkpoints: the same length-bucketed batches
(`batches`), padding (`collate`), answer-only loss computed on the answer positions only
(`answer_loss`), validation loss (`validation_loss`) and best-adapter saving. Only the
answer differs: the record rendered as JSON and tokenized segment by segment
(`extract.RecordFormat.answer_ids`), exactly as the constrained decoder emits it.

Run directory layout (a superset-compatible sibling of a classification run):

    RUN_DIR/config.yaml              the resolved extraction config
    RUN_DIR/data/train.jsonl         rows trained on, {"text", "record"} (+ validation.jsonl, bad_rows.jsonl)
    RUN_DIR/adapter/                 the best LoRA adapter
    RUN_DIR/tokenizer/               the tokenizer, with the chat template used
    RUN_DIR/history.jsonl            train loss per step, validation loss per evaluation
    RUN_DIR/run.json                 manifest: kind "extraction", task (fields), base model, data hashes, versions
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
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
from taskling.io import write_jsonl, write_text
from taskling.model.loader import default_device, load_model, load_tokenizer, pick_dtype, resolve_base
from taskling.train.sft import ProgressFn, TrainResult, _save_adapter, _set_seed, answer_loss, batches, collate
from taskling.train.sft import validation_loss as _validation_loss
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
    """Train a LoRA adapter that writes the task's records; returns where the run is and how it went."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    settings = config.train
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    _set_seed(settings.seed)

    train_rows_ex, val_ex, loaded = prepare_records(config)
    write_records(run_dir / "data" / "train.jsonl", train_rows_ex)
    write_records(run_dir / "data" / "validation.jsonl", val_ex)
    write_jsonl(run_dir / "data" / "bad_rows.jsonl", bad_rows_report(loaded.bad_rows))
    write_text(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

    device = default_device()
    base_path = resolve_base(config.model.base, config.model.gguf_file, config.model.chat_template)
    tokenizer = load_tokenizer(base_path, config.model.chat_template)
    fmt = RecordFormat(tokenizer, config.task, config.model.max_length)
    train_rows = [fmt.training_ids(ex.text, ex.record) for ex in train_rows_ex]
    val_rows = [fmt.training_ids(ex.text, ex.record) for ex in val_ex]
    tokenizer.save_pretrained(run_dir / "tokenizer")
    write_text(
        run_dir / "run.json", json.dumps(_manifest(config, base_path, fmt, train_rows_ex, val_ex, loaded), indent=2)
    )

    model = get_peft_model(
        load_model(base_path, pick_dtype(config.model.dtype), device),
        LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    base_model = model.get_base_model()
    micro_per_epoch = math.ceil(len(train_rows) / settings.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / settings.gradient_accumulation)
    total_steps = settings.max_steps or max(1, math.ceil(steps_per_epoch * settings.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(
        settings.schedule, optimizer, int(settings.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    eval_every = settings.eval_every or steps_per_epoch
    pad_id = tokenizer.pad_token_id
    best: float | None = None
    best_step, bad_evals, step, pending, running, tokens = 0, 0, 0, 0, 0.0, 0
    stopped_early = False
    started = time.perf_counter()
    with (run_dir / "history.jsonl").open("w") as history:
        epoch = 0
        while step < total_steps and not stopped_early:
            for idx in batches(train_rows, settings.batch_size, settings.seed, epoch):
                batch = collate([train_rows[i] for i in idx], pad_id, device)
                loss, _ = answer_loss(base_model, batch)
                (loss / settings.gradient_accumulation).backward()
                running += loss.item() / settings.gradient_accumulation
                tokens += int(batch["attention_mask"].sum())
                pending += 1
                if pending < settings.gradient_accumulation:
                    continue
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, pending = step + 1, 0
                history.write(json.dumps({"step": step, "epoch": epoch, "train_loss": running}) + "\n")
                if progress is not None:
                    rate = tokens / max(time.perf_counter() - started, 1e-9)
                    progress(step, total_steps, {"loss": running, "tokens_per_s": rate})
                running = 0.0
                if step % eval_every == 0 or step == total_steps:
                    if not val_rows:
                        _save_adapter(run_dir, model)
                    else:
                        val = _validation_loss(base_model, val_rows, settings.batch_size * 2, pad_id, device)
                        improved = best is None or val < best - settings.min_delta
                        if improved:
                            best, best_step, bad_evals = val, step, 0
                            _save_adapter(run_dir, model)
                        else:
                            bad_evals += 1
                        history.write(json.dumps({"step": step, "val_loss": val, "best": improved}) + "\n")
                        log.info("step %d: validation loss %.4f%s", step, val, " (best)" if improved else "")
                        stopped_early = settings.patience > 0 and bad_evals >= settings.patience
                if step >= total_steps or stopped_early:
                    break
            epoch += 1
    if not (run_dir / "adapter").exists():
        _save_adapter(run_dir, model)
    elapsed = time.perf_counter() - started
    result = TrainResult(
        run_dir=run_dir,
        best_val_loss=best,
        best_step=best_step,
        steps=step,
        stopped_early=stopped_early,
        tokens_per_second=tokens / max(elapsed, 1e-9),
        train_rows=len(train_rows),
        validation_rows=len(val_rows),
        skipped_rows=len(loaded.bad_rows),
    )
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
    write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2))
    return result


def _manifest(
    config: ExtractionConfig,
    base_path: str,
    fmt: RecordFormat,
    train: list[RecordExample],
    validation: list[RecordExample],
    loaded: Any,
) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "kind": "extraction",
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
