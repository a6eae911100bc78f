"""QLoRA's frozen base: the decoder's linear weights in 4-bit NormalFloat (NF4), via torchao.

`quantize_nf4(model)` swaps the weight of every `nn.Linear` inside the decoder for a
torchao `NF4Tensor` parameter that does not require grad: 4 bits per weight plus one
double-quantized scale per block of 64, about 0.27x of bf16's bytes. `F.linear` on such a
weight dequantizes block by block (torchao implements it for the tensor type), so peft's
LoRA layers wrap these modules unchanged and train in their own precision on top. The
embeddings and the LM head stay as they are (tied to the embeddings in small models).

torchao's NF4 is plain PyTorch: it runs on the CPU too (slowly), which is what the tests use.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from taskling.errors import ConfigError

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
