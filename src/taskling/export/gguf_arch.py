"""The architectures the built-in GGUF writer knows, written the way llama.cpp expects them.

Each entry follows llama.cpp's `convert_hf_to_gguf.py` for that class:

- `LlamaForCausalLM` (SmolLM2, TinyLlama, Llama 2, Llama 3.x): GGUF arch `llama`; q/k rows
  permuted into llama.cpp's interleaved rotary layout; Llama 3's `rope_type: llama3` written
  as a `rope_freqs` tensor of per-frequency divisors (`LlamaModel.generate_extra_tensors`),
  linear scaling as `rope.scaling.type/factor`.
- `Qwen3ForCausalLM`: arch `qwen3`; NeoX rotary (no permutation); the per-head q/k RMS norms
  (`attn_q_norm`, `attn_k_norm`); `attention.key_length`/`value_length` = `head_dim`.
- `Gemma3ForCausalLM`: arch `gemma3`; every `*norm.weight` stored as 1 + w (Gemma's RMSNorm
  multiplies by 1 + w, llama.cpp's by w); `sliding_window`; the global rope base
  (`rope.freq_base`). The embedding scale sqrt(hidden_size) is applied by both runtimes, not
  stored. llama.cpp hard-codes the rest for Gemma 3 (every 6th layer global, local rope base
  10000, attention scale 1/sqrt(head_dim)), so a config that differs is refused, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from taskling.export.common import ExportError

SUPPORTED = (
    "LlamaForCausalLM (SmolLM2, TinyLlama, Llama 2, Llama 3.x), Qwen3ForCausalLM and Gemma3ForCausalLM "
    "(Gemma 3 270M-4B text)"
)
GEMMA3_SWA_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6) for LLM_ARCH_GEMMA3
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp: rope_freq_base_train_swa for Gemma 3


@dataclass(frozen=True)
class GgufArch:
    """How one Hugging Face architecture maps onto a llama.cpp architecture."""

    hf_class: str
    gguf_name: str  # general.architecture
    permute_qk: bool  # llama.cpp's `llama` graph wants interleaved rotary pairs
    norm_shift: float  # added to every `*norm.weight` (Gemma: 1.0)


ARCHS = {
    "llama": GgufArch("LlamaForCausalLM", "llama", permute_qk=True, norm_shift=0.0),
    "qwen3": GgufArch("Qwen3ForCausalLM", "qwen3", permute_qk=False, norm_shift=0.0),
    "gemma3_text": GgufArch("Gemma3ForCausalLM", "gemma3", permute_qk=False, norm_shift=1.0),
}


def rope_params(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The rope parameters of `config` (transformers 5 nests them per layer type for Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _gemma3_problems(config: Any) -> list[str]:
    problems = []
    expected = [
        "full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]
    if list(getattr(config, "layer_types", expected)) != expected:
        problems.append("its layer_types are not llama.cpp's fixed pattern (every 6th layer global)")
    if float(rope_params(config, "sliding_attention")["rope_theta"]) != GEMMA3_LOCAL_ROPE_BASE:
        problems.append("its local rope base is not 10000")
    if float(config.query_pre_attn_scalar) != float(head_dim(config)):
        problems.append("query_pre_attn_scalar differs from head_dim (llama.cpp scales by 1/sqrt(head_dim))")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append("it uses attention logit soft-capping")
    return problems


def arch_for(model: Any) -> GgufArch:
    """The writer's description of `model`'s architecture, or a refusal naming what differs."""
    config = model.config
    kind = type(model).__name__
    spec = ARCHS.get(config.model_type)
    if spec is None or spec.hf_class != kind:
        raise ExportError(
            f"GGUF export supports {SUPPORTED}; the base is {kind} ({config.model_type})",
            fix="export with --to merged (safetensors) or --to vllm, which take any architecture; "
            "or install llama.cpp (TASKLING_LLAMA_CPP=/path/to/llama.cpp) to use its converter",
        )
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("the base has attention or MLP biases")
    rope_type = rope_params(config)["rope_type"]
    allowed = ("default", "linear", "llama3") if spec.gguf_name == "llama" else ("default", "linear")
    if rope_type not in allowed:
        problems.append(f"the base uses rope scaling {rope_type!r} (supported here: {', '.join(allowed)})")
    if spec.gguf_name == "gemma3":
        problems += _gemma3_problems(config)
    if problems:
        raise ExportError(
            f"GGUF export of {kind}: " + "; ".join(problems),
            fix="export with --to merged or --to vllm, or use llama.cpp's converter (TASKLING_LLAMA_CPP)",
        )
    return spec


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF's rotary layout (halves) to llama.cpp's (interleaved pairs), per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def transform(spec: GgufArch, config: Any, hf_name: str, data: np.ndarray) -> np.ndarray:
    """A Hugging Face tensor as llama.cpp stores it for this architecture."""
    if spec.permute_qk and hf_name.endswith("self_attn.q_proj.weight"):
        data = permute(data, config.num_attention_heads, config.num_attention_heads)
    elif spec.permute_qk and hf_name.endswith("self_attn.k_proj.weight"):
        data = permute(data, config.num_attention_heads, config.num_key_value_heads)
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        data = data + np.float32(spec.norm_shift)
    return data


def rope_freq_factors(model: Any) -> np.ndarray | None:
    """llama.cpp's `rope_freqs` (per-frequency divisors) for Llama 3 rope scaling, else None.

    Derived from the model's own rotary embedding: default inverse frequencies divided by
    the ones transformers computed for `rope_type: llama3`, so both runtimes rotate alike.
    """
    params = rope_params(model.config)
    if params["rope_type"] != "llama3":
        return None
    dim = head_dim(model.config)
    theta = float(params["rope_theta"])
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    actual = model.model.rotary_emb.inv_freq.detach().float().cpu()
    if abs(float(getattr(model.model.rotary_emb, "attention_scaling", 1.0)) - 1.0) > 1e-6:
        raise ExportError("Llama 3 rope scaling with an attention factor cannot be written as rope_freqs")
    return (default / actual).numpy().astype(np.float32)


def expected_hparams(model: Any, spec: GgufArch) -> dict[str, Any]:
    """The `ARCH.*` metadata llama.cpp reads, keyed without the architecture prefix."""
    config = model.config
    params = rope_params(config)
    hp: dict[str, Any] = {
        "context_length": int(config.max_position_embeddings),
        "embedding_length": int(config.hidden_size),
        "block_count": int(config.num_hidden_layers),
        "feed_forward_length": int(config.intermediate_size),
        "attention.head_count": int(config.num_attention_heads),
        "attention.head_count_kv": int(config.num_key_value_heads),
        "rope.dimension_count": head_dim(config),
        "rope.freq_base": float(params["rope_theta"]),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
    }
    if spec.gguf_name != "llama" or head_dim(config) * config.num_attention_heads != config.hidden_size:
        hp["attention.key_length"] = head_dim(config)
        hp["attention.value_length"] = head_dim(config)
    if params["rope_type"] == "linear":
        hp["rope.scaling.type"] = "linear"
        hp["rope.scaling.factor"] = float(params["factor"])
    if spec.gguf_name == "gemma3":
        hp["attention.sliding_window"] = int(config.sliding_window)
        if getattr(config, "final_logit_softcapping", None):
            hp["final_logit_softcapping"] = float(config.final_logit_softcapping)
    return hp


def write_hparams(writer: Any, hparams: dict[str, Any]) -> None:
    """Write `expected_hparams` with the gguf package's typed setters."""
    import gguf

    setters = {
        "context_length": writer.add_context_length,
        "embedding_length": writer.add_embedding_length,
        "block_count": writer.add_block_count,
        "feed_forward_length": writer.add_feed_forward_length,
        "attention.head_count": writer.add_head_count,
        "attention.head_count_kv": writer.add_head_count_kv,
        "rope.dimension_count": writer.add_rope_dimension_count,
        "rope.freq_base": writer.add_rope_freq_base,
        "attention.layer_norm_rms_epsilon": writer.add_layer_norm_rms_eps,
        "vocab_size": writer.add_vocab_size,
        "attention.key_length": writer.add_key_length,
        "attention.value_length": writer.add_value_length,
        "rope.scaling.type": lambda v: writer.add_rope_scaling_type(gguf.RopeScalingType(v)),
        "rope.scaling.factor": writer.add_rope_scaling_factor,
        "attention.sliding_window": writer.add_sliding_window,
        "final_logit_softcapping": writer.add_final_logit_softcapping,
    }
    for key, value in hparams.items():
        setters[key](value)
