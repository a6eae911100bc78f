"""QLoRA's frozen base: the decoder's linear weights in 4-bit NormalFloat (NF4), via torchao.

`quantize_nf4(model)` swaps the weight of every `nn.Linear` inside the decoder for a
torchao `NF4Tensor` parameter that does not require grad: 4 bits per weight plus one
double-quantized scale per block of 64, about 0.27x of bf16's bytes. `F.linear` on such a
weight dequantizes block by block (torchao implements it for the tensor type), so peft's
LoRA layers wrap these modules unchanged and train in their own precision on top. The
embeddings and the LM head stay as they are (tied to the embeddings in small models).

torchao's NF4 is plain PyTorch: it runs on the CPU too (slowly), which is what the tests use.

Inference, not training: `quantize_int8(model, backend)` runs a merged classifier's decoder
linear layers in dynamic int8 on the CPU (`--quantize int8` or `int8-torchao`; see there).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch

from taskling.errors import ConfigError, RunError

log = logging.getLogger(__name__)

QUANTIZE_BACKENDS = ("nf4",)
NF4_BLOCK = 64  # weights per 4-bit block (one scale each), as in the QLoRA paper
NF4_SCALER_BLOCK = 256  # block scales per double-quantization block, at most


def nf4_module() -> Any:
    """torchao's quantization package, or a ConfigError saying how to install it."""
    try:
        import torchao.quantization as tq
    except ImportError as err:
        raise ConfigError(
            f"model.quantize=nf4 needs torchao, which is not installed ({err})",
            fix="pip install 'taskling[gpu]' (or: pip install torchao), or remove model.quantize",
        ) from None
    return tq


def nf4_supported(weight: torch.Tensor) -> bool:
    """NF4 needs whole 64-weight blocks; the scales are double-quantized in groups."""
    return weight.dim() == 2 and weight.numel() % NF4_BLOCK == 0


def to_nf4(weight: torch.Tensor) -> Any:
    """`weight` as a torchao NF4Tensor (blocks of 64, scales double-quantized in groups of <= 256)."""
    tq = nf4_module()
    scaler_block = math.gcd(weight.numel() // NF4_BLOCK, NF4_SCALER_BLOCK)
    return tq.to_nf4(weight.detach(), NF4_BLOCK, scaler_block)


def nf4_roundtrip_error(weight: torch.Tensor) -> float:
    """Relative Frobenius error of `weight` after NF4 quantization and back."""
    restored = to_nf4(weight).get_original_weight().float()
    original = weight.detach().float()
    return float((restored - original).norm() / original.norm().clamp_min(1e-12))


def quantize_nf4(model: Any) -> int:
    """Freeze the decoder's linear weights in NF4, in place; returns how many layers were quantized.

    Call it before adding LoRA. Layers whose size is not a whole number of 64-weight blocks
    stay as they are (logged).
    """
    nf4_module()
    decoder = model.get_decoder()
    done, kept = 0, []
    for name, module in decoder.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not nf4_supported(module.weight):
            kept.append(name)
            continue
        module.weight = torch.nn.Parameter(to_nf4(module.weight), requires_grad=False)
        done += 1
    if kept:
        log.warning("NF4: %d linear layers kept unquantized (size not a multiple of 64): %s", len(kept), kept[:5])
    log.info("NF4: %d decoder linear layers quantized to 4 bits", done)
    return done


def check_quantize(quantize: str | None) -> None:
    """Fail early (before loading a model) when the chosen backend cannot run here."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_BACKENDS:
        raise ConfigError(f"model.quantize={quantize!r} is not supported", fix="use model.quantize: nf4, or remove it")
    nf4_module()


# "int8": torch.ao's dynamic int8 (deprecated, faster on the CPUs measured); "int8-torchao": its successor.
QUANTIZE_MODES = ("int8", "int8-torchao")
# MLP output projections (Llama/Qwen/Gemma `down_proj`, GPT-style `fc2`/`c_proj`): their inputs
# carry the activation outliers that a per-row int8 activation scale clips. On the demo run,
# quantizing them too cost 4.8 points of accuracy; leaving them in float32 cost 0.3.
INT8_KEEP_FLOAT = ("down_proj", "fc2", "c_proj", "w2")


def quantize_int8(model: Any, backend: str = "int8") -> Any:
    """Dynamic int8 for the decoder's linear layers, in place (CPU, float32 model, merged adapter).

    Weights per output channel once, activations per row on the fly. `backend="int8"`: torch's
    deprecated `quantize_dynamic` (fbgemm); `"int8-torchao"`: torchao's maintained
    `Int8DynamicActivationInt8WeightConfig`, closer to float32 but slower when run eagerly.
    Embeddings, LM head and MLP output projections stay float32. Measured: docs/serve.md.
    """
    if backend == "int8-torchao":
        return quantize_int8_torchao(model)
    decoder = model.get_decoder()
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as err:  # pragma: no cover - present in the torch pinned here
        raise RunError("this torch build has no dynamic int8 quantization", fix="classify without --quantize") from err
    names = [
        name
        for name, module in decoder.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith(INT8_KEEP_FLOAT)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices (kept working in 2.13)
        quantize_dynamic(decoder, dict.fromkeys(names, per_channel_dynamic_qconfig), inplace=True)
    return model


def quantize_int8_torchao(model: Any) -> Any:
    """`quantize_int8` through torchao (`quantize="int8-torchao"`); needs `pip install torchao`."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise RunError(
            "--quantize int8-torchao needs torchao", fix="pip install torchao (or use --quantize int8)"
        ) from None

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not name.endswith(INT8_KEEP_FLOAT)

    # set_inductor_config=False: this path runs eagerly and must not change global torch settings.
    quantize_(model.get_decoder(), Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), filter_fn=wanted)
    return model
