"""Prefix-once training (`train.shared_prefix`): the shared prompt head computed once per micro-batch.

The chat template renders the system prompt and the user-turn header identically for every
row, so every row of a padded micro-batch starts with the same tokens. Their keys and values
are computed once, on one row and with gradients, then expanded to the batch (the backward
pass sums the rows' gradients into that one computation); only the per-row suffixes
(message, answer) run as a batch against that cache, with their own positions and the
padding masked. The loss and the LoRA gradients equal the plain path's (tests/test_objective.py)
up to float rounding; only LoRA dropout (`lora.dropout`, 0 by default) would differ: the prefix
shares one dropout mask per micro-batch instead of one per row.

It does not apply, and the plain path runs (the reason is logged once at debug level), to
packed batches (`train.packing`: rows laid end to end have no common head), to gradient
checkpointing (it disables the key/value cache), and to models with sliding-window layers
(Gemma 3: their cache would drop the prefix's older keys).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def prefix_unsupported(model_config: Any, *, packing: bool, gradient_checkpointing: bool) -> str | None:
    """Why prefix-once training cannot run for this model and these levers; None when it can."""
    if packing:
        return "packed batches have no common head"
    if gradient_checkpointing:
        return "gradient checkpointing turns the key/value cache off"
    if "sliding_attention" in (getattr(model_config, "layer_types", None) or ()):
        return "the model has sliding-window layers, whose cache would drop the prefix's older keys"
    return None


def shared_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens every row of a right-padded batch shares, none of them scored.

    The prefix ends before the first position whose next token is a target, so every target
    is predicted from a suffix position. 0 when fewer than two rows (nothing to share).
    """
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2 or "attention_mask" not in batch:
        return 0
    same = ((ids == ids[:1]) & (batch["attention_mask"] == 1)).all(dim=0)
    differs = (~same).nonzero()
    n = int(differs[0]) if len(differs) else ids.shape[1]
    scored = (labels != -100).any(dim=0).nonzero()
    if len(scored):  # labels[:, k] is predicted at position k - 1: keep that position in the suffix
        n = min(n, int(scored[0]) - 1)
    return max(n, 0)


def prefix_once_hidden(decoder: Any, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Last hidden states at positions n.. of every row, the first `n` tokens run once for the batch."""
    from transformers import DynamicCache

    ids = batch["input_ids"]
    rows, width = ids.shape
    head = decoder(input_ids=ids[:1, :n], use_cache=True, past_key_values=DynamicCache())
    shared = [
        (layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
        for layer in head.past_key_values.layers
    ]
    positions = torch.arange(n, width, device=ids.device).expand(rows, -1)
    out = decoder(
        input_ids=ids[:, n:],
        attention_mask=batch["attention_mask"],  # [prefix: all ones][suffix: zeros on padding]
        position_ids=positions,
        past_key_values=DynamicCache(ddp_cache_data=shared),
        use_cache=True,
    )
    return out.last_hidden_state
