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
