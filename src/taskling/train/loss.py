"""Batches and the answer-only loss, shared by SFT, extraction and DPO.

A training row is `(input_ids, labels)` with labels -100 on the prompt: the loss is the
cross-entropy of the answer tokens only, and the LM head runs on the answer positions only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

Row = tuple[list[int], list[int]]


def batches(rows: Sequence[Row], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
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


def collate(rows: Sequence[Row], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (-100 on padding) and `attention_mask` on `device`."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


# Packed sequences longer than this are split into several (attention is quadratic in a
# sequence's length, and SDPA masks a packed sequence densely); flash-attention packs all in one.
PACK_TOKENS = 1024


def pack_bins(lengths: Sequence[int], capacity: int | None) -> list[list[int]]:
    """Row indices grouped, in order, into bins of at most `capacity` tokens (None: one bin)."""
    bins: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if bins[-1] and capacity is not None and used + n > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def pack(
    rows: Sequence[Row], pad_id: int, device: torch.device | str, capacity: int | None = PACK_TOKENS
) -> dict[str, torch.Tensor]:
    """Padding-free batch: rows laid end to end in a few sequences, `position_ids` restarting per row.

    No `attention_mask`: given position ids that restart, transformers keeps attention within
    each row (a block-diagonal causal mask for SDPA/eager, varlen kernels for flash-attention).
    A row's first label is masked: it would be predicted from the previous row. Sequences are
    `capacity` tokens at most (or the longest row); the shorter ones end in padding that forms
    its own masked segment.
    """
    capacity = None if capacity is None else max(capacity, max(len(ids) for ids, _ in rows))
    bins = pack_bins([len(ids) for ids, _ in rows], capacity)
    width = max(sum(len(rows[i][0]) for i in b) for b in bins)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), -100, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            ids, lab = rows[i]
            input_ids[b, at : at + len(ids)] = torch.tensor(ids)
            labels[b, at + 1 : at + len(lab)] = torch.tensor(lab[1:], dtype=torch.long)
            positions[b, at : at + len(ids)] = torch.arange(len(ids))
            at += len(ids)
        positions[b, at:] = torch.arange(width - at)
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "position_ids": positions.to(device)}


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many answer tokens a batch is scored on (known before the forward pass)."""
    return int((batch["labels"][:, 1:] != -100).sum())


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
    hidden, targets = next_token_states(base_model, batch)
    keep = targets != -100
    return head_logits(base_model, hidden[keep]), targets[keep], keep


def next_token_states(base_model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states `[rows, positions, hidden]` beside the next tokens they predict."""
    hidden = base_model.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).last_hidden_state
    return hidden[:, :-1], batch["labels"][:, 1:]


def answer_loss(base_model: Any, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Cross-entropy over answer tokens (mean or sum) and their count."""
    logits, targets, keep = answer_logits(base_model, batch)
    return F.cross_entropy(logits, targets, reduction=reduction), int(keep.sum())


@torch.no_grad()
def validation_loss(base_model: Any, rows: Sequence[Row], batch_size: int, pad_id: int, device: Any) -> float:
    """Mean answer-token cross-entropy over `rows` (eval mode, no dropout)."""
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
