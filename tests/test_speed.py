"""The GPU speed levers, checked on the CPU: each one must leave the numbers unchanged.

Padding-free packing, micro-batch splitting, gradient checkpointing and compiled layers
are selected automatically (or by config) on CUDA; here their logic runs on the tiny model
and is compared with the plain padded batch: same answer-token losses, same gradients.
QLoRA's NF4 base is checked for its round-trip error and for a LoRA step on top of it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from taskling.config import LoraSettings, ModelConfig, TrainSettings, build_config
from taskling.errors import ConfigError
from taskling.io import read_jsonl
from taskling.model.loader import load_model
from taskling.rundir import RunDir
from taskling.train import speed
from taskling.train.loop import lora_model
from taskling.train.loss import answer_logits, answer_tokens, collate, pack, pack_bins
from taskling.train.objective import ObjectiveLoss
from taskling.train.sft import train

FIXTURES = Path(__file__).parent / "fixtures"


def rows_of(lengths: list[tuple[int, int]], vocab: int = 500, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Rows of (prompt length, answer length) with random ids: labels -100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, answer in lengths:
        ids = torch.randint(3, vocab, (prompt + answer,), generator=g).tolist()
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


ROWS = rows_of([(12, 3), (30, 2), (7, 4), (21, 3), (5, 2)])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    torch.manual_seed(0)
    return load_model(str(tiny_model_dir), torch.float32).eval()


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits, targets, _ = answer_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="none")


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("capacity", [None, 40, 1])
def test_packed_answer_losses_equal_the_padded_ones(tiny: Any, capacity: int | None) -> None:
    padded = token_losses(tiny, collate(ROWS, 0, "cpu"))
    batch = pack(ROWS, 0, "cpu", capacity)
    assert "attention_mask" not in batch
    packed = token_losses(tiny, batch)
    assert answer_tokens(batch) == answer_tokens(collate(ROWS, 0, "cpu")) == len(padded) == 14
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_packing_lays_rows_end_to_end_with_positions_restarting() -> None:
    batch = pack(ROWS[:2], 0, "cpu", None)
    assert batch["input_ids"].shape == (1, 15 + 32)
    positions = batch["position_ids"][0].tolist()
    assert positions == list(range(15)) + list(range(32))
    labels = batch["labels"][0]
    assert labels[15] == -100  # a row's first token is never predicted from the row before
    assert labels[15 + 30 :].tolist() == ROWS[1][1][30:]


def test_pack_bins_fill_in_order_up_to_the_capacity() -> None:
    assert pack_bins([5, 5, 5, 9, 1], 10) == [[0, 1], [2], [3, 4]]
    assert pack_bins([5, 5, 5], None) == [[0, 1, 2]]
    assert pack_bins([50, 3], 10) == [[0], [1]]  # a row longer than the capacity gets its own bin


def test_training_with_packing_follows_the_padded_loss_curve(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    curves = []
    for packing in (False, True):
        raw = {**tiny_config, "run_dir": str(tmp_path / f"run-{packing}")}
        raw["train"] = {**raw["train"], "max_steps": 3, "packing": packing, "batch_size": 8}
        train(build_config(raw))
        curves.append([r["train_loss"] for r in read_jsonl(RunDir(raw["run_dir"]).history) if "train_loss" in r])
    assert len(curves[0]) == 3
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


# ---------------------------------------------------------------- gradients: checkpointing, split micro-batches


def lora_grads(model: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[float, dict[str, torch.Tensor]]:
    objective = ObjectiveLoss(model)
    total = sum(answer_tokens(b) for b in batches)
    loss = 0.0
    for batch in batches:
        part, _ = objective(**batch)
        (part / total).backward()
        loss += float(part.detach()) / total
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, grads


@pytest.fixture
def lora(tiny_model_dir: Path) -> Any:
    torch.manual_seed(0)
    base = load_model(str(tiny_model_dir), torch.float32)
    return lora_model(base, LoraSettings(r=4, dropout=0.0))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora: Any) -> None:
    batch = collate(ROWS, 0, "cpu")
    loss, grads = lora_grads(lora, [batch])
    levers = speed.Levers.resolve(TrainSettings(gradient_checkpointing=True, packing=False))
    speed.apply_model_levers(lora, levers)
    assert any(getattr(m, "gradient_checkpointing", False) for m in lora.modules())
    loss_ckpt, grads_ckpt = lora_grads(lora, [batch])
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5)


def test_a_split_micro_batch_gives_the_same_gradients(lora: Any) -> None:
    loss, grads = lora_grads(lora, [collate(ROWS, 0, "cpu")])
    split_loss, split = lora_grads(lora, [collate(ROWS[:2], 0, "cpu"), pack(ROWS[2:], 0, "cpu")])
    assert split_loss == pytest.approx(loss, rel=1e-6)
    for name in grads:
        torch.testing.assert_close(split[name], grads[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the largest micro-batch that fits


class FakeOOM(RuntimeError):
    pass


def test_micro_batch_search_halves_until_a_step_fits() -> None:
    tried: list[int] = []

    def step(n: int) -> None:
        tried.append(n)
        if n > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert speed.largest_micro_batch(step, 32) == 4
    assert tried == [32, 16, 8, 4]
    assert speed.largest_micro_batch(step, 5) == 5


def test_micro_batch_search_reraises_other_errors_and_oom_at_one_row() -> None:
    def broken(n: int) -> None:
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        speed.largest_micro_batch(broken, 8)

    def never_fits(n: int) -> None:
        raise FakeOOM("out of memory")

    with pytest.raises(FakeOOM):
        speed.largest_micro_batch(never_fits, 8)


def test_search_micro_batch_tries_the_longest_rows_and_leaves_no_gradients(lora: Any) -> None:
    objective = ObjectiveLoss(lora)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad])
    seen: list[int] = []

    def to_batch(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        seen.append(sum(len(ids) for ids, _ in rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("out of memory")
        return collate(rows, 0, "cpu")

    assert speed.search_micro_batch(objective, optimizer, ROWS, 4, to_batch) == 2
    assert seen == [32 + 24 + 15 + 11, 32 + 24]  # the 4 longest rows, then the 2 longest
    assert all(p.grad is None for p in lora.parameters())
    assert speed.search_micro_batch(objective, optimizer, ROWS, 2, to_batch) == 0  # all fit


def test_levers_are_on_exactly_when_cuda_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = speed.Levers.resolve(TrainSettings())
    assert (cpu.packing, cpu.auto_batch, cpu.gradient_checkpointing, cpu.compile) == (False, False, False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = speed.Levers.resolve(TrainSettings())
    assert gpu.packing and gpu.auto_batch and gpu.pack_capacity is not None
    assert not speed.Levers.resolve(TrainSettings(), world=2).auto_batch  # DDP: equal backward passes
    assert not speed.Levers.resolve(TrainSettings(packing=False, auto_batch=False)).packing
    flash = speed.Levers.resolve(TrainSettings(), ModelConfig(attn_implementation="flash_attention_2"))
    assert flash.pack_capacity is None  # one sequence: flash-attention's varlen kernel


# ---------------------------------------------------------------- attention kernel, compile


def test_flash_attention_on_the_cpu_is_a_config_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU") as err:
        load_model(str(tiny_model_dir), torch.float32, "cpu", attn_implementation="flash_attention_2")
    assert "sdpa" in (err.value.fix or "")


def test_eager_and_sdpa_attention_agree(tiny_model_dir: Path) -> None:
    batch = collate(ROWS, 0, "cpu")
    eager = load_model(str(tiny_model_dir), torch.float32, attn_implementation="eager").eval()
    sdpa = load_model(str(tiny_model_dir), torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(token_losses(eager, batch), token_losses(sdpa, batch), atol=1e-5, rtol=1e-5)


def test_unset_attention_is_eager_for_short_rows_on_the_cpu_and_sdpa_otherwise(tiny_model_dir: Path) -> None:
    unset, short, long = ModelConfig(), rows_of([(20, 2)]), rows_of([(20, 2), (speed.EAGER_MAX_TOKENS, 1)])
    assert speed.training_attention(unset, "cpu", 22, packing=False) == "eager"
    assert speed.training_attention(unset, "cpu", speed.EAGER_MAX_TOKENS + 1, packing=False) == "sdpa"
    assert speed.training_attention(unset, "cpu", 22, packing=True) == "sdpa"  # packed rows are long
    assert speed.training_attention(unset, "cuda", 22, packing=False) == "sdpa"
    assert speed.training_attention(unset, "cpu", None, packing=False) == "sdpa"  # no rows to judge by
    assert speed.training_attention(ModelConfig(attn_implementation="sdpa"), "cpu", 22, packing=False) == "sdpa"
    kernel = {
        name: speed.load_training_base(ModelConfig(dtype="float32"), str(tiny_model_dir), "cpu", rows).config
        for name, rows in (("short", short), ("long", long))
    }
    assert kernel["short"]._attn_implementation == "eager"
    assert kernel["long"]._attn_implementation == "sdpa"


@pytest.mark.slow
def test_compiled_layers_give_the_eager_outputs(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), torch.float32).eval()
    batch = collate(ROWS, 0, "cpu")
    with torch.no_grad():
        eager = token_losses(model, batch)
        assert speed.compile_layers(model) == 2
        compiled = token_losses(model, batch)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- QLoRA: the NF4 base

torchao = pytest.importorskip("torchao.quantization", reason="QLoRA needs torchao (pip install 'taskling[gpu]')")


def test_nf4_round_trip_error_is_small() -> None:
    from taskling.model.quantize import nf4_roundtrip_error

    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.02
    error = nf4_roundtrip_error(weight)
    # 16 NF4 levels on Gaussian weights with absmax per 64: ~9% relative error (QLoRA paper's NF4).
    assert 0.02 < error < 0.12
    assert nf4_roundtrip_error(torch.randn(64, 64)) < 0.12  # a tiny layer: fewer scale blocks


def test_a_lora_step_trains_on_an_nf4_base(tiny_model_dir: Path) -> None:
    from taskling.model.quantize import quantize_nf4

    base = load_model(str(tiny_model_dir), torch.float32)
    before = token_losses(base, collate(ROWS, 0, "cpu")).detach()
    assert quantize_nf4(base) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    weight = base.get_decoder().layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "NF4Tensor" and not weight.requires_grad
    after = token_losses(base, collate(ROWS, 0, "cpu")).detach()
    assert (after - before).abs().max() < 0.5  # the same model, 4-bit
    model = lora_model(base, LoraSettings(r=4, dropout=0.0))
    loss, grads = lora_grads(model, [collate(ROWS, 0, "cpu")])
    assert torch.isfinite(torch.tensor(loss)) and grads
    assert all("lora_" in name for name in grads)


def test_quantize_config_is_typed_and_checked(tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from taskling.model.quantize import check_quantize

    with pytest.raises(ConfigError, match=r"model\.quantize"):
        build_config({**tiny_config, "model": {**tiny_config["model"], "quantize": "int4"}})
    assert build_config({**tiny_config, "model": {**tiny_config["model"], "quantize": "nf4"}}).model.quantize == "nf4"
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(ConfigError, match="needs torchao") as err:
        check_quantize("nf4")
    assert "taskling[gpu]" in (err.value.fix or "")


# ---------------------------------------------------------------- classification: static shapes


def test_static_shape_scoring_gives_the_dynamic_probabilities(trained_run: Path) -> None:
    from taskling.serve.classifier import Classifier, shape_bucket

    clf = Classifier.from_run(trained_run, device="cpu")
    assert not clf.static_shapes  # on by default on CUDA only
    texts = [
        "what is my balance",
        "set a timer for ten minutes please and then remind me",
        "\n\nleading blank line",
        "x",
    ]
    dynamic = clf.label_log_probs(texts)
    clf.static_shapes = True
    static = clf.label_log_probs(texts)
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)
    assert clf.label_log_probs(texts[:1])[0].tolist() == pytest.approx(dynamic[0].tolist(), abs=1e-5)
    assert [shape_bucket(n) for n in (1, 8, 9, 33)] == [8, 8, 16, 64]
