"""The training loop, shared by SFT (`sft.train`) and extraction (`extraction.train_extraction`).

Read it top to bottom: `build_loop` sets up the LoRA model, optimizer and schedule;
`start_state` loads a checkpoint or starts at step 0; `train_loop` runs `train_step` (one
optimizer step over `gradient_accumulation` micro-batches) and `evaluate_and_checkpoint`
(validation loss, best adapter, early stopping, resumable checkpoint) until the last step.
DPO (`dpo.py`) has its own objective and batches but uses the same pieces: `set_seed`,
`apply_gradients`, `stop_signals`, `save_adapter`.

Under `accelerate launch` / torchrun (DDP) every process runs this loop on its share of each global
batch; the main process writes every file; all make the same decisions (full validation on each).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import torch

from taskling.config import LoraSettings, TrainSettings
from taskling.errors import ConfigError, DataError, TasklingError
from taskling.io import iter_jsonl, write_json, write_jsonl
from taskling.model.head import HEAD_MODULE, has_head
from taskling.rundir import RunDir
from taskling.train.checkpoint import (
    TrainState,
    has_checkpoint,
    load_checkpoint,
    recover_swaps,
    save_adapter,
    save_checkpoint,
)
from taskling.train.defaults import resolve_defaults
from taskling.train.loss import Row, batches, collate, pack
from taskling.train.objective import Objective, ObjectiveLoss, objective_validation_loss, with_levers
from taskling.train.speed import Levers, apply_model_levers, search_micro_batch
from taskling.train.tracking import Trackers, open_trackers

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict[str, float]], None]


class TrainingInterrupted(TasklingError):
    """Training was stopped by Ctrl-C (SIGINT) or SIGTERM; the message says what was saved."""


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


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def new_accelerator() -> Any:
    """One process, or one of several under `accelerate launch` / torchrun."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def lora_model(base: Any, lora: LoraSettings) -> Any:
    """`base` with a fresh LoRA adapter on `lora.target_modules`, in training mode (a label head trained whole)."""
    from peft import LoraConfig, get_peft_model

    head = [HEAD_MODULE] if has_head(base) else None  # model/head.py: saved with the adapter, no LoRA on it
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        exclude_modules=head,
        modules_to_save=head,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    return model


def apply_gradients(trainable: list[torch.nn.Parameter], optimizer: Any, scheduler: Any, max_norm: float) -> None:
    """Clip, step the optimizer (and the schedule, if any), clear the gradients."""
    torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- Ctrl-C and SIGTERM


@dataclass
class StopRequest:
    """Set by the first SIGINT/SIGTERM: the loop finishes its step, saves, and stops."""

    signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Turn the first SIGINT/SIGTERM into a `StopRequest`; a second one stops at once.

    The previous handlers are put back on exit. Off the main thread (where Python cannot set
    handlers) nothing is installed and the request is never set.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if request.requested:
            raise KeyboardInterrupt
        request.signal_name = signal.Signals(signum).name
        log.warning("%s: stopping after this step; press Ctrl-C again to stop at once", request.signal_name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


# ---------------------------------------------------------------- setup


@dataclass
class Loop:
    """Everything the loop needs, built once by `build_loop`."""

    settings: TrainSettings
    run: RunDir
    model: Any  # the peft model
    objective: Any  # ObjectiveLoss, wrapped for DDP: (loss summed over its units, the unit count)
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    accelerator: Any
    train_rows: list[Row]
    val_rows: list[Row]
    pad_id: int
    total_steps: int
    micro_per_epoch: int
    eval_every: int
    checkpoints: bool  # False for extract-train, which always starts over
    levers: Levers | None = None  # packing, micro-batch splitting (train/speed.py)
    spec: Objective = field(default_factory=Objective)  # what ObjectiveLoss computes (train/objective.py)
    chunk_rows: int = 0  # rows per forward pass when the micro-batch search split it; 0: all at once
    history: IO[str] | None = None
    tracker: Trackers | None = None  # `train.report_to`, on the main process
    select: Any = None  # train.select_by: metric: model -> (history fields, best so far) (train/select.py)
    _epoch_batches: tuple[int, list[list[int]]] = field(default=(-1, []))

    main = property(lambda self: bool(self.accelerator.is_main_process))
    world = property(lambda self: int(self.accelerator.num_processes))
    rank = property(lambda self: int(self.accelerator.process_index))
    device = property(lambda self: self.accelerator.device)

    def batch_indices(self, epoch: int, position: int) -> list[int]:
        if self._epoch_batches[0] != epoch:
            size = self.settings.batch_size or 1  # resolved by build_loop
            self._epoch_batches = (epoch, batches(self.train_rows, size, self.settings.seed, epoch))
        return self._epoch_batches[1][position]

    def to_batch(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """Rows as one padded batch, or packed end to end without padding (`train.packing`)."""
        if self.levers is not None and self.levers.packing:
            return pack(rows, self.pad_id, self.device, self.levers.pack_capacity)
        return collate(rows, self.pad_id, self.device)

    def micro_batches(self, idx: list[int]) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This process's share of a global batch (in pieces of `chunk_rows` rows) and its token count.
        A process left without rows still runs a forward pass (DDP needs every process in every
        step), on a row whose targets are masked."""
        mine = idx[self.rank :: self.world]
        if not mine:
            ids, _ = self.train_rows[idx[0]]
            return [collate([(ids, [-100] * len(ids))], self.pad_id, self.device)], 0
        rows = [self.train_rows[i] for i in mine]
        size = self.chunk_rows or len(rows)
        pieces = [self.to_batch(rows[i : i + size]) for i in range(0, len(rows), size)]
        return pieces, sum(len(ids) for ids, _ in rows)


def build_loop(
    settings: TrainSettings,
    model: Any,
    run_dir: str | Path,
    train_rows: list[Row],
    val_rows: list[Row],
    pad_id: int,
    accelerator: Any,
    *,
    checkpoints: bool = True,
    levers: Levers | None = None,
    objective: Objective | None = None,
    labels: int = 0,
) -> Loop:
    """The optimizer (AdamW), the schedule and the step counts for training `model` on `train_rows`.

    Unset epochs, learning rate, warmup and batch size are filled by data size (`train/defaults.py`,
    from `train_rows` and `labels`); `objective` defaults to the LM answer loss."""
    from transformers import get_scheduler

    settings, _ = resolve_defaults(settings, len(train_rows), labels)
    assert settings.batch_size and settings.epochs and settings.learning_rate and settings.warmup_ratio is not None
    if settings.batch_size < accelerator.num_processes:
        raise ConfigError(
            f"train.batch_size={settings.batch_size} is the global batch: "
            f"it must be >= {accelerator.num_processes} processes"
        )
    micro_per_epoch = math.ceil(len(train_rows) / settings.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / settings.gradient_accumulation)
    total_steps = settings.max_steps or max(1, math.ceil(steps_per_epoch * settings.epochs))
    levers = levers or Levers.resolve(settings, world=accelerator.num_processes)
    apply_model_levers(model, levers)
    spec = with_levers(objective or Objective(), settings, model, levers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(
        settings.schedule,
        optimizer,
        num_warmup_steps=int(settings.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    loop = Loop(
        settings=settings,
        run=RunDir(run_dir),
        model=model,
        objective=accelerator.prepare_model(ObjectiveLoss(model, spec)),
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=trainable,
        accelerator=accelerator,
        train_rows=train_rows,
        val_rows=val_rows,
        pad_id=pad_id,
        total_steps=total_steps,
        micro_per_epoch=micro_per_epoch,
        eval_every=settings.eval_every or steps_per_epoch,
        checkpoints=checkpoints,
        levers=levers,
        spec=spec,
    )
    if levers.auto_batch:
        loop.chunk_rows = search_micro_batch(loop.objective, optimizer, train_rows, settings.batch_size, loop.to_batch)
    return loop


def iter_history(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The records of RUN_DIR/history.jsonl; a last line cut short by a crash is skipped."""
    path = RunDir(run_dir).history
    if not path.exists():
        return
    last = len(path.read_bytes().rstrip(b"\n").split(b"\n"))
    try:
        for _, record in iter_jsonl(path):
            yield record
    except DataError as err:
        if err.line != last:
            raise
        log.warning("%s: skipping a truncated last line", path)


def start_state(loop: Loop, resume: bool) -> TrainState:
    """The checkpoint's state when resuming from one, else step 0.

    The history is cut back to the checkpoint: the steps after it are about to be redone.
    """
    if loop.main:
        recover_swaps(loop.run.root)
    loop.accelerator.wait_for_everyone()
    state = TrainState()
    if resume and loop.checkpoints and has_checkpoint(loop.run.root):
        state = load_checkpoint(loop.run.root, loop.model, loop.optimizer, loop.scheduler, loop.micro_per_epoch)
        log.info("resuming %s from step %d", loop.run.root, state.step)
        if loop.main:
            write_jsonl(loop.run.history, [r for r in iter_history(loop.run.root) if r["step"] <= state.step])
    loop.accelerator.wait_for_everyone()
    return state


# ---------------------------------------------------------------- the loop


def log_history(loop: Loop, record: dict[str, Any]) -> None:
    # history.jsonl is an append-only log (rewriting it atomically every step would be
    # quadratic); a line torn by a crash is the last one, which `iter_history` skips.
    if loop.history is not None:
        loop.history.write(json.dumps(record) + "\n")
        loop.history.flush()
    if loop.tracker is not None:
        loop.tracker.log_record(record)


def micro_step(loop: Loop, idx: list[int]) -> tuple[float, int]:
    """Forward and backward over this process's rows of one micro-batch: (loss, tokens)."""
    acc, world = loop.accelerator, loop.world
    pieces, tokens = loop.micro_batches(idx)
    count = torch.tensor(float(sum(loop.spec.units(b) for b in pieces)), device=loop.device)
    total = float(acc.reduce(count, "sum") if world > 1 else count)
    # Normalised by the answer tokens (or rows: `train.objective=labels`) of all processes; DDP averages gradients over
    # processes, hence the factor `world`.
    scale = world / max(total, 1.0) / loop.settings.gradient_accumulation
    loss_sum = torch.zeros((), device=loop.device)
    for batch in pieces:
        piece_sum, _ = loop.objective(**batch)
        acc.backward(piece_sum * scale)
        loss_sum += piece_sum.detach().float()
    batch_loss = loss_sum / max(total, 1.0)
    return float(acc.reduce(batch_loss, "sum") if world > 1 else batch_loss), tokens


def train_step(loop: Loop, state: TrainState) -> float:
    """One optimizer step over `gradient_accumulation` micro-batches; advances `state`, returns the loss."""
    settings, world = loop.settings, loop.world
    running = 0.0
    for _ in range(settings.gradient_accumulation):
        epoch = state.epoch
        loss, tokens = micro_step(loop, loop.batch_indices(state.epoch, state.position))
        running += loss
        state.tokens_seen += tokens * world
        state.position += 1
        if state.position == loop.micro_per_epoch:
            state.epoch, state.position = state.epoch + 1, 0
    apply_gradients(loop.trainable, loop.optimizer, loop.scheduler, settings.max_grad_norm)
    state.step += 1
    loss = running / settings.gradient_accumulation
    log_history(loop, {"step": state.step, "epoch": epoch, "train_loss": loss, "lr": loop.scheduler.get_last_lr()[0]})
    return loss


def evaluate(loop: Loop, state: TrainState) -> None:
    """Validation loss; save the adapter when it improves; decide whether to stop early."""
    if not loop.val_rows:
        if loop.main:
            save_adapter(loop.run.root, loop.model)
        return
    settings = loop.settings
    base_model = loop.model.get_base_model()
    size = 2 * (settings.batch_size or 1)
    loss = objective_validation_loss(loop.spec, base_model, loop.val_rows, size, loop.pad_id, loop.device)
    picked = loop.select(loop.model) if loop.select is not None else None
    improved = picked[1] if picked else state.best_val_loss is None or loss < state.best_val_loss - settings.min_delta
    if improved:
        state.best_val_loss, state.best_step, state.bad_evals = loss, state.step, 0
        if loop.main:
            save_adapter(loop.run.root, loop.model)
    else:
        state.bad_evals += 1
    log_history(loop, {"step": state.step, "val_loss": loss, "best": improved, **(picked[0] if picked else {})})
    log.info("step %d: validation loss %.4f%s", state.step, loss, " (best)" if improved else "")
    state.stopped_early = settings.patience > 0 and state.bad_evals >= settings.patience


def evaluate_and_checkpoint(loop: Loop, state: TrainState, *, force_checkpoint: bool = False) -> None:
    """Evaluate when due (every `eval_every` steps and at the last); checkpoint when due or forced."""
    every = loop.settings.checkpoint_every
    due = bool(every) and state.step % every == 0
    if state.step % loop.eval_every == 0 or state.step == loop.total_steps:
        evaluate(loop, state)
        due = True
    if (due or force_checkpoint) and loop.checkpoints and loop.main:
        save_checkpoint(loop.run.root, loop.model, loop.optimizer, loop.scheduler, state)


def all_agree_to_stop(loop: Loop, request: StopRequest) -> bool:
    """True when any process was signalled: all processes must stop at the same step."""
    if loop.world == 1:
        return request.requested
    flag = torch.tensor([1.0 if request.requested else 0.0], device=loop.device)
    return bool(loop.accelerator.reduce(flag, "sum").item() > 0)


def interrupted_error(loop: Loop, state: TrainState, request: StopRequest) -> TrainingInterrupted:
    what = request.signal_name or "a signal"
    where = f"training stopped by {what} at step {state.step} of {loop.total_steps}"
    if loop.checkpoints:
        return TrainingInterrupted(
            f"{where}; all {state.step} steps are saved in {loop.run.checkpoint}",
            fix=f"run the same command again to resume from step {state.step}; --fresh to start over",
        )
    return TrainingInterrupted(
        f"{where}; this command does not resume (best adapter so far: {loop.run.adapter})",
        fix="run the same command again to start over",
    )


def run_steps(loop: Loop, state: TrainState, progress: ProgressFn | None, stop_after_steps: int | None) -> bool:
    """Step until the last step or early stopping; True when `stop_after_steps` paused the run."""
    started, tokens_before = time.perf_counter(), state.tokens_seen
    with stop_signals() as request:
        while state.step < loop.total_steps and not state.stopped_early:
            loss = train_step(loop, state)
            rate = (state.tokens_seen - tokens_before) / max(time.perf_counter() - started, 1e-9)
            if loop.tracker is not None:
                loop.tracker.log_metrics({"train/tokens_per_s": rate}, state.step)
            if progress is not None and loop.main:
                progress(state.step, loop.total_steps, {"loss": loss, "tokens_per_s": rate})
            pause = stop_after_steps is not None and state.step >= stop_after_steps
            signalled = all_agree_to_stop(loop, request)
            evaluate_and_checkpoint(loop, state, force_checkpoint=pause or signalled)
            if signalled:
                raise interrupted_error(loop, state, request)
            if pause:
                return True
    return False


def train_loop(
    loop: Loop,
    state: TrainState,
    *,
    skipped_rows: int,
    progress: ProgressFn | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Run the loop from `state` to the end; save the adapter and RUN_DIR/train_summary.json."""
    started, tokens_before = time.perf_counter(), state.tokens_seen
    loop.tracker = open_trackers(loop.settings, loop.run) if loop.main else None
    loop.history = loop.run.history.open("a", encoding="utf-8") if loop.main else None
    try:
        paused = run_steps(loop, state, progress, stop_after_steps)
    except BaseException:
        if loop.tracker is not None:  # an interrupted run's trackers are closed, with no final numbers
            loop.tracker.finish({})
            loop.tracker = None
        raise
    finally:
        if loop.history is not None:
            loop.history.close()
            loop.history = None
    if loop.main and not paused and not loop.run.adapter.exists():
        save_adapter(loop.run.root, loop.model)
    loop.accelerator.wait_for_everyone()
    result = TrainResult(
        run_dir=loop.run.root,
        best_val_loss=state.best_val_loss,
        best_step=state.best_step,
        steps=state.step,
        stopped_early=state.stopped_early,
        tokens_per_second=(state.tokens_seen - tokens_before) / max(time.perf_counter() - started, 1e-9),
        train_rows=len(loop.train_rows),
        validation_rows=len(loop.val_rows),
        skipped_rows=skipped_rows,
        interrupted=paused,
    )
    if loop.main:
        write_json(loop.run.summary, {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()})
    if loop.tracker is not None:
        loop.tracker.finish(asdict(result))
        loop.tracker = None
    return result
