"""Prompts, answers and constrained greedy decoding for generation tasks.

`GenerationFormat` builds prompt ids (the chat template around the message, the message as
plain text) and answer ids (the answer's plain-text tokens, then the template's end-of-turn
marker) the same way for training and for decoding.

`decode_batch` runs transformers' `generate` (greedy, batched with left padding, KV cache)
with a `PrefixConstraint` logits processor when the task has a pattern:

- at each step the candidate tokens are tried in logit order and the first one whose text
  keeps the output a possible prefix of a full match (`regex`'s `fullmatch(..., partial=True)`)
  is taken, so a step costs a few regex checks, not a pass over the vocabulary;
- the end-of-turn token is a candidate only when the output already fullmatches;
- tokens that are special or decode to a partial UTF-8 character are never candidates.

So a regex-format answer fullmatches by construction, unless `max_tokens` cuts it first:
then it is returned as it stands and counted invalid (`Decoded.cut`). A SQL answer is held
to the read-only prefix rule (`spec.SQL_PREFIX`) while decoding; whether it runs is checked
after (`generate.sql`). Free text is decoded unconstrained and is valid when it ends before
`max_tokens` and is not empty.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import regex
import torch

from taskling.errors import ModelError
from taskling.generate.spec import GenerationTask
from taskling.model.loader import PromptTemplate, encode_plain, encode_template

_PROBE_TEXT = "probe message"
_PROBE_ANSWER = "probe answer"
# Candidates tried per step before falling back to the whole vocabulary in logit order.
TOP_CANDIDATES = 64


class GenerationFormat:
    """Prompt ids for a message and answer ids for a reference answer, with the model's chat template."""

    def __init__(self, tokenizer: Any, task: GenerationTask, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        prompt = self._render(task.messages(_PROBE_TEXT), True)
        full = self._render(task.messages(_PROBE_TEXT, _PROBE_ANSWER), False)
        if not full.startswith(prompt) or not full[len(prompt) :].startswith(_PROBE_ANSWER):
            raise ModelError(
                "the chat template does not render the assistant answer right after its generation prompt",
                fix="set model.chat_template to a template whose generation prompt is a prefix of the full chat",
            )
        self.end_text = full[len(prompt) + len(_PROBE_ANSWER) :].rstrip("\n")
        self.end_ids = encode_template(tokenizer, self.end_text)
        if not self.end_ids:
            raise ModelError("the chat template writes no end-of-turn marker after an answer")
        self.template = PromptTemplate(tokenizer, lambda text: self._render(task.messages(text), True))

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        )

    @property
    def end_id(self) -> int:
        """The token that ends an answer (the first of the end-of-turn marker's tokens)."""
        return int(self.end_ids[0])

    @property
    def answer_budget(self) -> int:
        return min(self.task.output.max_tokens + len(self.end_ids), self.max_length // 2)

    def prompt_ids(self, text: str) -> list[int]:
        """Prompt ids leaving room for the answer; a long message keeps its first tokens."""
        ids = self.template.ids(text, self.max_length - self.answer_budget)
        if ids is None:
            raise ModelError(
                f"model.max_length={self.max_length} leaves no room for the message",
                fix="raise model.max_length, lower task.output.max_tokens or shorten the instruction",
            )
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's plain-text tokens (at most `max_tokens`) and the end-of-turn marker."""
        return encode_plain(self.tokenizer, answer)[: self.task.output.max_tokens] + self.end_ids

    def training_ids(self, text: str, answer: str) -> tuple[list[int], list[int]]:
        """(input ids, labels) with labels -100 on the prompt: the loss is on the answer only."""
        prompt = self.prompt_ids(text)
        answer_ids = self.answer_ids(answer)[: max(self.max_length - len(prompt), 1)]
        return prompt + answer_ids, [-100] * len(prompt) + answer_ids


def token_texts(tokenizer: Any, vocab_size: int) -> list[str | None]:
    """Each token's text, or None for special tokens and partial UTF-8 (never a constrained candidate)."""
    special = set(tokenizer.all_special_ids)
    known = min(vocab_size, len(tokenizer))
    # Each token decoded after an anchor token: SentencePiece drops a word's leading space when
    # the token is decoded alone, and the constraint must see the text the answer will hold.
    anchor = encode_plain(tokenizer, "a")[:1]
    skip = len(tokenizer.decode(anchor, clean_up_tokenization_spaces=False))
    pairs = tokenizer.batch_decode([[*anchor, i] for i in range(known)], clean_up_tokenization_spaces=False)
    out: list[str | None] = [None] * vocab_size
    for i, pair in enumerate(pairs):
        text = pair[skip:]
        if i not in special and text and "\ufffd" not in text:
            out[i] = text
    return out


class PrefixConstraint:
    """A transformers logits processor: only the best token that keeps the output a possible match survives."""

    def __init__(self, pattern: regex.Pattern[str], texts: list[str | None], end_id: int, prompt_width: int) -> None:
        self.pattern = pattern
        self.texts = texts
        self.end_id = end_id
        self.prompt_width = prompt_width
        self.dead_ends = 0  # steps where no token could continue the match (the answer ends invalid)

    def allowed(self, output: str, token: int) -> bool:
        if token == self.end_id:
            return self.pattern.fullmatch(output) is not None
        text = self.texts[token] if token < len(self.texts) else None
        return text is not None and self.pattern.fullmatch(output + text, partial=True) is not None

    def choose(self, output: str, scores: torch.Tensor) -> int:
        """The highest-scoring allowed token: the top candidates first, then the rest in order."""
        top = torch.topk(scores, min(TOP_CANDIDATES, scores.numel())).indices.tolist()
        for token in top:
            if self.allowed(output, token):
                return int(token)
        rest = torch.argsort(scores, descending=True)[len(top) :].tolist()
        for token in rest:
            if not math.isinf(float(scores[token])) and self.allowed(output, token):
                return int(token)
        self.dead_ends += 1
        return self.end_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(scores, -math.inf)
        for row in range(input_ids.shape[0]):
            generated = input_ids[row, self.prompt_width :].tolist()
            if self.end_id in generated:  # finished: transformers pads it from here on
                masked[row] = scores[row]
                continue
            output = "".join(self.texts[t] or "" for t in generated)
            token = self.choose(output, scores[row])
            masked[row, token] = scores[row, token]
        return masked


@dataclass
class Decoded:
    output: str
    n_tokens: int
    cut: bool  # max_tokens reached before the end-of-turn token
    ms: float  # this row's share of its batch's wall time


def left_pad(prompts: Sequence[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def decode_batch(
    model: Any,
    fmt: GenerationFormat,
    texts: Sequence[str],
    *,
    constrained: bool = True,
    texts_table: list[str | None] | None = None,
    device: Any = "cpu",
    max_tokens: int | None = None,
) -> list[Decoded]:
    """Greedy answers for `texts` in one batch; constrained to the task's pattern unless `constrained=False`.

    `max_tokens` caps this batch's answers below the task's `output.max_tokens` (never above it).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    tokenizer = fmt.tokenizer
    max_tokens = min(max_tokens or fmt.task.output.max_tokens, fmt.task.output.max_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.end_id
    ids, mask = left_pad([fmt.prompt_ids(t) for t in texts], pad_id, device)
    pattern = fmt.task.pattern() if constrained else None
    processors = LogitsProcessorList()
    table: list[str | None] = []
    if pattern is not None:
        vocab = int(model.get_output_embeddings().weight.shape[0])
        table = texts_table if texts_table is not None else token_texts(tokenizer, vocab)
        processors.append(PrefixConstraint(pattern, table, fmt.end_id, ids.shape[1]))
    config = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=fmt.end_id, pad_token_id=pad_id, num_beams=1
    )
    started = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors)
    ms = (time.perf_counter() - started) * 1000 / len(texts)
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        ended = fmt.end_id in row
        tokens = row[: row.index(fmt.end_id)] if ended else row
        if pattern is not None:  # exactly the text the constraint checked
            text = "".join(table[t] or "" for t in tokens)
        else:
            text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        results.append(Decoded(text, len(tokens), cut=not ended, ms=ms))
    return results
