"""A brute-force reference for the classifier: score each label's full answer after a prompt, one forward each."""

from __future__ import annotations

import math
from typing import Any

import torch


def brute_force_probs(clf: Any, prompt: list[int]) -> list[float]:
    """The constrained-decoding probability of each label after `prompt`, computed the slow, obvious way."""
    seqs = clf.fmt.label_sequences
    probs = []
    for seq in seqs:
        with torch.no_grad():
            logits = clf.model(input_ids=torch.tensor([prompt + seq])).logits[0].float()
        p = 1.0
        for k, token in enumerate(seq):
            allowed = sorted({s[k] for s in seqs if len(s) > k and s[:k] == seq[:k]})
            row = logits[len(prompt) - 1 + k]
            masked = torch.full_like(row, -math.inf)
            masked[allowed] = row[allowed]
            p *= torch.softmax(masked, dim=-1)[token].item()
        probs.append(p)
    return probs
