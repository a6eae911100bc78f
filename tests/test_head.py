"""`model.head: linear` (issue 14): LoRA plus a linear label head on the tiny model.

The head's training loss must be exactly what the classifier scores (-log of its probability
of the gold label), prefix-once must not change it, a trained run must carry its head through
the adapter folder into `Classifier.from_run`, and every path that cannot carry the head
(other task kinds, the label-set objective, GGUF/merged export, DPO, multi-adapter serving)
must say so and name the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_raw_config
from taskling.config import LoraSettings, build_config
from taskling.errors import ConfigError, RunError
from taskling.export.exporter import ExportError
from taskling.io import read_jsonl
from taskling.model.head import HEAD_MODULE, attach_head, head_training_row, head_weight
from taskling.model.loader import ChatFormat, load_model
from taskling.rundir import RunDir, read_manifest
from taskling.serve.classifier import Classifier, load_adapters
from taskling.train import objective as obj
from taskling.train.loop import lora_model
from taskling.train.loss import collate
from taskling.train.sft import train

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def head_run(tiny_config_module: dict[str, Any]) -> Path:
    raw = {**tiny_config_module, "model": {**tiny_config_module["model"], "head": "linear"}}
    raw["train"] = {**raw["train"], "epochs": 3}
    return train(build_config(raw)).run_dir


@pytest.fixture(scope="module")
def tiny_config_module(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, labels: list[str]) -> dict:
    return tiny_raw_config(tiny_model_dir, labels, tmp_path_factory.mktemp("head") / "run")


def headed_model(tiny_model_dir: Path, fmt: ChatFormat) -> Any:
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), torch.float32).eval()
    head = attach_head(model, len(fmt.task.labels), [seq[0] for seq in fmt.label_sequences])
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight))  # labels sharing a first token must differ too
    return model


def test_the_head_loss_is_minus_log_the_classifiers_gold_probability(
    tiny_model_dir: Path, fmt: ChatFormat, examples: list[tuple[str, str]]
) -> None:
    model = headed_model(tiny_model_dir, fmt)
    clf = Classifier(model, fmt, device="cpu", prefix_cache=False)
    assert clf.head == "linear" and not clf.trie.inputs
    labels = list(fmt.task.labels)
    expected = []
    for text, label in examples:  # by hand: the prompt's last hidden state times the head
        ids = torch.tensor([fmt.prompt_ids(text)])
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, -1]
        logp = torch.log_softmax(getattr(model, HEAD_MODULE)(hidden), dim=-1)
        expected.append(-float(logp[labels.index(label)].detach()))
        got = clf.predict([text])[0].probabilities[label]
        assert got == pytest.approx(math.exp(-expected[-1]), rel=1e-4)
    spec = obj.Objective.for_labels("head", fmt.label_sequences)
    batch = collate([head_training_row(fmt, t, label) for t, label in examples], fmt.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        total = obj.objective_loss(spec, model, batch)
    assert spec.units(batch) == len(examples)
    assert float(total) / len(examples) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    ids, targets = head_training_row(fmt, examples[0][0], examples[0][1])
    assert ids[:-1] == fmt.prompt_ids(examples[0][0]) and targets[-1] == labels.index(examples[0][1])
    assert set(targets[:-1]) == {-100}  # the answer's tokens are never run: one target, the label's index


def test_prefix_once_gives_the_head_losss_plain_value_and_gradients(
    tiny_model_dir: Path, fmt: ChatFormat, examples: list[tuple[str, str]]
) -> None:
    model = lora_model(headed_model(tiny_model_dir, fmt), LoraSettings(r=4, dropout=0.0))
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batch = collate([head_training_row(fmt, t, label) for t, label in examples], fmt.tokenizer.pad_token_id, "cpu")
    results = []
    for shared in (False, True):
        spec = obj.Objective.for_labels("head", fmt.label_sequences, shared_prefix=shared)
        total, units = obj.ObjectiveLoss(model, spec)(**batch)
        (total / units).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((float((total / units).detach()), grads))
    (plain, g_plain), (once, g_once) = results
    assert once == pytest.approx(plain, rel=1e-5)
    assert any(HEAD_MODULE in n for n in g_plain) and any("lora_A" in n for n in g_plain)
    assert g_plain.keys() == g_once.keys()
    for name in g_plain:
        torch.testing.assert_close(g_once[name], g_plain[name], atol=1e-5, rtol=1e-4)


def test_a_linear_head_run_trains_saves_and_classifies_with_its_head(
    head_run: Path, tiny_model_dir: Path, fmt: ChatFormat
) -> None:
    assert read_manifest(head_run)["head"] == "linear"
    from safetensors.torch import load_file

    saved = load_file(str(RunDir(head_run).adapter / "adapter_model.safetensors"))
    head_keys = [k for k in saved if HEAD_MODULE in k]
    assert len(head_keys) == 1 and saved[head_keys[0]].shape[0] == len(fmt.task.labels)
    # trained: the saved rows moved away from the LM-head rows they started as
    base = load_model(str(tiny_model_dir), torch.float32)
    start = base.get_output_embeddings().weight[[seq[0] for seq in fmt.label_sequences]]
    assert (saved[head_keys[0]] - start).abs().max() > 1e-3
    val = [r["val_loss"] for r in read_jsonl(RunDir(head_run).history) if "val_loss" in r]
    assert len(val) == 3 and min(val[1:]) < val[0] < math.log(len(fmt.task.labels)) + 2  # per-row CE over 8 labels

    clf = Classifier.from_run(head_run, device="cpu", dtype="float32")
    assert isinstance(clf, Classifier) and clf.head == "linear"
    torch.testing.assert_close(clf._branch_rows[0], saved[head_keys[0]].to(clf._branch_rows[0].dtype))
    texts = ["what is my checking balance", "set a timer for ten minutes", "\n\nleading blank lines"]
    preds = clf.predict(texts)
    for p in preds:
        assert p.label in fmt.task.labels and sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    uncached = Classifier.from_run(head_run, device="cpu", dtype="float32", prefix_cache=False).predict(texts)
    for a, b in zip(preds, uncached, strict=True):
        assert a.label == b.label and a.probability == pytest.approx(b.probability, rel=1e-4)


def test_the_head_weight_follows_the_named_adapter(head_run: Path, fmt: ChatFormat) -> None:
    (clf,) = load_adapters({"only": head_run}, merge=False, device="cpu").values()
    assert clf.head == "linear"
    weight = head_weight(clf.model, "only")
    assert weight.shape == (len(fmt.task.labels), clf.model.get_output_embeddings().weight.shape[1])


def test_what_cannot_carry_a_linear_head_says_so(head_run: Path, trained_run: Path, tmp_path: Path) -> None:
    from taskling.export.exporter import export
    from taskling.train.dpo import dpo

    with pytest.raises(ExportError, match=r"model\.head: linear"):
        export(head_run, "gguf", tmp_path / "out")
    with pytest.raises(RunError, match=r"model\.head: linear"):
        load_adapters({"a": head_run, "b": trained_run}, device="cpu")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(RunError, match=r"model\.head: linear"):
        dpo(head_run, pairs, tmp_path / "dpo")


def test_a_linear_head_with_a_label_set_objective_is_a_config_error(tiny_config: dict[str, Any]) -> None:
    raw = {**tiny_config, "model": {**tiny_config["model"], "head": "linear"}}
    raw["train"] = {**raw["train"], "objective": "labels"}
    with pytest.raises(ConfigError, match=r"model\.head: linear.*train\.objective"):
        build_config(raw)
    with pytest.raises(ConfigError, match=r"model\.head"):
        build_config({**tiny_config, "model": {**tiny_config["model"], "head": "softmax"}})


def test_a_linear_head_is_refused_for_extraction_and_generation(tiny_model_dir: Path, tmp_path: Path) -> None:
    from taskling.extract.schema import build_extraction_config

    raw = {
        "task": {"name": "clinc-extract", "json_schema": str(FIXTURES / "extract8_schema.json")},
        "data": {"train": [str(FIXTURES / "extract8_train.jsonl")]},
        "model": {"base": str(tiny_model_dir), "head": "linear"},
        "run_dir": str(tmp_path / "run"),
    }
    with pytest.raises(ConfigError, match=r"model\.head: linear scores a label set; extraction"):
        build_extraction_config(raw)


def test_the_demo_takes_overrides_such_as_the_linear_head(
    tiny_model_dir: Path, labels: list[str], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from taskling.cli import app

    data = tmp_path / "clinc"
    data.mkdir()
    (data / "LABELS.txt").write_text("\n".join(labels) + "\n")
    train_rows = (FIXTURES / "clinc8_train.jsonl").read_text()
    (data / "train.jsonl").write_text(train_rows)
    (data / "validation.jsonl").write_text(train_rows)
    (data / "test.jsonl").write_text((FIXTURES / "clinc8_gold.jsonl").read_text())
    run = tmp_path / "demo"
    args = ["demo", "--run-dir", str(run), "--data-dir", str(data), "--intents", str(len(labels))]
    args += ["--train-per-intent", "10", "--epochs", "1", "--base", str(tiny_model_dir)]
    res = CliRunner().invoke(app, [*args, "--set", "model.head=linear", "--set", "model.dtype=float32"])
    assert res.exit_code == 0, res.output
    assert "demo accuracy" in res.output
    assert read_manifest(run)["head"] == "linear"
    res = CliRunner().invoke(app, [*args, "--set", "model.head=softmax"])
    assert res.exit_code != 0 and "model.head" in res.output
