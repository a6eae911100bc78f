"""int8 CPU inference, both paths: torch.ao's `quantize_dynamic` (default) and torchao's `quantize_`.

On the tiny model: which layers are quantized, and how far their probabilities move from float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskling.errors import RunError
from taskling.model.quantize import INT8_KEEP_FLOAT
from taskling.serve.classifier import Classifier

TEXTS = ["check my balance", "set a timer for ten minutes", "will it rain tomorrow", "play some jazz", "hi"] * 2


@pytest.fixture(scope="module")
def float32(trained_run: Path) -> Classifier:
    return Classifier.from_run(trained_run, device="cpu", dtype="float32", threads=1)


def linears(clf: Classifier) -> dict[str, torch.nn.Module]:
    decoder = clf.model.get_decoder()
    return {name: m for name, m in decoder.named_modules() if name.endswith(("q_proj", "up_proj", "down_proj"))}


def max_probability_change(a: Classifier, b: Classifier) -> tuple[float, int]:
    pa, pb = a.predict(TEXTS), b.predict(TEXTS)
    diff = max(
        abs(x.probabilities[k] - y.probabilities[k]) for x, y in zip(pa, pb, strict=True) for k in x.probabilities
    )
    return diff, sum(x.label == y.label for x, y in zip(pa, pb, strict=True))


@pytest.mark.parametrize("mode", ["int8", "int8-torchao"])
def test_int8_quantizes_the_decoder_and_stays_close_to_float32(
    trained_run: Path, float32: Classifier, mode: str
) -> None:
    if mode == "int8-torchao":
        pytest.importorskip("torchao")
    clf = Classifier.from_run(trained_run, device="cpu", quantize=mode, threads=1)
    assert clf.version.endswith(f"+{mode}")
    layers = linears(clf)
    for name, module in layers.items():
        weight = getattr(module, "weight", None)
        weight = weight() if callable(weight) else weight  # torch.ao's dynamic Linear: weight()
        quantized = type(weight).__name__ != "Parameter" or weight.dtype != torch.float32
        assert quantized == (not name.endswith(INT8_KEEP_FLOAT)), (name, type(module), type(weight))
        if quantized and mode == "int8-torchao":  # torchao's tensor subclass, not torch.ao's packed module
            assert type(weight).__name__ == "Int8Tensor" and isinstance(module, torch.nn.Linear)
    diff, agree = max_probability_change(float32, clf)
    assert 0 < diff < 0.05, diff  # int8 moves probabilities, a little
    assert agree >= len(TEXTS) - 1


def test_unknown_quantize_mode_is_refused(trained_run: Path) -> None:
    with pytest.raises(RunError, match="int8-torchao"):
        Classifier.from_run(trained_run, device="cpu", quantize="int4")
