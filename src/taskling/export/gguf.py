"""GGUF writing and checking for `taskling export --to gguf|ollama` (llama architecture).

Written with the `gguf` package the way llama.cpp's `convert_hf_to_gguf.py` writes a Llama:
tensor names from `gguf.TensorNameMap(MODEL_ARCH.LLAMA)`, the q/k projection rows permuted
into llama.cpp's rotary layout (`LlamaModel.permute`), 1-D tensors in f32, the byte-level
BPE tokenizer (vocab, merges, token types, special ids) and `tokenizer.chat_template`.

The check reads the file back twice: with `gguf.GGUFReader` (metadata and tensor list), and
with transformers' GGUF loader, an independent implementation that undoes the permutation.
Its logits must match the merged transformers model within `LOGIT_TOLERANCE`, and its
tokenizer must give the same ids as the run's tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskling.export.common import (
    LOGIT_TOLERANCE,
    WEIGHT_TOLERANCE,
    ExportError,
    RunInfo,
    compare_predictions,
    sample_texts,
)

log = logging.getLogger(__name__)

SUPPORTED = "llama-architecture models (LlamaForCausalLM: SmolLM2, Llama 2/3 without rope scaling, TinyLlama)"


def check_supported(model: Any) -> None:
    """Refuse what this writer cannot reproduce exactly, naming what it supports."""
    config = model.config
    kind = type(model).__name__
    problems = []
    if config.model_type != "llama" or kind != "LlamaForCausalLM":
        problems.append(f"the base is {kind} ({config.model_type})")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("the base has attention or MLP biases")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        problems.append(f"the base uses rope scaling {rope_type!r}")
    if problems:
        raise ExportError(
            f"GGUF export supports {SUPPORTED}; " + "; ".join(problems),
            fix="export with --to merged (safetensors) or --to vllm, which take any architecture",
        )


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF's rotary layout (halves) to llama.cpp's (interleaved pairs), per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def tokenizer_metadata(tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's `gpt2` tokenizer description of a byte-level BPE tokenizer, or a refusal."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre, decoder = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    # Only the plain GPT-2 byte-level shape maps onto a llama.cpp pre-tokenizer we can name
    # with certainty ("gpt-2"); anything else would tokenize differently at runtime.
    plain_byte_level = (
        model.get("type") == "BPE"
        and not model.get("byte_fallback")
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and decoder.get("type") == "ByteLevel"
    )
    if not plain_byte_level:
        normalizer = (spec.get("normalizer") or {}).get("type")
        raise ExportError(
            "GGUF export supports byte-level BPE tokenizers with the GPT-2 pre-tokenizer; this run's tokenizer is "
            f"model={model.get('type')}, pre_tokenizer={pre.get('type')}, normalizer={normalizer}",
            fix="export with --to merged or --to vllm",
        )
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
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (padded vocabularies), as llama.cpp names them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe_with = tokenizer("a")["input_ids"]
    probe_without = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(probe_with) - len(probe_without)
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "add_bos": extra > 0 and probe_with[0] == tokenizer.bos_token_id,
        "add_eos": extra > 0 and probe_with[-1] == tokenizer.eos_token_id,
    }


def write_gguf(model: Any, tokenizer: Any, chat_template: str, path: Path, quant: str, *, name: str) -> None:
    """Write `model` (a merged LlamaForCausalLM) with `tokenizer` and `chat_template` to `path`."""
    import gguf

    check_supported(model)
    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    state = model.state_dict()
    n_vocab = int(state["model.embed_tokens.weight"].shape[0])
    tok = tokenizer_metadata(tokenizer, n_vocab)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(f"taskling-{name}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    if head_dim * n_head != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    writer.add_add_bos_token(bool(tok["add_bos"]))
    writer.add_add_eos_token(bool(tok["add_eos"]))
    writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF tensor name for {hf_name}", fix=f"GGUF export supports {SUPPORTED}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = permute(data, n_head, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = permute(data, n_head, n_kv)
        qtype = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else gguf.GGMLQuantizationType.F16
        # q8_0 packs rows in blocks of 32; a row that does not divide stays f16, as in llama.cpp.
        if quant == "q8_0" and data.ndim > 1 and data.shape[-1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (%s, %d tensors)", path.name, quant, len(state) - int(tied))


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF file's architecture, chat template, tokenizer size and tensor types, via GGUFReader."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    return {
        "architecture": field("general.architecture"),
        "file_type": field("general.file_type"),
        "chat_template": field("tokenizer.chat_template"),
        "tokenizer_model": field("tokenizer.ggml.model"),
        "n_tokens": len(field("tokenizer.ggml.tokens") or []),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "tensors": {t.name: t.tensor_type.name for t in reader.tensors},
    }


def _probe_strings(run: RunInfo, texts: list[str]) -> list[str]:
    fmt = run.chat_format()
    prompts = [fmt._render(run.task.messages(t), True) for t in texts]
    answers = list(run.manifest["label_answers"].values())
    tricky = ["  two  spaces\nand\ttabs 12345 3.14", "ünïcode — 字 🙂", "<|im_start|>user\nhi<|im_end|>"]
    return prompts + answers + tricky


def compare_weights(merged: Any, loaded: Any) -> dict[str, Any]:
    """Largest per-tensor relative difference between the source weights and those read back."""
    source = merged.state_dict()
    worst, worst_name, compared = 0.0, "", 0
    for name, tensor in loaded.state_dict().items():
        if name not in source or "rotary_emb" in name:
            continue
        ref = source[name].detach().float()
        diff = float((tensor.detach().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        compared += 1
        if diff > worst:
            worst, worst_name = diff, name
    if compared < len([n for n in source if "rotary_emb" not in n]) - 1:  # -1: a tied lm_head
        raise ExportError(f"only {compared} of {len(source)} tensors could be matched after the GGUF round trip")
    return {"max_relative_diff": worst, "worst_tensor": worst_name, "compared": compared}


def check_gguf(path: Path, merged: Any, run: RunInfo, quant: str) -> dict[str, Any]:
    """Read `path` back and compare it with the merged model it was written from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from taskling.serve.classifier import Classifier

    meta = read_metadata(path)
    tied = bool(getattr(merged.config, "tie_word_embeddings", False))
    expected_tensors = sum(
        1 for n in merged.state_dict() if "rotary_emb" not in n and not (tied and n == "lm_head.weight")
    )
    if meta["architecture"] != "llama" or meta["chat_template"] != run.chat_template:
        raise ExportError(f"{path.name}: architecture or chat template did not survive the round trip")
    if len(meta["tensors"]) != expected_tensors:
        raise ExportError(f"{path.name}: {len(meta['tensors'])} tensors read back, {expected_tensors} written")

    texts = sample_texts(run)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    mismatched = [
        s
        for s in _probe_strings(run, texts)
        for special in (False, True)
        if list(gguf_tokenizer(s, add_special_tokens=special)["input_ids"])
        != list(run.tokenizer(s, add_special_tokens=special)["input_ids"])
    ]
    if mismatched:
        raise ExportError(f"{path.name}: the GGUF tokenizer gives different ids for {mismatched[:3]}")

    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    weights = compare_weights(merged, loaded)
    if weights["max_relative_diff"] > WEIGHT_TOLERANCE[quant]:
        raise ExportError(
            f"{path.name}: tensor {weights['worst_tensor']} differs from the merged model by "
            f"{weights['max_relative_diff']:.4f} (relative) after the round trip, above the {quant} "
            f"tolerance {WEIGHT_TOLERANCE[quant]}"
        )
    fmt = run.chat_format()
    worst, next_token_agree = 0.0, 0
    with torch.inference_mode():
        for text in texts[:4]:
            ids = torch.tensor([fmt.prompt_ids(text)])
            ref = merged(input_ids=ids).logits.float()
            got = loaded(input_ids=ids).logits.float()
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)))
            next_token_agree += int(ref[0, -1].argmax() == got[0, -1].argmax())
    if worst > LOGIT_TOLERANCE[quant]:
        raise ExportError(
            f"{path.name}: logits differ from the merged model by {worst:.4f} (relative), above the {quant} "
            f"tolerance {LOGIT_TOLERANCE[quant]}"
        )
    labels = compare_predictions(
        Classifier(merged, fmt, device="cpu").predict(texts), Classifier(loaded, fmt, device="cpu").predict(texts)
    )
    if quant == "f16" and labels["clear_disagreements"]:
        raise ExportError(f"{path.name}: the f16 GGUF changes clear answers: {labels['disagreements']}")
    return {
        "quant": quant,
        "file_type": meta["file_type"],
        "tensors": len(meta["tensors"]),
        "tensor_types": sorted(set(meta["tensors"].values())),
        "tokenizer_round_trip": True,
        "weights_max_relative_diff": round(weights["max_relative_diff"], 6),
        "weights_tolerance": WEIGHT_TOLERANCE[quant],
        "logits_max_relative_diff": round(worst, 6),
        "logits_tolerance": LOGIT_TOLERANCE[quant],
        "next_token_agree": f"{next_token_agree}/{min(len(texts), 4)}",
        "labels": labels,
        "runtime": "transformers GGUF loader",
    }
