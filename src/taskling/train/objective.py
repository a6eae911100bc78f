"""What training minimises (`train.objective`) and how the loop computes it.

- `lm` (default): cross-entropy of the answer tokens over the whole vocabulary.
- `labels`: the label-set objective, "train what you infer". At each branching point of the
  labels' token trie (where more than one answer token is allowed) the cross-entropy of the
  softmax over the allowed tokens only: exactly the softmax the classifier scores with
  (`serve.classifier.LabelTrie`). Positions with one allowed token contribute nothing, so a
  row's loss is -log of the classifier's probability of its gold label. Normalised per row.
- `mixed`: the LM loss plus `train.label_loss_weight` times the label-set loss, both summed
  over a row and divided by the answer tokens.
- `head` (`model.head: linear`, `model/head.py`): cross-entropy over the labels of the linear
  label head on the prompt's last hidden state. Its rows (`head_training_row`) hold the prompt
  only, with the label's index as the one target. Normalised per row.

The validation loss is the same objective on the validation rows (for `lm` the mean answer-token
cross-entropy, as always; for `labels` the mean -log p(gold label)), so early stopping and
the best adapter follow what is trained. `ObjectiveLoss` also runs prefix-once training
(`train/prefix.py`) when the loop turns it on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from taskling.config import TrainSettings
from taskling.model.head import head_scores
from taskling.train.loss import Row, answer_tokens, collate, head_logits, next_token_states
from taskling.train.prefix import prefix_once_hidden, prefix_unsupported, shared_prefix_length

if TYPE_CHECKING:
    from taskling.train.speed import Levers

log = logging.getLogger(__name__)

OBJECTIVES = ("lm", "labels", "mixed", "head")
PER_ROW = ("labels", "head")  # objectives normalised per row, not per answer token


@dataclass(frozen=True)
class Objective:
    """The objective and what it needs: the label answers' branching points (`labels`, `mixed`)."""

    kind: str = "lm"
    label_weight: float = 1.0
    # answer prefix (tuple of token ids) -> the tokens allowed next, where more than one is
    branches: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    shared_prefix: bool = False
    # Run the forward pass under torch.autocast in bfloat16 (`train.mixed_precision`).
    mixed_precision: bool = False

    @classmethod
    def for_labels(
        cls, kind: str, sequences: Sequence[Sequence[int]], *, label_weight: float = 1.0, shared_prefix: bool = False
    ) -> Objective:
        """The objective over the labels' answer token sequences (`ChatFormat.label_sequences`)."""
        children: dict[tuple[int, ...], list[int]] = {}
        for seq in sequences:
            for k in range(len(seq)):
                kids = children.setdefault(tuple(seq[:k]), [])
                if seq[k] not in kids:
                    kids.append(seq[k])
        branches = {prefix: kids for prefix, kids in children.items() if len(kids) > 1}
        return cls(kind=kind, label_weight=label_weight, branches=branches, shared_prefix=shared_prefix)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the summed loss is divided by: answer tokens, or (`labels`, `head`) rows with an answer."""
        if self.kind in PER_ROW:
            return int((batch["labels"][:, 1:] != -100).any(dim=1).sum())
        return answer_tokens(batch)


def label_set_loss(
    objective: Objective, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Summed -log softmax over the allowed tokens at every branching answer position.

    `logits`/`targets` are the answer positions in row-major order and `keep` the
    [rows, positions] mask that chose them (`loss.answer_logits`).
    """
    row_of = keep.nonzero()[:, 0].tolist()
    tokens = targets.tolist()
    picked, allowed, choice = [], [], []
    so_far: list[int] = []
    for i, (row, token) in enumerate(zip(row_of, tokens, strict=True)):
        if i == 0 or row != row_of[i - 1]:
            so_far = []
        kids = objective.branches.get(tuple(so_far))
        if kids is not None and token in kids:
            picked.append(i)
            allowed.append(kids)
            choice.append(kids.index(token))
        so_far.append(token)
    if not picked:
        return logits.sum() * 0.0
    width = max(len(a) for a in allowed)
    index = torch.tensor([a + [a[0]] * (width - len(a)) for a in allowed], device=logits.device)
    valid = torch.tensor([[j < len(a) for j in range(width)] for a in allowed], device=logits.device)
    rows = logits[torch.tensor(picked, device=logits.device)]
    scores = rows.gather(1, index).masked_fill(~valid, float("-inf"))
    return F.cross_entropy(scores, torch.tensor(choice, device=logits.device), reduction="sum")


def answer_states(
    base_model: Any, batch: dict[str, torch.Tensor], shared_prefix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states `[rows, positions, hidden]` and the next tokens they predict `[rows, positions]`
    (-100 off the answer); the shared head run once when `shared_prefix` and the batch allows."""
    n = shared_prefix_length(batch) if shared_prefix and "position_ids" not in batch else 0
    if n == 0:
        return next_token_states(base_model, batch)
    hidden = prefix_once_hidden(base_model.get_decoder(), batch, n)
    return hidden[:, :-1], batch["labels"][:, n + 1 :]


def objective_logits(
    base_model: Any, batch: dict[str, torch.Tensor], shared_prefix: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`loss.answer_logits`, with the shared head run once when `shared_prefix` and the batch allows."""
    hidden, targets = answer_states(base_model, batch, shared_prefix)
    keep = targets != -100
    return head_logits(base_model, hidden[keep]), targets[keep], keep


def head_loss(objective: Objective, base_model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the labels of the linear head at each row's answer position.

    Rows are `model.head.head_training_row`s: the one target is the label's index."""
    hidden, targets = answer_states(base_model, batch, objective.shared_prefix)
    keep = targets != -100
    return F.cross_entropy(head_scores(base_model, hidden[keep]), targets[keep], reduction="sum")


def objective_loss(objective: Objective, base_model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's summed loss under `objective` (divide by `objective.units(batch)`)."""
    if objective.kind == "head":
        return head_loss(objective, base_model, batch)
    logits, targets, keep = objective_logits(base_model, batch, objective.shared_prefix)
    if objective.kind == "lm":
        return F.cross_entropy(logits, targets, reduction="sum")
    labels = label_set_loss(objective, logits, targets, keep)
    if objective.kind == "labels":
        return labels
    return F.cross_entropy(logits, targets, reduction="sum") + objective.label_weight * labels


def with_levers(objective: Objective, settings: TrainSettings, model: Any, levers: Levers) -> Objective:
    """`objective` with the speed levers `settings` and `levers` resolve to: prefix-once, mixed precision."""
    return with_mixed_precision(with_shared_prefix(objective, settings, model, levers), settings, model)


def with_shared_prefix(objective: Objective, settings: TrainSettings, model: Any, levers: Levers) -> Objective:
    """`objective` with prefix-once training on where `train.shared_prefix` asks for it and it applies."""
    if settings.shared_prefix is False:
        return replace(objective, shared_prefix=False)
    why = prefix_unsupported(
        model.get_base_model().config, packing=levers.packing, gradient_checkpointing=levers.gradient_checkpointing
    )
    if why is not None:
        level = logging.WARNING if settings.shared_prefix else logging.DEBUG
        log.log(level, "prefix-once training off: %s", why)
    return replace(objective, shared_prefix=why is None)


def with_mixed_precision(objective: Objective, settings: TrainSettings, model: Any) -> Objective:
    """`objective` under bf16 autocast as `train.mixed_precision` says (null: when the base is bf16)."""
    bf16 = any(p.dtype == torch.bfloat16 for p in model.get_base_model().parameters())
    on = bf16 if settings.mixed_precision is None else settings.mixed_precision
    if on:
        log.info("mixed precision: forward pass under bf16 autocast")
    return replace(objective, mixed_precision=on)


class ObjectiveLoss(torch.nn.Module):
    """The training objective as a module (DDP/FSDP wrappers see the forward pass).

    Returns the summed loss and its units (answer tokens, or rows for `labels`); the loop
    divides by the units over all processes.
    """

    def __init__(self, model: Any, objective: Objective | None = None) -> None:
        super().__init__()
        self.model = model
        self.spec = objective or Objective()  # default: the LM answer loss

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {"input_ids": input_ids, "labels": labels}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        if position_ids is not None:
            batch["position_ids"] = position_ids
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.spec.mixed_precision):
            total = objective_loss(self.spec, self.model.get_base_model(), batch)
        return total, torch.tensor(float(self.spec.units(batch)), device=input_ids.device)


@torch.no_grad()
def objective_validation_loss(
    objective: Objective, base_model: Any, rows: Sequence[Row], batch_size: int, pad_id: int, device: Any
) -> float:
    """The objective's mean over `rows` (eval mode, no dropout, the plain path)."""
    plain = replace(objective, shared_prefix=False)
    base_model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for start in range(0, len(order), batch_size):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_id, device)
        total += objective_loss(plain, base_model, batch).item()
        count += plain.units(batch)
    base_model.train()
    return total / max(count, 1)
