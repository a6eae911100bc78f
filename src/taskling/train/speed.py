"""Training speed levers: which are on, gradient checkpointing, compiled layers, the micro-batch search.

Each lever is a config option (`train.packing`, `train.auto_batch`, `train.gradient_checkpointing`,
`train.compile`, `model.attn_implementation`); `null` means "on when CUDA is present". None
changes what is computed, only how: packing and micro-batch splitting give the same loss
and gradients as one padded batch (tests/test_speed.py checks each on the tiny model).
Padding-free packing itself is `loss.pack`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from taskling.config import ModelConfig, TrainSettings

log = logging.getLogger(__name__)


def on_cuda(flag: bool | None) -> bool:
    """A lever's setting: as given, or (None) on exactly when CUDA is present."""
    return torch.cuda.is_available() if flag is None else flag


@dataclass(frozen=True)
class Levers:
    """The levers a run uses, resolved from the config and the machine."""

    packing: bool
    pack_capacity: int | None  # tokens per packed sequence; None: one sequence (flash-attention varlen)
    auto_batch: bool
    gradient_checkpointing: bool
    compile: bool

    @classmethod
    def resolve(cls, train: TrainSettings, model: ModelConfig | None = None, *, world: int = 1) -> Levers:
        from taskling.train.loss import PACK_TOKENS

        flash = model is not None and model.attn_implementation == "flash_attention_2"
        return cls(
            packing=on_cuda(train.packing),
            pack_capacity=None if flash else PACK_TOKENS,
            # Splitting a micro-batch changes how many backward passes each process runs; DDP
            # needs them equal, so the search runs in single-process training only.
            auto_batch=on_cuda(train.auto_batch) and torch.cuda.is_available() and world == 1,
            gradient_checkpointing=train.gradient_checkpointing,
            compile=train.compile,
        )


def apply_model_levers(model: Any, levers: Levers) -> Any:
    """Gradient checkpointing and compiled decoder layers on a peft model, in place."""
    base = model.get_base_model()
    if levers.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (frozen embeddings under LoRA).
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        log.info("gradient checkpointing on")
    if levers.compile:
        compile_layers(base)
    return model


def compile_layers(base_model: Any) -> int:
    """torch.compile each decoder layer in place (regional compilation: one graph reused by every
    layer, compiled in seconds rather than minutes); returns how many were compiled."""
    layers = getattr(base_model.get_decoder(), "layers", [])
    for layer in layers:
        layer.compile(dynamic=None)
    log.info("torch.compile: %d decoder layers", len(layers))
    return len(layers)


def is_out_of_memory(err: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def largest_micro_batch(
    try_rows: Callable[[int], None], start: int, *, oom: Callable[[BaseException], bool] = is_out_of_memory
) -> int:
    """The largest row count, from `start` halving down to 1, for which `try_rows(n)` does not run out of memory.

    `try_rows(n)` runs a forward and backward pass on the n longest rows. Errors other than
    out-of-memory propagate; running out of memory at one row re-raises it.
    """
    n = start
    while True:
        try:
            try_rows(n)
            return n
        except Exception as err:
            if not oom(err) or n == 1:
                raise
            log.info("micro-batch of %d rows ran out of memory; trying %d", n, (n + 1) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            n = (n + 1) // 2


def search_micro_batch(
    objective: Any,
    optimizer: Any,
    rows: list[tuple[list[int], list[int]]],
    batch_size: int,
    to_batch: Callable[[list[tuple[list[int], list[int]]]], dict[str, torch.Tensor]],
) -> int:
    """Rows per forward pass that fit in memory, tried on the `batch_size` longest rows; 0 when all fit.

    Each try runs a forward and backward pass and clears the gradients: no weight changes.
    """
    longest = sorted(rows, key=lambda row: -len(row[0]))[:batch_size]

    def try_rows(n: int) -> None:
        try:
            loss_sum, _ = objective(**to_batch(longest[:n]))
            loss_sum.backward()
        finally:
            optimizer.zero_grad(set_to_none=True)

    n = largest_micro_batch(try_rows, len(longest))
    if n < len(longest):
        log.info("micro-batch search: %d rows per forward pass (batch_size %d kept by accumulation)", n, batch_size)
    return 0 if n >= len(longest) else n


# Rows up to this many tokens train faster with eager attention than with SDPA on a CPU:
# 1.30x per step at 48 tokens, 1.24x at 256, 0.87x at 512 (SmolLM2-135M, LoRA, bf16, 2 cores).
EAGER_MAX_TOKENS = 256


def training_attention(model: ModelConfig, device: str | torch.device, longest: int | None, *, packing: bool) -> str:
    """The attention kernel a run trains with: `model.attn_implementation` as set, or (null)
    eager on a CPU for unpacked rows of at most EAGER_MAX_TOKENS tokens, SDPA otherwise."""
    if model.attn_implementation is not None:
        return model.attn_implementation
    short = longest is not None and longest <= EAGER_MAX_TOKENS and not packing
    return "eager" if short and torch.device(device).type == "cpu" else "sdpa"


def load_training_base(
    model: ModelConfig,
    path: str,
    device: str | torch.device,
    rows: Sequence[tuple[list[int], list[int]]] = (),
    levers: Levers | None = None,
) -> Any:
    """The base model as `model` configures it for training: dtype, attention kernel, NF4 (QLoRA).

    `rows` (the tokenized training and validation rows) and `levers` (packing) pick the kernel
    when `model.attn_implementation` is null: `training_attention`; no rows given: SDPA.
    """
    from taskling.model.loader import load_model, pick_dtype
    from taskling.model.quantize import check_quantize, quantize_nf4

    check_quantize(model.quantize)
    longest = max((len(ids) for ids, _ in rows), default=None)
    attention = training_attention(model, device, longest, packing=levers is not None and levers.packing)
    log.info("attention kernel: %s", attention)
    base = load_model(path, pick_dtype(model.dtype), device, attn_implementation=attention)
    if model.quantize == "nf4":
        quantize_nf4(base)
    return base
