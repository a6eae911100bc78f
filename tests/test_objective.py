"""Issue 14's training levers on the tiny model: prefix-once training and the label-set objective.

Prefix-once training must change how the loss is computed, never what: loss and LoRA
gradients equal the plain padded path's. The label-set loss must be exactly what the
classifier scores: -log of its probability of the gold label (brute force in tests/scoring.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scoring import brute_force_probs
from taskling.config import LoraSettings, build_config
from taskling.errors import ConfigError
from taskling.io import read_jsonl
from taskling.model.loader import ChatFormat, load_model
from taskling.rundir import RunDir
from taskling.serve.classifier import Classifier
from taskling.train import objective as obj
from taskling.train.loop import lora_model
from taskling.train.loss import collate
from taskling.train.prefix import prefix_unsupported, shared_prefix_length
from taskling.train.sft import train

FIXTURES = Path(__file__).parent / "fixtures"


def grads_of(model: Any, spec: obj.Objective, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    total, units = obj.ObjectiveLoss(model, spec)(**batch)
    (total / units).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float((total / units).detach()), grads


@pytest.mark.parametrize("kind", ["lm", "labels", "mixed"])
def test_prefix_once_gives_the_plain_paths_loss_and_lora_gradients(
    tiny_model_dir: Path, fmt: ChatFormat, examples: list[tuple[str, str]], kind: str
) -> None:
    torch.manual_seed(0)
    model = lora_model(load_model(str(tiny_model_dir), torch.float32), LoraSettings(r=4, dropout=0.0))
    for p in model.parameters():  # LoRA's B starts at zero: make the adapter do something
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = collate([fmt.training_ids(t, label) for t, label in examples], fmt.tokenizer.pad_token_id, "cpu")
    n = shared_prefix_length(batch)
    assert n == len(fmt.template.prefix_ids) > 5  # the system turn and the user header
    plain = obj.Objective.for_labels(kind, fmt.label_sequences, label_weight=0.5)
    shared = obj.Objective.for_labels(kind, fmt.label_sequences, label_weight=0.5, shared_prefix=True)
    loss, grads = grads_of(model, plain, batch)
    loss_once, grads_once = grads_of(model, shared, batch)
    assert loss_once == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == grads_once.keys() and len(grads) > 4
    for name in grads:
        torch.testing.assert_close(grads_once[name], grads[name], atol=1e-5, rtol=1e-4)


def test_mixed_precision_runs_lora_in_bf16_against_float32_weights(
    tiny_model_dir: Path, fmt: ChatFormat, examples: list[tuple[str, str]]
) -> None:
    from taskling.config import TrainSettings
    from taskling.train.objective import with_mixed_precision

    torch.manual_seed(0)
    model = lora_model(load_model(str(tiny_model_dir), torch.bfloat16), LoraSettings(r=4, dropout=0.0))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    lora_a = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    assert lora_a and all(m.weight.dtype == torch.float32 for m in lora_a)  # peft keeps adapters in float32
    seen: list[torch.dtype] = []
    hook = lora_a[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    batch = collate([fmt.training_ids(t, label) for t, label in examples], fmt.tokenizer.pad_token_id, "cpu")
    loss_fp32, grads_fp32 = grads_of(model, obj.Objective(), batch)
    loss_mixed, grads_mixed = grads_of(model, obj.Objective(mixed_precision=True), batch)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # without, LoRA casts the activations up; with, bf16
    assert loss_mixed == pytest.approx(loss_fp32, rel=2e-2)
    assert grads_mixed.keys() == grads_fp32.keys()
    for name in grads_mixed:  # the optimizer's weights and gradients stay float32
        assert grads_mixed[name].dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(grads_mixed[name].flatten(), grads_fp32[name].flatten(), 0) > 0.95
    # null: on exactly when the base runs in bf16; an explicit setting wins.
    assert with_mixed_precision(obj.Objective(), TrainSettings(), model).mixed_precision
    assert not with_mixed_precision(obj.Objective(), TrainSettings(mixed_precision=False), model).mixed_precision
    fp32 = lora_model(load_model(str(tiny_model_dir), torch.float32), LoraSettings(r=4))
    assert not with_mixed_precision(obj.Objective(), TrainSettings(), fp32).mixed_precision


def test_the_shared_prefix_stops_before_any_scored_position() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.full_like(ids, -100)
    assert shared_prefix_length({"input_ids": ids, "labels": labels, "attention_mask": mask}) == 3
    labels[0, 2] = 7  # token 2 is a target: it is predicted at position 1, which must stay in the suffix
    assert shared_prefix_length({"input_ids": ids, "labels": labels, "attention_mask": mask}) == 1
    assert shared_prefix_length({"input_ids": ids[:1], "labels": labels[:1], "attention_mask": mask[:1]}) == 0


def test_prefix_once_falls_back_where_it_cannot_apply() -> None:
    class Cfg:
        layer_types = ("sliding_attention", "full_attention")

    assert prefix_unsupported(object(), packing=False, gradient_checkpointing=False) is None
    assert "sliding" in str(prefix_unsupported(Cfg(), packing=False, gradient_checkpointing=False))
    assert "packed" in str(prefix_unsupported(object(), packing=True, gradient_checkpointing=False))
    assert "checkpointing" in str(prefix_unsupported(object(), packing=False, gradient_checkpointing=True))


def test_label_set_loss_is_minus_log_the_classifiers_gold_probability(
    tiny_model_dir: Path, fmt: ChatFormat, examples: list[tuple[str, str]]
) -> None:
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), torch.float32).eval()
    clf = Classifier(model, fmt, device="cpu", prefix_cache=False)
    labels = list(fmt.task.labels)
    expected = []
    for text, label in examples:
        probs = brute_force_probs(clf, fmt.prompt_ids(text))
        expected.append(-math.log(probs[labels.index(label)]))
    spec = obj.Objective.for_labels("labels", fmt.label_sequences)
    batch = collate([fmt.training_ids(t, label) for t, label in examples], fmt.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        total = obj.objective_loss(spec, model, batch)
    assert spec.units(batch) == len(examples)
    assert float(total) / len(examples) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert any(len(path) > 1 for path in clf.trie.paths) or len(clf.trie.branches) == 1  # the fixture's shape


def test_training_with_the_label_objective_writes_label_set_validation_loss(
    tiny_config: dict[str, Any], tmp_path: Path
) -> None:
    raw = {**tiny_config, "train": {**tiny_config["train"], "max_steps": 2, "objective": "labels"}}
    result = train(build_config(raw))
    history = list(read_jsonl(RunDir(result.run_dir).history))
    val = [r["val_loss"] for r in history if "val_loss" in r]
    # -log p(gold) over 8 labels starts near log(8), far below the LM loss over the whole vocabulary
    assert val and 0.5 < val[-1] < 4.0


def test_a_label_objective_is_refused_for_extraction(tiny_model_dir: Path, tmp_path: Path) -> None:
    from taskling.extract.schema import build_extraction_config
    from taskling.train.extraction import train_extraction

    raw = {
        "task": {"name": "clinc-extract", "json_schema": str(FIXTURES / "extract8_schema.json")},
        "data": {"train": [str(FIXTURES / "extract8_train.jsonl")]},
        "model": {"base": str(tiny_model_dir), "dtype": "float32"},
        "train": {"objective": "labels"},
        "run_dir": str(tmp_path / "run"),
    }
    with pytest.raises(ConfigError, match=r"train\.objective"):
        train_extraction(build_extraction_config(raw))


def test_the_combined_rung_multiplies_and_renormalises() -> None:
    from taskling.evaluate.combine import combined_rung, product_of_probabilities

    a = [[0.6, 0.3, 0.1], [0.5, 0.5, 0.0]]
    b = [[0.2, 0.7, 0.1], [0.0, 0.0, 1.0]]  # row 2: no label both find possible
    out = product_of_probabilities(a, b)
    assert out[0] == pytest.approx([0.12 / 0.34, 0.21 / 0.34, 0.01 / 0.34])
    assert out[1] == pytest.approx([0.25, 0.25, 0.5])  # falls back to the mean
    predict, seconds, size = combined_rung([(lambda t: a[: len(t)], 2.0, 10), (lambda t: b[: len(t)], 1.0, 5)])
    assert predict(["x"])[0] == pytest.approx(out[0]) and (seconds, size) == (3.0, 15)


def test_the_combined_rungs_weights_are_fitted_on_the_validation_rows() -> None:
    from taskling.evaluate.combine import combined_rung, fit_weights, pooled

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 4, size=200)
    sure = np.full((200, 4), 0.1)
    sure[np.arange(200), gold] = 0.7  # right on every row
    noise = rng.dirichlet(np.ones(4), size=200)  # knows nothing
    # the noisy rung is told to stand aside; the informed one is kept (or sharpened)
    weights = fit_weights([sure, noise], list(gold))
    assert weights[1] == 0.0 and weights[0] >= 1.0
    loss = lambda w: -np.log(pooled([sure, noise], w)[np.arange(200), gold]).mean()  # noqa: E731
    assert loss(weights) < loss((1.0, 1.0))  # better than the plain product on the rows it was fitted on
    np.testing.assert_allclose(pooled([sure, noise], (2.0, 0.0)).sum(axis=1), 1.0)
    parts = [(lambda t: sure[: len(t)].tolist(), 1.0, 1), (lambda t: noise[: len(t)].tolist(), 1.0, 1)]
    predict, _, _ = combined_rung(parts, ([f"t{i}" for i in range(200)], list(gold)))
    np.testing.assert_allclose(predict(["a", "b"]), pooled([sure[:2], noise[:2]], weights))
