"""Constrained generation of schema records: every answer parses and validates, by construction.

The answer is the record as one JSON object with keys in the schema's order
(`ExtractionTask.render`). Its tokens are built segment by segment, the same way in
training and in decoding, so the adapter learns exactly the token sequences the decoder
can produce:

- the fixed text between values (`{"intent": `, `, "city": `, `}`) is tokenized alone and
  **forced**: no model choice, and it rides along with the next forward pass;
- an enum or boolean value (or `null`) is its JSON text tokenized alone; the choices form a
  token trie (like `predict.LabelTrie`) and decoding may only walk the trie;
- a number is a sign, digit-only tokens and (for `number`) one decimal point, at most
  `max_digits` digits, ended by the first token of the next fixed text;
- a string is a quote token, tokens free of quotes, backslashes, control characters and
  partial UTF-8, at most `max_length` characters, and a closing quote token;
- then the template's end-of-turn marker.

At each choice the logits are masked to the allowed tokens and the best one is taken
(greedy). No other token can ever be emitted, so the decoded text is always a JSON object
that `ExtractionTask.parse` accepts: the invalid-output rate is 0 by construction, and
`Extraction.valid` records the check anyway. A field's confidence is the product of the
constrained probabilities of the choices made inside it.

We measured the structured-generation libraries first: xgrammar 0.2.8 pulls triton and a
TVM runtime into a CPU install; outlines and lm-format-enforcer work on decoded text and
re-tokenize, which breaks the "train on exactly the decoded tokens" property above. A
schema with a fixed key order needs none of a general grammar engine.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from taskling.errors import ModelError
from taskling.extract.schema import ExtractionTask, FieldSpec
from taskling.model.loader import PromptTemplate, encode_plain, encode_template
from taskling.rundir import EXTRACTION, RunDir, adapter_version, read_manifest

log = logging.getLogger(__name__)

_PROBE = "probe message"


class RecordFormat:
    """Prompt ids for a text and answer ids for a record, with the model's chat template."""

    def __init__(self, tokenizer: Any, task: ExtractionTask, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        prompt = self._render(task.messages(_PROBE), True)
        full = self._render(task.messages(_PROBE, "{}"), False)
        if not full.startswith(prompt) or not full[len(prompt) :].startswith("{}"):
            raise ModelError(
                "the chat template does not render the assistant answer right after its generation prompt",
                fix="set model.chat_template to a template whose generation prompt is a prefix of the full chat",
            )
        self.end_text = full[len(prompt) + 2 :].rstrip("\n")
        self.end_ids = encode_template(tokenizer, self.end_text)
        self.quote_id = self._single('"')
        self.template = PromptTemplate(tokenizer, lambda text: self._render(task.messages(text), True))

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        )

    def encode(self, text: str) -> list[int]:
        """Ids of record text (keys, values): special-token strings stay plain characters."""
        return encode_plain(self.tokenizer, text)

    def _single(self, text: str) -> int:
        ids = self.encode(text)
        if len(ids) != 1:
            raise ModelError(f"the tokenizer splits {text!r} into {len(ids)} tokens; the decoder needs one")
        return ids[0]

    def literal(self, index: int) -> str:
        """The fixed text before field `index` (or, for index == len(fields), the closing brace)."""
        names = self.task.field_names
        if index == len(names):
            return "}"
        return ("{" if index == 0 else ", ") + json.dumps(names[index], ensure_ascii=False) + ": "

    @cached_property
    def literal_ids(self) -> list[list[int]]:
        return [self.encode(self.literal(i)) for i in range(len(self.task.fields) + 1)]

    def choice_ids(self, spec: FieldSpec) -> list[tuple[Any, list[int]]]:
        """(value, token ids) for the values a trie field can take, null included when optional."""
        values: list[Any] = list(spec.values) if spec.type == "enum" else [True, False]
        if not spec.required:
            values.append(None)
        return [(v, self.encode(json.dumps(v, ensure_ascii=False))) for v in values]

    def value_ids(self, spec: FieldSpec, value: Any) -> list[int]:
        """The token ids of one field's value, segmented exactly as the decoder emits them."""
        if value is None or spec.type in ("enum", "boolean"):
            return self.encode(json.dumps(value, ensure_ascii=False))
        if spec.type == "string":
            return [self.quote_id, *self.encode(str(value)), self.quote_id]
        text = json.dumps(value)
        if "e" in text or "E" in text:  # the decoder writes plain decimals only
            text = format(value, "f").rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
        ids = self.encode("-") if text.startswith("-") else []
        whole, _, frac = text.lstrip("-").partition(".")
        ids += self.encode(whole)
        if frac:
            ids += self.encode(".") + self.encode(frac)
        return ids

    def answer_ids(self, record: dict[str, Any]) -> list[int]:
        ids: list[int] = []
        for i, spec in enumerate(self.task.fields):
            ids += self.literal_ids[i] + self.value_ids(spec, record.get(spec.name))
        return ids + self.literal_ids[-1] + self.end_ids

    @cached_property
    def max_answer_length(self) -> int:
        total = sum(len(x) for x in self.literal_ids) + len(self.end_ids)
        for spec in self.task.fields:
            if spec.type in ("enum", "boolean"):
                total += max(len(ids) for _, ids in self.choice_ids(spec))
            elif spec.type == "string":
                total += spec.max_length + 2
            else:
                total += spec.max_digits + 2
        return total

    def prompt_ids(self, text: str, budget: int | None = None) -> list[int]:
        """Prompt ids, the message as plain text (`PromptTemplate`); a long message keeps its
        first tokens so prompt + answer fit `max_length`."""
        budget = budget if budget is not None else self.max_length - min(self.max_answer_length, self.max_length // 2)
        ids = self.template.ids(text, budget)
        if ids is None:
            raise ModelError(
                f"model.max_length={self.max_length} leaves no room for the message",
                fix="raise model.max_length or shorten the instruction",
            )
        return ids

    def training_ids(self, text: str, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(input ids, labels) with labels -100 on the prompt: the loss is on the answer only."""
        prompt = self.prompt_ids(text)
        answer = self.answer_ids(record)
        return prompt + answer, [-100] * len(prompt) + answer


class TokenClasses:
    """Which vocabulary tokens may appear inside a number or a string, computed once."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        special = set(tokenizer.all_special_ids)
        known = min(vocab_size, len(tokenizer))
        # One batched (Rust) decode of every single token: seconds faster than a Python loop of calls.
        texts = tokenizer.batch_decode([[i] for i in range(known)], clean_up_tokenization_spaces=False)
        digits, string_ok, lead = [False] * vocab_size, [False] * vocab_size, [False] * vocab_size
        lengths = [10**6] * vocab_size
        self.text: dict[int, str] = {}
        for i, text in enumerate(texts):
            if i in special or not text or "\ufffd" in text:
                continue
            self.text[i] = text
            if text.isascii() and text.isdigit():
                digits[i] = True
                # Digit tokens that may start a JSON number: no leading zero, except "0" itself.
                lead[i] = text == "0" or not text.startswith("0")
            if '"' not in text and "\\" not in text and all(ord(c) >= 32 and ord(c) != 127 for c in text):
                string_ok[i] = True
                lengths[i] = len(text)
        self.digits = torch.tensor(digits)
        self.lead_digits = torch.tensor(lead)
        self.string_ok = torch.tensor(string_ok)
        self.lengths = torch.tensor(lengths)
        self.digit_length = torch.where(self.digits, self.lengths, torch.zeros_like(self.lengths))


@dataclass
class Extraction:
    text: str
    record: dict[str, Any]
    answer: str
    valid: bool
    confidence: dict[str, float]


class _Session:
    """One decoding: the model's cache, tokens waiting to be fed, and the emitted tokens."""

    def __init__(self, model: Any, prompt: list[int], device: str) -> None:
        self.model = model
        self.device = device
        self.pending = list(prompt)
        self.cache: Any = None
        self.emitted: list[int] = []

    def force(self, ids: Sequence[int]) -> None:
        self.pending.extend(ids)
        self.emitted.extend(ids)

    def choose(self, allowed: torch.Tensor) -> tuple[int, float]:
        """Feed what is pending, then take the best allowed token; returns (token, log-prob)."""
        ids = torch.tensor([self.pending], device=self.device)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        logits = out.logits[0, -1].float()
        masked = torch.full_like(logits, -math.inf)
        masked[allowed] = logits[allowed]
        logp = torch.log_softmax(masked, dim=-1)
        token = int(torch.argmax(logp))
        self.pending = [token]
        self.emitted.append(token)
        return token, float(logp[token])


class ConstrainedDecoder:
    """Greedy decoding of one record per text, walking the schema's state machine."""

    def __init__(self, model: Any, fmt: RecordFormat, device: str = "cpu") -> None:
        self.model = model
        self.fmt = fmt
        self.task = fmt.task
        self.device = device
        vocab = int(model.get_output_embeddings().weight.shape[0])
        self.classes = TokenClasses(fmt.tokenizer, vocab)
        self.vocab = vocab
        self.minus = fmt.encode("-")
        self.dot = fmt.encode(".")
        self.tries = {spec.name: fmt.choice_ids(spec) for spec in self.task.fields if spec.type in ("enum", "boolean")}
        self.null_ids = fmt.encode("null")

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(sorted(set(ids)), dtype=torch.long, device=self.device)

    def _trie(self, s: _Session, choices: list[tuple[Any, list[int]]]) -> tuple[Any, float]:
        live = list(choices)
        logp, k = 0.0, 0
        while True:
            done = [c for c in live if len(c[1]) == k]
            if done:  # a token sequence that ends here is no prefix of another (JSON values close)
                return done[0][0], logp
            nexts = {c[1][k] for c in live}
            if len(nexts) == 1:
                token = next(iter(nexts))
                s.force([token])
            else:
                token, lp = s.choose(self._ids(sorted(nexts)))
                logp += lp
            live = [c for c in live if c[1][k] == token]
            k += 1

    def _null_or(self, s: _Session, spec: FieldSpec, first: torch.Tensor) -> tuple[bool, float, int]:
        """Choose between null (when optional) and the tokens in `first`; returns (is_null, logp, token)."""
        allowed = first
        if not spec.required:
            allowed = torch.cat([first, self._ids(self.null_ids[:1])])
        token, lp = s.choose(allowed)
        if not spec.required and token == self.null_ids[0] and not bool((first == token).any()):
            s.force(self.null_ids[1:])
            return True, lp, token
        return False, lp, token

    def _number(self, s: _Session, spec: FieldSpec, end: int) -> tuple[Any, float]:
        """JSON numbers only: -?(0|[1-9][0-9]*)(.[0-9]+)?, so a leading zero never starts more digits."""
        c = self.classes
        digit_ids = torch.nonzero(c.digits).flatten().to(self.device)
        lead = torch.nonzero(c.lead_digits & (c.digit_length <= spec.max_digits)).flatten().to(self.device)
        first = torch.cat([lead, self._ids(self.minus)]) if len(self.minus) == 1 else lead
        is_null, logp, token = self._null_or(s, spec, first)
        if is_null:
            return None, logp
        text = c.text[token]
        dot_ok = spec.type == "number" and len(self.dot) == 1
        while True:
            whole, dot, frac = text.lstrip("-").partition(".")
            room = spec.max_digits - len(whole) - len(frac)
            options = []
            if room > 0 and not (whole == "0" and not dot):
                pool = lead if not whole else digit_ids
                options.append(pool[c.digit_length[pool] <= room])
            if text[-1:].isdigit():
                options.append(self._ids([end]))
                if dot_ok and not dot and room > 0:
                    options.append(self._ids(self.dot))
            token, lp = s.choose(torch.cat(options))
            logp += lp
            if token == end:
                s.emitted.pop()  # the caller forces the whole next literal, this token included
                s.pending = []
                return (json.loads(text) if spec.type == "number" else int(text)), logp
            text += c.text[token]

    def _string(self, s: _Session, spec: FieldSpec) -> tuple[Any, float]:
        is_null, logp, _ = self._null_or(s, spec, self._ids([self.fmt.quote_id]))
        if is_null:
            return None, logp
        text = ""
        quote = self._ids([self.fmt.quote_id])
        while True:
            room = spec.max_length - len(text)
            ok = torch.nonzero(self.classes.string_ok & (self.classes.lengths <= room)).flatten().to(self.device)
            token, lp = s.choose(torch.cat([ok, quote]))
            logp += lp
            if token == self.fmt.quote_id:
                return text, logp
            text += self.classes.text[token]

    @torch.inference_mode()
    def decode(self, text: str) -> Extraction:
        fmt = self.fmt
        s = _Session(self.model, fmt.prompt_ids(text), self.device)
        record: dict[str, Any] = {}
        confidence: dict[str, float] = {}
        for i, spec in enumerate(self.task.fields):
            s.force(fmt.literal_ids[i])
            if spec.name in self.tries:
                value, logp = self._trie(s, self.tries[spec.name])
            elif spec.type == "string":
                value, logp = self._string(s, spec)
            else:
                value, logp = self._number(s, spec, fmt.literal_ids[i + 1][0])
            record[spec.name] = value
            confidence[spec.name] = math.exp(logp)
        s.force(fmt.literal_ids[-1])
        answer = fmt.tokenizer.decode(s.emitted, clean_up_tokenization_spaces=False)
        try:
            parsed = self.task.parse(answer)
            valid = parsed == record
        except ValueError:
            parsed, valid = record, False
        if not valid:
            log.error("constrained decoding produced an invalid answer for %r: %s", text, answer)
        return Extraction(text, parsed, answer, valid, confidence)


class Extractor:
    """A trained extraction run: `extract(texts)` returns one schema-valid record per text."""

    def __init__(self, model: Any, fmt: RecordFormat, device: str = "cpu", version: str = "unversioned") -> None:
        model.eval()
        self.fmt = fmt
        self.task = fmt.task
        self.decoder = ConstrainedDecoder(model, fmt, device)
        self.version = version

    def extract(self, texts: Sequence[str], *, progress: Callable[[int, int], None] | None = None) -> list[Extraction]:
        """One record per text, in order; `progress(done, total)` after each."""
        out = []
        for text in texts:
            out.append(self.decoder.decode(text))
            if progress is not None:
                progress(len(out), len(texts))
        return out

    def __call__(self, text: str) -> Extraction:
        return self.decoder.decode(text)

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str | None = None, dtype: str = "auto") -> Extractor:
        from peft import PeftModel

        from taskling.model.loader import base_path, default_device, load_model, pick_dtype

        manifest = read_extraction_manifest(run_dir)
        device = device or default_device()
        base = load_model(base_path(manifest), pick_dtype(dtype), device)
        model = PeftModel.from_pretrained(base, str(RunDir(run_dir).adapter)).merge_and_unload()
        return cls(model, run_record_format(run_dir, manifest), device, adapter_version(run_dir))


def read_extraction_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished extraction run (a RunError for anything else)."""
    return read_manifest(run_dir, kind=EXTRACTION)


def run_record_format(run_dir: str | Path, manifest: dict[str, Any]) -> RecordFormat:
    from taskling.model.loader import load_tokenizer

    tokenizer = load_tokenizer(str(RunDir(run_dir).tokenizer), manifest.get("chat_template"))
    task = ExtractionTask.model_validate(manifest["task"])
    return RecordFormat(tokenizer, task, int(manifest["max_length"]))
