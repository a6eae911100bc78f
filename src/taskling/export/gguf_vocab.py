"""The tokenizer a GGUF file describes: llama.cpp's `tokenizer.ggml.*` metadata.

Two tokenizer families, as llama.cpp's converter writes them:

- byte-level BPE (`tokenizer.ggml.model = gpt2`): vocab, merges, token types and the
  pre-tokenizer by name. The name is read off the tokenizer's own split rule: the plain
  GPT-2 rule is `gpt-2` (SmolLM2, the test model), Llama 3's regex is `llama-bpe`, Qwen's is
  `qwen2`. Any other split rule is refused: llama.cpp would split text differently.
- SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model = llama`, Gemma 3):
  tokens in id order, `<0xNN>` byte tokens typed BYTE, and scores that rank each token by
  the merge that makes it (llama.cpp merges the highest-scoring pair first), no space prefix.
"""

from __future__ import annotations

import json
from typing import Any

from taskling.export.common import ExportError

_FIX = "export with --to merged or --to vllm"


def _byte_level_pre(spec: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json, or None if unknown."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers", [])
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return None
    if steps[1].get("use_regex", True) or steps[1].get("add_prefix_space", False):
        return None
    regex = (steps[0].get("pattern") or {}).get("Regex")
    for name in ("llama-bpe", "qwen2"):
        if GGUF_PRE_TOKENIZER_SPLITS[name] == regex:
            return name
    return None


def _token_list(tokenizer: Any, spec: dict[str, Any], n_vocab: int, byte_type: bool) -> tuple[list[str], list[Any]]:
    import gguf

    vocab: dict[str, int] = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise ExportError(f"the tokenizer has {len(vocab)} tokens but the model only {n_vocab} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            token = by_id[i]
            tokens.append(token)
            is_byte = byte_type and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            types.append(gguf.TokenType.BYTE if is_byte else gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (padded vocabularies), as llama.cpp names them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    probe_with = tokenizer("a")["input_ids"]
    probe_without = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(probe_with) - len(probe_without)
    return (
        extra > 0 and probe_with[0] == tokenizer.bos_token_id,
        extra > 0 and probe_with[-1] == tokenizer.eos_token_id,
    )


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def tokenizer_metadata(tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's description of the run's tokenizer, or a refusal naming what differs.

    Keys: `model` (gpt2 | llama), `pre` (gpt2 only), `tokens`, `types`, `merges` (gpt2),
    `scores` (llama), `add_bos`, `add_eos`, `add_space_prefix` (llama).
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    add_bos, add_eos = _adds(tokenizer)
    if model.get("type") == "BPE" and not model.get("byte_fallback") and spec.get("normalizer") is None:
        pre = _byte_level_pre(spec)
        if pre is not None and decoder.get("type") == "ByteLevel":
            tokens, types = _token_list(tokenizer, spec, n_vocab, byte_type=False)
            merges = _merges(model)
            return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges,
                    "add_bos": add_bos, "add_eos": add_eos}  # fmt: skip
    if model.get("type") == "BPE" and model.get("byte_fallback") and _is_sentencepiece_like(spec):
        tokens, types = _token_list(tokenizer, spec, n_vocab, byte_type=True)
        rank = {m.replace(" ", ""): i for i, m in reversed(list(enumerate(_merges(model))))}
        scores = [-float(rank.get(t, len(rank))) if ty == 1 else 0.0 for t, ty in zip(tokens, types, strict=True)]
        return {"model": "llama", "tokens": tokens, "types": types, "scores": scores,
                "add_bos": add_bos, "add_eos": add_eos, "add_space_prefix": False}  # fmt: skip
    normalizer = (spec.get("normalizer") or {}).get("type")
    pre_type = (spec.get("pre_tokenizer") or {}).get("type")
    raise ExportError(
        "GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3 and Qwen split rules) and "
        "SentencePiece-style BPE with byte fallback (Gemma); this run's tokenizer is "
        f"model={model.get('type')}, pre_tokenizer={pre_type}, normalizer={normalizer}",
        fix=_FIX,
    )


def _is_sentencepiece_like(spec: dict[str, Any]) -> bool:
    """Spaces become U+2581 and nothing else rewrites the text (Gemma's tokenizer.json shape)."""
    normalizer = spec.get("normalizer") or {}
    pre = spec.get("pre_tokenizer") or {}
    replaces_space = normalizer.get("type") == "Replace" and normalizer.get("content") == "\u2581"
    splits_on_space = pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " "
    return bool(replaces_space and (not pre or splits_on_space or pre.get("type") is None))


def write_tokenizer(writer: Any, tokenizer: Any, tok: dict[str, Any], chat_template: str) -> None:
    """Write `tokenizer_metadata`'s result, the special ids and the chat template."""
    writer.add_tokenizer_model(tok["model"])
    if tok["model"] == "gpt2":
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_merges(tok["merges"])
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(tok["scores"])
        writer.add_add_space_prefix(tok["add_space_prefix"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    writer.add_add_bos_token(bool(tok["add_bos"]))
    writer.add_add_eos_token(bool(tok["add_eos"]))
    writer.add_chat_template(chat_template)
