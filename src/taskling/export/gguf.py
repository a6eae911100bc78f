"""GGUF writing and checking for `taskling export --to gguf|ollama`.

The built-in writer uses the `gguf` package the way llama.cpp's `convert_hf_to_gguf.py`
writes each supported architecture (`gguf_arch`: Llama incl. Llama 3 rope scaling, Qwen3,
Gemma 3): tensor names from `gguf.TensorNameMap`, the architecture's tensor transforms, its
hyperparameters, 1-D tensors in f32, the tokenizer (`gguf_vocab`) and `tokenizer.chat_template`.
It writes f16, q8_0 and q4_0; the gguf package has no Q4_K quantizer, so q4_K_M goes through
llama.cpp's `llama-quantize` (`llamacpp`).

The check reads the file back twice: with `gguf.GGUFReader` (metadata, hyperparameters and
tensor list), and with transformers' GGUF loader, an independent implementation that undoes
the permutation and Gemma's norm shift. Its logits must match the merged transformers model
within `LOGIT_TOLERANCE`, and its tokenizer must give the same ids as the run's tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
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
from taskling.export.gguf_arch import (
    SUPPORTED,
    GgufArch,
    arch_for,
    expected_hparams,
    rope_freq_factors,
    rope_params,
    transform,
    write_hparams,
)
from taskling.export.gguf_vocab import tokenizer_metadata, write_tokenizer

log = logging.getLogger(__name__)

# q8_0 and q4_0 pack rows in blocks of 32; llama.cpp keeps a row that does not divide in F16.
_BLOCK_QUANTS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
_FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_K_M": "MOSTLY_Q4_K_M"}


def tensor_type(quant: str, gguf_name: str, data: np.ndarray) -> Any:
    """The GGML type a tensor is stored in for `quant` (the built-in writer: f16, q8_0, q4_0)."""
    import gguf

    if data.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if quant not in _BLOCK_QUANTS or data.shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16
    if quant == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        # llama.cpp keeps the output projection at 6 bits (Q6_K) for q4 files; the gguf
        # package cannot write Q6_K, so it stays at 8 bits here.
        return gguf.GGMLQuantizationType.Q8_0
    return getattr(gguf.GGMLQuantizationType, _BLOCK_QUANTS[quant])


def gguf_tensors(model: Any, spec: GgufArch) -> Iterator[tuple[str, str, np.ndarray]]:
    """(hf name, GGUF name, data as llama.cpp stores it) for every tensor of `model`."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.gguf_name.upper()), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF tensor name for {hf_name}", fix=f"GGUF export supports {SUPPORTED}")
        yield hf_name, gguf_name, transform(spec, config, hf_name, tensor.detach().to(torch.float32).cpu().numpy())
    factors = rope_freq_factors(model)
    if factors is not None:
        yield "", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


def write_gguf(model: Any, tokenizer: Any, chat_template: str, path: Path, quant: str, *, name: str) -> None:
    """Write `model` (a merged model of a supported architecture) with `tokenizer` and `chat_template`."""
    import gguf

    if quant not in _BLOCK_QUANTS and quant != "f16":
        raise ExportError(
            f"the built-in GGUF writer cannot write {quant}: the gguf package has no {quant} quantizer",
            fix="install llama.cpp (set TASKLING_LLAMA_CPP to its directory) or use --quant f16, q8_0 or q4_0",
        )
    spec = arch_for(model)
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    tok = tokenizer_metadata(tokenizer, n_vocab)

    writer = gguf.GGUFWriter(str(path), spec.gguf_name)
    writer.add_name(f"taskling-{name}")
    write_hparams(writer, expected_hparams(model, spec))
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, tokenizer, tok, chat_template)

    count = 0
    for _, gguf_name, data in gguf_tensors(model, spec):
        qtype = tensor_type(quant, gguf_name, data)
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (%s, %s, %d tensors)", path.name, spec.gguf_name, quant, count)


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF file's architecture, hyperparameters, chat template, tokenizer size and tensor types."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    arch = field("general.architecture")
    rope_freqs = next(
        (np.array(t.data, dtype=np.float32) for t in reader.tensors if t.name == "rope_freqs.weight"), None
    )
    return {
        "architecture": arch,
        "hparams": {k[len(arch) + 1 :]: f.contents() for k, f in reader.fields.items() if k.startswith(f"{arch}.")},
        "file_type": field("general.file_type"),
        "chat_template": field("tokenizer.chat_template"),
        "tokenizer_model": field("tokenizer.ggml.model"),
        "n_tokens": len(field("tokenizer.ggml.tokens") or []),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "tensors": {t.name: t.tensor_type.name for t in reader.tensors},
        "rope_freqs": rope_freqs,
    }


def check_hparams(path: Path, meta: dict[str, Any], merged: Any) -> dict[str, Any]:
    """Every hyperparameter llama.cpp reads is what the merged model uses.

    Compared twice: with the table the writer works from, and with the config transformers'
    GGUF reader builds from the file on its own (for the keys it maps).
    """
    from transformers import AutoConfig

    spec = arch_for(merged)
    if meta["architecture"] != spec.gguf_name:
        raise ExportError(f"{path.name}: architecture {meta['architecture']!r}, expected {spec.gguf_name!r}")
    expected = expected_hparams(merged, spec)
    wrong = {k: (meta["hparams"].get(k), v) for k, v in expected.items() if not _same(meta["hparams"].get(k), v)}
    parsed = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    fields = ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "rms_norm_eps", "max_position_embeddings"]  # fmt: skip
    if spec.gguf_name == "gemma3":
        fields.append("sliding_window")
    wrong |= {
        f: (getattr(parsed, f), getattr(merged.config, f))
        for f in fields
        if not _same(getattr(parsed, f), getattr(merged.config, f))
    }
    if not _same(rope_params(parsed)["rope_theta"], rope_params(merged.config)["rope_theta"]):
        wrong["rope_theta"] = (rope_params(parsed)["rope_theta"], rope_params(merged.config)["rope_theta"])
    if wrong:
        raise ExportError(f"{path.name}: hyperparameters read back differ (file, model): {wrong}")
    llama3 = rope_params(merged.config)["rope_type"] == "llama3"
    if llama3 != (meta["rope_freqs"] is not None):
        raise ExportError(f"{path.name}: rope_freqs is {'missing' if llama3 else 'unexpected'} for this rope type")
    return {"architecture": spec.gguf_name, "hparams": len(expected), "rope_freqs": meta["rope_freqs"] is not None}


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, float) or isinstance(a, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return bool(a == b)


def load_as_llamacpp(path: Path, merged: Any, meta: dict[str, Any]) -> Any:
    """The GGUF's weights decoded by transformers' GGUF loader into the merged model's architecture.

    transformers undoes llama.cpp's q/k permutation and Gemma's norm shift on its own. A
    `rope_freqs` tensor is applied as llama.cpp applies it (each inverse frequency divided by
    its factor), on top of the file's plain rope base, so a wrong factor shows in the logits.
    """
    import copy

    from transformers import AutoModelForCausalLM, GgufConfig

    config = copy.deepcopy(merged.config)
    if meta["rope_freqs"] is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": float(meta["hparams"]["rope.freq_base"])}
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    ).eval()  # fmt: skip
    if meta["rope_freqs"] is not None:
        rotary = loaded.model.rotary_emb
        scaled = rotary.inv_freq / torch.from_numpy(meta["rope_freqs"])
        rotary.inv_freq = scaled
        rotary.original_inv_freq = scaled.clone()
    return loaded


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


def check_tokenizer(path: Path, run: RunInfo, texts: list[str]) -> None:
    """The tokenizer transformers builds from the file gives the run tokenizer's ids."""
    from transformers import AutoTokenizer

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


def check_gguf(path: Path, merged: Any, run: RunInfo, quant: str) -> dict[str, Any]:
    """Read `path` back and compare it with the merged model it was written from."""
    from taskling.serve.classifier import Classifier

    meta = read_metadata(path)
    tied = bool(getattr(merged.config, "tie_word_embeddings", False))
    expected_tensors = sum(
        1 for n in merged.state_dict() if "rotary_emb" not in n and not (tied and n == "lm_head.weight")
    ) + int(rope_freq_factors(merged) is not None)
    if meta["chat_template"] != run.chat_template:
        raise ExportError(f"{path.name}: the chat template did not survive the round trip")
    if len(meta["tensors"]) != expected_tensors:
        raise ExportError(f"{path.name}: {len(meta['tensors'])} tensors read back, {expected_tensors} expected")
    hparams = check_hparams(path, meta, merged)
    texts = sample_texts(run)
    check_tokenizer(path, run, texts)
    loaded = load_as_llamacpp(path, merged, meta)
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
        **hparams,
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
