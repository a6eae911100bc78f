"""LoRA fine-tuning: a plain training loop you can read top to bottom.

What it does, in order: load and check the data (every bad row counted), hold out a
validation split, tokenize with the model's chat template (loss on answer tokens only),
train a LoRA adapter on all linear layers with AdamW and a cosine schedule, measure
validation loss every epoch (or every N steps), keep the best adapter, stop early when
validation loss stops improving, and checkpoint so an interrupted run resumes.

Run directory layout written here:

    RUN_DIR/config.yaml           the resolved config
    RUN_DIR/data/train.jsonl      the rows trained on        (+ validation.jsonl, bad_rows.jsonl)
    RUN_DIR/adapter/              the best LoRA adapter (peft format, safetensors)
    RUN_DIR/checkpoint/           the latest resumable state (adapter, optimizer, scheduler, progress)
    RUN_DIR/history.jsonl         one line per logged step and per evaluation
    RUN_DIR/run.json              manifest: base model, chat format, label answers, data hashes, versions
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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
from taskling.errors import ConfigError, DataError
from taskling.io import write_jsonl, write_text
from taskling.model.loader import ChatFormat, load_model, load_tokenizer, pick_dtype, resolve_base
from taskling.version import __version__

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainResult:
    run_dir: Path
    best_val_loss: float | None
    best_step: int
    steps: int
    stopped_early: bool
    tokens_per_second: float
    train_rows: int
    validation_rows: int
    skipped_rows: int
    interrupted: bool = False


# ---------------------------------------------------------------- data


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    loaded: LoadResult


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


def tokenize(examples: Sequence[Example], fmt: ChatFormat) -> list[tuple[list[int], list[int]]]:
    return [fmt.training_ids(ex.text, ex.label) for ex in examples]


def batches(rows: Sequence[tuple[list[int], list[int]]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches for one epoch: shuffled, then length-bucketed so padding stays small."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk = batch_size * 32
    grouped: list[list[int]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: len(rows[i][0]))
        grouped.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    rng.shuffle(grouped)
    return grouped


def collate(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


# ---------------------------------------------------------------- loss


def head_logits(base_model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits for selected hidden states, as the model's own head computes them."""
    logits = base_model.get_output_embeddings()(hidden).float()
    cap = getattr(base_model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def answer_logits(base_model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the answer positions only, their target tokens, and the (row, position) mask that chose them.

    The LM head runs only at answer positions: the full-vocabulary head at every position
    is most of a small model's activation memory, and the answer is a handful of tokens.
    """
    hidden = base_model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return head_logits(base_model, hidden[:, :-1][keep]), targets[keep], keep


def answer_loss(base_model: Any, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Cross-entropy over answer tokens (mean or sum) and their count."""
    logits, targets, keep = answer_logits(base_model, batch)
    return F.cross_entropy(logits, targets, reduction=reduction), int(keep.sum())


class AnswerLoss(torch.nn.Module):
    """The training objective as a module, so that DDP/FSDP wrappers see the forward pass.

    Returns the summed loss and the answer-token count; the loop normalises by the token
    count over all processes, so N processes compute exactly the gradient of one.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        total, count = answer_loss(self.model.get_base_model(), batch, reduction="sum")
        return total, torch.tensor(float(count), device=input_ids.device)


@torch.no_grad()
def validation_loss(
    base_model: Any, rows: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int, device: Any
) -> float:
    base_model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for start in range(0, len(order), batch_size):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_id, device)
        loss, n = answer_loss(base_model, batch, reduction="sum")
        total += loss.item()
        count += n
    base_model.train()
    return total / max(count, 1)


# ---------------------------------------------------------------- checkpoints


def _save_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    tmp = run_dir / "checkpoint.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
        tmp / "optimizer.pt",
    )
    write_text(tmp / "state.json", json.dumps(state, indent=2))
    _swap_in(tmp, run_dir / "checkpoint")


def _save_adapter(run_dir: Path, model: Any) -> None:
    tmp = run_dir / "adapter.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    _swap_in(tmp, run_dir / "adapter")


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace directory `final` with the complete directory `tmp`.

    Two renames: `final` -> `final.old`, `tmp` -> `final`. A crash between them leaves `final.old`,
    which `_recover_swaps` puts back, so some complete version is always on disk.
    """
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)


def _recover_swaps(run_dir: Path) -> None:
    """Undo a swap that a crash cut between its two renames, and drop half-written temp directories."""
    for name in ("checkpoint", "adapter"):
        final, old = run_dir / name, run_dir / f"{name}.old"
        if old.is_dir() and not final.exists():
            old.replace(final)
            log.warning("restored %s from %s after an interrupted save", final, old)
        shutil.rmtree(run_dir / f"{name}.partial", ignore_errors=True)


def _load_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoint"
    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
    blob = torch.load(ckpt / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return dict(json.loads((ckpt / "state.json").read_text()))


# ---------------------------------------------------------------- the run


def _manifest(config: ProjectConfig, base_path: str, fmt: ChatFormat, data: PreparedData) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "taskling_version": __version__,
        "task": config.task.model_dump(mode="json"),
        "base_model": config.model.base,
        "base_model_path": base_path,
        "chat_template": fmt.tokenizer.chat_template,
        "max_length": config.model.max_length,
        "label_answers": {label: fmt.answer_text(label) for label in config.task.labels},
        "data": {
            "train_hash": content_hash(data.train),
            "validation_hash": content_hash(data.validation),
            "train_rows": len(data.train),
            "validation_rows": len(data.validation),
            "rows_read": data.loaded.rows_read,
            "skipped_rows": len(data.loaded.bad_rows),
            "skipped_by_reason": data.loaded.skipped_by_reason,
            "train_label_counts": label_counts(data.train),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(
    config: ProjectConfig,
    *,
    resume: bool = True,
    progress: ProgressFn | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train a LoRA adapter as `config` says; returns where the run is and how it went.

    With `resume=True` a run directory holding a checkpoint continues from it.
    `stop_after_steps` checkpoints and returns after that many optimizer steps, as an
    interrupted run would leave things (`TrainResult.interrupted` is then True).
    """
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    settings = config.train
    run_dir = Path(config.run_dir)
    # One process, or one of several under `accelerate launch` / torchrun (DDP): the main
    # process writes every file; all processes hold the same weights and make the same
    # decisions (validation loss is computed in full on each).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    if settings.threads:
        torch.set_num_threads(settings.threads)
    _set_seed(settings.seed)

    data = prepare_data(config)
    device = accelerator.device
    base_path = resolve_base(config.model.base, config.model.gguf_file, config.model.chat_template)
    tokenizer = load_tokenizer(base_path, config.model.chat_template)
    fmt = ChatFormat(tokenizer, config.task, config.model.max_length)
    fmt.label_sequences  # noqa: B018 -- fail early if two labels tokenize alike
    train_rows = tokenize(data.train, fmt)
    val_rows = tokenize(data.validation, fmt)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_examples(run_dir / "data" / "train.jsonl", data.train)
        write_examples(run_dir / "data" / "validation.jsonl", data.validation)
        write_jsonl(run_dir / "data" / "bad_rows.jsonl", bad_rows_report(data.loaded.bad_rows))
        _write_text(run_dir / "config.yaml", dump_config(config))
        _write_text(run_dir / "run.json", json.dumps(_manifest(config, base_path, fmt, data), indent=2))
        tokenizer.save_pretrained(run_dir / "tokenizer")

    base = load_model(base_path, pick_dtype(config.model.dtype), device)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.train()
    base_model = model.get_base_model()
    objective = accelerator.prepare_model(AnswerLoss(model))

    if settings.batch_size < world:
        raise ConfigError(
            f"train.batch_size={settings.batch_size} is the global batch: it must be >= {world} processes"
        )
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / settings.batch_size) / settings.gradient_accumulation)
    total_steps = settings.max_steps or max(1, math.ceil(steps_per_epoch * settings.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(
        settings.schedule,
        optimizer,
        num_warmup_steps=int(settings.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    state: dict[str, Any] = {"step": 0, "best_val_loss": None, "best_step": 0, "bad_evals": 0, "stopped_early": False}
    history_path = run_dir / "history.jsonl"
    if main:
        _recover_swaps(run_dir)
    accelerator.wait_for_everyone()
    if resume and (run_dir / "checkpoint" / "state.json").is_file():
        state = _load_checkpoint(run_dir, model, optimizer, scheduler)
        log.info("resuming %s from step %d", run_dir, state["step"])
        if main:  # forget what happened after the checkpoint: those steps are about to be redone
            write_jsonl(history_path, [r for r in iter_history(run_dir) if r["step"] <= state["step"]])
    elif main:
        for stale in ("checkpoint", "adapter"):
            shutil.rmtree(run_dir / stale, ignore_errors=True)
        history_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    eval_every = settings.eval_every or steps_per_epoch
    pad_id = tokenizer.pad_token_id
    tokens_seen, started = 0, time.perf_counter()
    history = history_path.open("a") if main else None

    def log_history(record: dict[str, Any]) -> None:
        if history is not None:
            history.write(json.dumps(record) + "\n")
            history.flush()

    def evaluate_and_keep_best(step: int) -> bool:
        """Validation loss; save the adapter when it improves. Returns True to stop early."""
        if not val_rows:
            if main:
                _save_adapter(run_dir, model)
            return False
        loss = validation_loss(base_model, val_rows, settings.batch_size * 2, pad_id, device)
        best = state["best_val_loss"]
        improved = best is None or loss < best - settings.min_delta
        if improved:
            state.update(best_val_loss=loss, best_step=step, bad_evals=0)
            if main:
                _save_adapter(run_dir, model)
        else:
            state["bad_evals"] += 1
        log_history({"step": step, "val_loss": loss, "best": improved})
        log.info("step %d: validation loss %.4f%s", step, loss, " (best)" if improved else "")
        return settings.patience > 0 and state["bad_evals"] >= settings.patience

    def micro_batch(idx: list[int]) -> dict[str, torch.Tensor]:
        """This process's share of a global batch. A process left without rows still runs
        a forward pass (DDP needs every process in every step), on a row whose targets are masked."""
        mine = idx[rank::world]
        if mine:
            return collate([train_rows[i] for i in mine], pad_id, device)
        ids, _ = train_rows[idx[0]]
        return collate([(ids, [-100] * len(ids))], pad_id, device)

    step = state["step"]
    consumed = state.get("micro_batches", 0)  # micro-batches used by completed optimizer steps
    micro_per_epoch = math.ceil(len(train_rows) / settings.batch_size)
    running, pending = 0.0, 0
    interrupted = False
    while step < total_steps and not state["stopped_early"] and not interrupted:
        epoch, offset = divmod(consumed + pending, micro_per_epoch)
        for idx in batches(train_rows, settings.batch_size, settings.seed, epoch)[offset:]:
            batch = micro_batch(idx)
            loss_sum, count = objective(**batch)
            total = accelerator.reduce(count.detach().clone(), "sum") if world > 1 else count
            # DDP averages gradients over processes, hence the factor `world`.
            scale = world / max(float(total), 1.0) / settings.gradient_accumulation
            accelerator.backward(loss_sum * scale)
            batch_loss = loss_sum.detach() / max(float(total), 1.0)
            running += float(accelerator.reduce(batch_loss, "sum") if world > 1 else batch_loss)
            running_share = running / settings.gradient_accumulation
            tokens_seen += int(batch["attention_mask"].sum()) * world
            pending += 1
            if pending < settings.gradient_accumulation:
                continue
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            consumed += pending
            pending = 0
            state.update(step=step, micro_batches=consumed)
            rate = tokens_seen / max(time.perf_counter() - started, 1e-9)
            log_history({"step": step, "epoch": epoch, "train_loss": running_share, "lr": scheduler.get_last_lr()[0]})
            if progress is not None and main:
                progress(step, total_steps, {"loss": running_share, "tokens_per_s": rate})
            running = 0.0
            checkpoint_due = bool(settings.checkpoint_every) and step % settings.checkpoint_every == 0
            if step % eval_every == 0 or step == total_steps:
                state["stopped_early"] = evaluate_and_keep_best(step)
                checkpoint_due = True
            interrupted = stop_after_steps is not None and step >= stop_after_steps
            if (checkpoint_due or interrupted) and main:
                _save_checkpoint(run_dir, model, optimizer, scheduler, state)
            if step >= total_steps or state["stopped_early"] or interrupted:
                break
    if history is not None:
        history.close()
    if main and not interrupted and not (run_dir / "adapter").exists():
        _save_adapter(run_dir, model)
    accelerator.wait_for_everyone()

    elapsed = time.perf_counter() - started
    result = TrainResult(
        run_dir=run_dir,
        best_val_loss=state["best_val_loss"],
        best_step=state["best_step"],
        steps=step,
        stopped_early=bool(state["stopped_early"]),
        tokens_per_second=tokens_seen / max(elapsed, 1e-9),
        train_rows=len(data.train),
        validation_rows=len(data.validation),
        skipped_rows=len(data.loaded.bad_rows),
        interrupted=interrupted,
    )
    if main:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        _write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2))
    return result


def _write_text(path: Path, text: str) -> None:
    """Write a file atomically: a crash never leaves a half-written file that loads."""
    write_text(path, text)


def iter_history(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(run_dir) / "history.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # the last line, cut short by a crash mid-write
                    log.warning("%s: skipping a truncated line", path)
