"""The linear label head (`model.head: linear`): one logit per label from the prompt's last hidden state.

The default classifier (`model.head: labels`) scores the labels' answer token sequences with
the LM head. The linear head is the sequence-classification recipe instead: a
`[labels, hidden]` matrix on the last hidden state at the answer position (the generation
prompt's last token), trained with cross-entropy over the labels alongside the LoRA adapter.
The answer is still the argmax over the label set, never free text.

The head is a module of the base model named `HEAD_MODULE`, which peft trains and saves with
the adapter (`modules_to_save`), so checkpoints, resuming, the best adapter and merging carry
it unchanged. Its rows start as the LM-head rows of each label's first answer token: at step 0
the head scores the labels as the LM would rank their first tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

HEAD_MODULE = "taskling_head"


def attach_head(model: Any, n_labels: int, first_tokens: Sequence[int] | None = None) -> torch.nn.Linear:
    """Give `model` (a causal LM) a float32 label head; rows from the LM head's `first_tokens` when given."""
    hidden = model.get_output_embeddings().weight.shape[1]
    device = model.get_output_embeddings().weight.device
    head = torch.nn.Linear(hidden, n_labels, bias=False, device=device, dtype=torch.float32)
    with torch.no_grad():
        if first_tokens is None:
            head.weight.zero_()
        else:
            head.weight.copy_(model.get_output_embeddings().weight[list(first_tokens)].float())
    setattr(model, HEAD_MODULE, head)
    return head


def has_head(model: Any) -> bool:
    return hasattr(model, HEAD_MODULE)


def is_head_run(manifest: dict[str, Any]) -> bool:
    """Whether a run's run.json says it was trained with `model.head: linear` (runs before the key: no)."""
    return manifest.get("head", "labels") == "linear"


def head_scores(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 label logits for hidden states `[..., hidden]` (the peft wrapper routes to the active adapter's head)."""
    head = getattr(model, HEAD_MODULE)
    return head(hidden.float())


def head_weight(model: Any, adapter: str | None = None) -> torch.Tensor:
    """The head's `[labels, hidden]` matrix: the named adapter's copy under peft, else the module's own."""
    module = getattr(model, HEAD_MODULE)
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        module = copies[adapter or next(iter(copies))]
    return module.weight.detach()


def head_training_row(fmt: Any, text: str, label: str) -> tuple[list[int], list[int]]:
    """A training row for the head: the prompt, one more position, and the label's index as its target.

    The answer's tokens are never run: the head reads only the prompt's last hidden state, so
    the row is the prompt plus the label's first answer token (a position the loss skips, kept
    so targets line up with the next-token layout every batch uses) and the target at that
    position is the label's index in `fmt.task.labels`, not a token id.
    """
    prompt = fmt.prompt_ids(text)
    index = fmt.task.labels.index(label)
    return [*prompt, fmt.label_sequences[index][0]], [-100] * len(prompt) + [index]
