"""GGUF export of every architecture family, the base-model presets, llama.cpp wiring and `push`.

Each family is a random-init tiny config (Llama 3 with `rope_type: llama3`, Qwen3, Gemma 3)
with the tiny BPE tokenizer and the preset's chat template, trained a few steps, classified
and exported; the export's own check reads the GGUF back and compares it with the run.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from taskling.export.common import ExportError
from taskling.export.exporter import export
from taskling.model import presets as presets_mod
from taskling.model.presets import apply_preset, find_preset

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True}  # fmt: skip


def arch_config(family: str, vocab: dict[str, Any]) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen3Config

    common = {**SMALL, **vocab}
    if family == "llama3.2":
        # original context 16: the llama3 factors change most frequencies at these prompt lengths
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16, "rope_theta": 10000.0}  # fmt: skip
        return LlamaConfig(**common, rope_parameters=rope)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32)  # head_dim * heads != hidden, as in Qwen3-0.6B
    if family == "gemma3":
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=16, query_pre_attn_scalar=16,
                                sliding_window=128)  # fmt: skip
    return Phi3Config(**common)


def tiny_base(root: Path, family: str) -> Path:
    """The conftest tiny tokenizer with a random model of `family`'s architecture."""
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model

    base = build_tiny_model(root / "base")
    cfg = json.loads((base / "config.json").read_text())
    vocab = {k: cfg[k] for k in ("vocab_size", "pad_token_id", "eos_token_id", "bos_token_id")}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(arch_config(family, vocab)).save_pretrained(base)
    return base


def train_with_preset(root: Path, family: str, labels: list[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Train a few steps with `model.base` naming the family's preset (pointed at the tiny base)."""
    from dataclasses import replace

    from taskling.config import build_config
    from taskling.train.sft import train

    base = tiny_base(root, family)
    preset = next(p for p in presets_mod.PRESETS if p.family == family)
    monkeypatch.setattr(presets_mod, "PRESETS", (replace(preset, hub_id=str(base)),))
    config = build_config({
        "task": {"name": "clinc8", "labels": labels},
        "data": {"train": [str(FIXTURES / "clinc8_train.jsonl")], "validation_fraction": 0.2},
        "model": {"base": preset.alias, "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "train": {"epochs": 1, "max_steps": 4, "batch_size": 16, "learning_rate": 5e-3, "seed": 0, "threads": 1},
        "run_dir": str(root / "run"),
    })  # fmt: skip
    train(config)
    run = json.loads((root / "run" / "run.json").read_text())
    assert run["chat_template"] == preset.chat_template
    adapter = json.loads((root / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(preset.target_modules)
    assert adapter["r"] == 4  # the user's value wins over the preset's
    return root / "run"


@pytest.mark.parametrize("family", ["llama3.2", "qwen3", "gemma3"])
def test_preset_trains_classifies_and_exports_gguf(
    family: str, tmp_path: Path, labels: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskling.serve.classifier import Classifier

    run = train_with_preset(tmp_path, family, labels, monkeypatch)
    predictions = Classifier.from_run(run, device="cpu", dtype="float32").predict(["what's my balance"])
    assert predictions[0].label in labels
    result = export(run, "gguf", tmp_path / "gguf", quant="f16")
    checks = result.checks["gguf"]
    assert checks["architecture"] == {"llama3.2": "llama", "qwen3": "qwen3", "gemma3": "gemma3"}[family]
    assert checks["weights_max_relative_diff"] < 1e-3 and checks["logits_max_relative_diff"] < 1e-2
    assert checks["labels"]["clear_disagreements"] == 0
    assert checks["rope_freqs"] == (family == "llama3.2")
    assert checks["writer"] == "taskling (gguf package)"
    q4 = export(run, "gguf", tmp_path / "q4", quant="q4_0").checks["gguf"]
    assert "Q4_0" in q4["tensor_types"] and q4["labels"]["texts"] == checks["labels"]["texts"]


def test_phi4_mini_preset_trains_and_exports_merged(
    tmp_path: Path, labels: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = train_with_preset(tmp_path, "phi4-mini", labels, monkeypatch)
    assert export(run, "merged", tmp_path / "merged").checks["labels"]["clear_disagreements"] == 0
    with pytest.raises(ExportError, match="Phi3ForCausalLM"):
        export(run, "gguf", tmp_path / "gguf")


@pytest.fixture(scope="module")
def llama3_run(tmp_path_factory: pytest.TempPathFactory, labels: list[str]) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        return train_with_preset(tmp_path_factory.mktemp("llama3"), "llama3.2", labels, mp)


def test_gguf_check_catches_wrong_rope_freqs(llama3_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import taskling.export.gguf as gguf_mod

    monkeypatch.setattr(gguf_mod, "rope_freq_factors", lambda model: None)  # Llama 3 written as plain rope
    with pytest.raises(ExportError, match=r"tensors read back|rope_freqs|logits differ"):
        export(llama3_run, "gguf", tmp_path / "bad")


def test_gguf_check_catches_a_missing_gemma_norm_shift(
    tmp_path: Path, labels: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    import taskling.export.gguf_arch as arch

    run = train_with_preset(tmp_path, "gemma3", labels, monkeypatch)
    monkeypatch.setitem(arch.ARCHS, "gemma3_text", replace(arch.ARCHS["gemma3_text"], norm_shift=0.0))
    with pytest.raises(ExportError, match=r"norm.*differs from the merged model"):
        export(run, "gguf", tmp_path / "bad")


def test_gguf_check_catches_a_wrong_hparam(llama3_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import taskling.export.gguf as gguf_mod

    real = gguf_mod.expected_hparams
    calls = {"n": 0}

    def wrong_once(model: Any, spec: Any) -> dict[str, Any]:
        calls["n"] += 1
        hp = real(model, spec)
        return {**hp, "rope.freq_base": 500000.0} if calls["n"] == 1 else hp  # the writer's call only

    monkeypatch.setattr(gguf_mod, "expected_hparams", wrong_once)
    with pytest.raises(ExportError, match="rope"):
        export(llama3_run, "gguf", tmp_path / "bad")


def test_q4_k_m_without_llama_cpp_says_what_to_install(
    llama3_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TASKLING_LLAMA_CPP", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ExportError, match="llama-quantize") as err:
        export(llama3_run, "gguf", tmp_path / "q4km", quant="q4_K_M")
    assert "q4_0" in (err.value.fix or "")


FAKE_CONVERTER = """import sys, json
from pathlib import Path
args = sys.argv[1:]
Path(sys.argv[0]).with_name("calls.jsonl").open("a").write(json.dumps(["convert", *args]) + "\\n")
from taskling.model.loader import load_model, load_tokenizer
import torch
from taskling.export.gguf import write_gguf
tok = load_tokenizer(args[0])
write_gguf(load_model(args[0], torch.float32), tok, tok.chat_template, Path(args[2]), args[4], name="fake")
"""
FAKE_QUANTIZER = """#!/bin/sh
echo "[\\"quantize\\", \\"$1\\", \\"$2\\", \\"$3\\"]" >> "$(dirname "$0")/calls.jsonl"
cp "$1" "$2"
"""


def test_llama_cpp_converter_and_quantizer_are_used_when_installed(
    llama3_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = tmp_path / "llama.cpp"
    tools.mkdir()
    (tools / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    quantizer = tools / "build" / "bin" / "llama-quantize"
    quantizer.parent.mkdir(parents=True)
    quantizer.write_text(FAKE_QUANTIZER)
    quantizer.chmod(quantizer.stat().st_mode | stat.S_IEXEC)
    # the fake converter writes its log beside itself; the quantizer beside its own folder
    monkeypatch.setenv("TASKLING_LLAMA_CPP", str(tools))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    result = export(llama3_run, "gguf", tmp_path / "out", quant="q4_K_M")
    assert result.checks["gguf"]["writer"] == "llama.cpp convert_hf_to_gguf.py + llama-quantize"
    calls = [json.loads(line) for line in (tools / "calls.jsonl").read_text().splitlines()]
    calls += [json.loads(line) for line in (quantizer.parent / "calls.jsonl").read_text().splitlines()]
    assert calls[0][0] == "convert" and calls[0][-2:] == ["--outtype", "f16"]
    assert calls[1][0] == "quantize" and calls[1][-1] == "Q4_K_M" and calls[1][2].endswith("model.gguf")
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["manifest.json", "model.gguf"]


def test_presets_resolve_by_hub_id_or_alias_and_user_values_win() -> None:
    from taskling.config import build_config

    assert find_preset("Qwen/Qwen3-0.6B") is find_preset("qwen3-0.6b")
    families = {p.family for p in presets_mod.PRESETS}
    assert families == {"qwen3", "llama3.2", "gemma3", "phi4-mini"}
    config = build_config({"task": {"name": "t", "labels": ["a", "b"]}, "model": {"base": "qwen3-8b", "max_length": 64},
                           "data": {"train": ["x.jsonl"]}, "run_dir": "r"})  # fmt: skip
    applied = apply_preset(config)
    assert applied.model.base == "Qwen/Qwen3-8B" and applied.model.max_length == 64
    assert applied.model.quantize == "nf4" and applied.lora.r == 16
    assert "q_proj" in applied.lora.target_modules
    own = config.model_copy(update={"model": config.model.model_copy(update={"base": "my/own"})})
    assert apply_preset(own) is own


class FakeHfApi:
    def __init__(self) -> None:
        self.uploaded: dict[str, bytes] = {}
        self.created: list[tuple[str, bool]] = []

    def create_repo(self, repo_id: str, *, private: bool, exist_ok: bool, repo_type: str) -> Any:
        self.created.append((repo_id, private))
        return type("RepoUrl", (), {"url": f"https://hub.example/{repo_id}"})()

    def upload_folder(self, *, folder_path: str, repo_id: str, repo_type: str, commit_message: str) -> None:
        root = Path(folder_path)
        self.uploaded = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_push_uploads_adapter_and_a_card_with_gate_and_metrics(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import huggingface_hub
    from typer.testing import CliRunner

    from taskling.cli import app

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.8125, "macro_f1": 0.79, "worst_category": "oos"}))
    check = {"name": "accuracy non-inferior", "passed": False, "detail": "drop 0.06 > margin 0.02"}
    gate = {"passed": False, "reference": "runs/base", "n": 48, "assessment": "regression", "checks": [check]}
    (run / "gate.json").write_text(json.dumps(gate))
    fake = FakeHfApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: fake)
    result = CliRunner().invoke(app, ["push", str(run), "me/intents", "--private"])
    assert result.exit_code == 0, result.output
    assert fake.created == [("me/intents", True)]
    assert {"adapter_model.safetensors", "adapter_config.json", "run.json", "README.md", "gate.json",
            "metrics.json", "tokenizer/tokenizer.json"} <= set(fake.uploaded)  # fmt: skip
    assert fake.uploaded["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    card = fake.uploaded["README.md"].decode()
    assert "library_name: peft" in card and "**Gate: FAILED**" in card and "drop 0.06 > margin 0.02" in card
    assert "| accuracy | 0.8125 |" in card and "`balance`" in card


@pytest.mark.parametrize(("split", "pre"), [("llama-bpe", "llama-bpe"), ("qwen2", "qwen2"), ("other", None)])
def test_gguf_vocab_names_the_pre_tokenizer_from_the_split_rule(
    tiny_model_dir: Path, split: str, pre: str | None
) -> None:
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from taskling.export.gguf_vocab import tokenizer_metadata
    from taskling.model.loader import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer_metadata(tokenizer, len(tokenizer))["pre"] == "gpt-2"
    regex = GGUF_PRE_TOKENIZER_SPLITS.get(split, r"\p{L}+|\s+")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    if pre is None:
        with pytest.raises(ExportError, match="GPT-2, Llama 3 and Qwen split rules"):
            tokenizer_metadata(tokenizer, len(tokenizer))
    else:
        meta = tokenizer_metadata(tokenizer, len(tokenizer))
        assert meta["model"] == "gpt2" and meta["pre"] == pre and len(meta["tokens"]) == len(tokenizer)
