"""Base-model presets: the chat template, LoRA targets and settings that suit each family.

`model.base` selects a preset by its Hugging Face id (`Qwen/Qwen3-0.6B`) or its alias
(`qwen3-0.6b`). `apply_preset(config)` swaps an alias for the hub id and fills every setting
the config leaves unset (`model.chat_template`, `model.max_length`, `model.quantize`,
`lora.r`, `lora.alpha`, `lora.dropout`, `lora.target_modules`); a value the user wrote always
wins. A base with no preset is left as it is.

The chat templates are the families' own turn formats without the extras a classifier must
not learn (Qwen3's `<think>` block, Llama 3's knowledge-cutoff system text, Phi's tool
schema): a label is then one short assistant turn ending in the family's end-of-turn token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from taskling.config import ProjectConfig
from taskling.model.chat_templates import GEMMA3

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PHI4 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Attention and MLP projections, by the names each family's modules carry.
SPLIT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Preset:
    alias: str
    hub_id: str
    family: str  # qwen3 | llama3.2 | gemma3 | phi4-mini
    chat_template: str
    target_modules: tuple[str, ...]
    r: int
    alpha: int
    dropout: float
    max_length: int
    # "nf4" (QLoRA) where bf16 weights plus activations outgrow a 16 GB GPU in training.
    quantize: str | None = None
    gguf: bool = True  # the built-in GGUF writer takes this architecture


def _preset(alias: str, hub_id: str, family: str, template: str, size_b: float, **extra: object) -> Preset:
    targets = PHI3_PROJECTIONS if family == "phi4-mini" else SPLIT_PROJECTIONS
    # Rank 16 / alpha 32 is the common LoRA recipe; small bases gain from a higher rank less
    # than large ones lose from memory, so it stays 16 up to 8B with QLoRA from 4B.
    settings: dict[str, object] = {
        "r": 16,
        "alpha": 32,
        "dropout": 0.0,
        "max_length": 256,
        "quantize": "nf4" if size_b >= 4 else None,
    }
    settings.update(extra)
    return Preset(alias, hub_id, family, template, targets, **settings)  # type: ignore[arg-type]


PRESETS: tuple[Preset, ...] = (
    _preset("qwen3-0.6b", "Qwen/Qwen3-0.6B", "qwen3", CHATML, 0.6),
    _preset("qwen3-1.7b", "Qwen/Qwen3-1.7B", "qwen3", CHATML, 1.7),
    _preset("qwen3-4b", "Qwen/Qwen3-4B", "qwen3", CHATML, 4),
    _preset("qwen3-8b", "Qwen/Qwen3-8B", "qwen3", CHATML, 8),
    _preset("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "llama3.2", LLAMA3, 1),
    _preset("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "llama3.2", LLAMA3, 3),
    _preset("gemma3-270m", "google/gemma-3-270m-it", "gemma3", GEMMA3, 0.27, r=8, alpha=16),
    _preset("gemma3-1b", "google/gemma-3-1b-it", "gemma3", GEMMA3, 1),
    # Gemma 3 4B is multimodal (Gemma3ForConditionalGeneration): GGUF export takes the text models only.
    _preset("gemma3-4b", "google/gemma-3-4b-it", "gemma3", GEMMA3, 4, gguf=False),
    # Phi-4-mini: fused qkv / gate_up projections, LongRoPE; export with --to merged or vllm.
    _preset("phi4-mini", "microsoft/Phi-4-mini-instruct", "phi4-mini", PHI4, 3.8, gguf=False),
)


def find_preset(base: str) -> Preset | None:
    """The preset for a base spec (alias or hub id, case-insensitive), or None."""
    key = base.strip().lower()
    return next((p for p in PRESETS if key in (p.alias, p.hub_id.lower())), None)


def apply_preset(config: ProjectConfig) -> ProjectConfig:
    """`config` with its base's preset filling every unset model/LoRA setting (see module doc)."""
    preset = find_preset(config.model.base)
    if preset is None:
        return config
    model_set, lora_set = config.model.model_fields_set, config.lora.model_fields_set
    model_fill = {"base": preset.hub_id}
    for key, value in (
        ("chat_template", preset.chat_template),
        ("max_length", preset.max_length),
        ("quantize", preset.quantize),
    ):
        if key not in model_set:
            model_fill[key] = value  # type: ignore[assignment]
    lora_fill = {
        key: value
        for key, value in (
            ("r", preset.r),
            ("alpha", preset.alpha),
            ("dropout", preset.dropout),
            ("target_modules", list(preset.target_modules)),
        )
        if key not in lora_set
    }
    log.info("model.base %s: preset %s (%s)", config.model.base, preset.alias, preset.hub_id)
    model = config.model.model_copy(update=model_fill)
    model.__pydantic_fields_set__ = set(model_set)  # filled values stay defaults, not user choices
    lora = config.lora.model_copy(update=lora_fill)
    lora.__pydantic_fields_set__ = set(lora_set)
    return config.model_copy(update={"model": model, "lora": lora})
