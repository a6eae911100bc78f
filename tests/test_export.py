"""Exports of the tiny trained run: merged, GGUF (f16, q8_0), Ollama and vLLM, each checked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from taskling.export.exporter import (
    ExportError,
    ExportResult,
    export,
    load_run,
    merged_model,
    ollama_template,
    render_go_template,
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def exports(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    """Every format exported once for the module (a few seconds each on the tiny model)."""
    root = tmp_path_factory.mktemp("exports")
    return {
        "merged": export(trained_run, "merged", root / "merged"),
        "gguf-f16": export(trained_run, "gguf", root / "gguf-f16", quant="f16"),
        "gguf-q8_0": export(trained_run, "gguf", root / "gguf-q8_0", quant="q8_0"),
        "ollama": export(trained_run, "ollama", root / "ollama"),
        "vllm": export(trained_run, "vllm", root / "vllm"),
    }


def manifest_of(result: ExportResult) -> dict[str, Any]:
    return dict(json.loads((result.out_dir / "manifest.json").read_text()))


@pytest.mark.parametrize("name", ["merged", "gguf-f16", "gguf-q8_0", "ollama", "vllm"])
def test_manifest_hashes_every_file(exports: dict[str, ExportResult], trained_run: Path, name: str) -> None:
    result = exports[name]
    manifest = manifest_of(result)
    on_disk = {str(p.relative_to(result.out_dir)) for p in result.out_dir.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((result.out_dir / rel).read_bytes()).hexdigest() == entry["sha256"]
    run = json.loads((trained_run / "run.json").read_text())
    assert manifest["task"]["labels"] == run["task"]["labels"]
    assert manifest["source_run"] == str(trained_run.resolve())
    assert manifest["base_model"] == run["base_model"]
    assert manifest["taskling_version"] == run["taskling_version"]
    # atomic: nothing half-written is left beside the export
    assert not [p for p in result.out_dir.parent.iterdir() if p.name.endswith(".partial")]


def test_merged_predicts_what_the_run_predicts(exports: dict[str, ExportResult], trained_run: Path) -> None:
    from taskling.model.loader import ChatFormat, load_model, load_tokenizer
    from taskling.serve.classifier import Classifier

    out = exports["merged"].out_dir
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    run = json.loads((trained_run / "run.json").read_text())
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.chat_template == run["chat_template"]
    texts = ["what's my balance", "book me a flight to paris", "set a timer for ten minutes", "how do you say hi"]
    fmt = ChatFormat(tokenizer, load_run(trained_run).task, run["max_length"])
    merged = Classifier(load_model(str(out), torch.float32), fmt, device="cpu").predict(texts)
    reference = Classifier.from_run(trained_run, device="cpu", dtype="float32").predict(texts)
    assert [p.label for p in merged] == [p.label for p in reference]
    for a, b in zip(merged, reference, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-4)
    checks = exports["merged"].checks["labels"]
    assert checks["agree"] == checks["texts"] >= 4


def test_merged_bfloat16_is_saved_in_bfloat16(trained_run: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    result = export(trained_run, "merged", tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(result.out_dir / "model.safetensors"), "pt") as fh:
        dtypes = {fh.get_tensor(key).dtype for key in fh.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    assert dtypes == {torch.bfloat16}
    assert result.checks["dtype"] == "bfloat16" and result.checks["labels"]["clear_disagreements"] == 0


@pytest.mark.parametrize(("name", "weight_type", "logit_tol"), [("gguf-f16", "F16", 2e-3), ("gguf-q8_0", "Q8_0", 0.03)])
def test_gguf_reads_back_and_matches_the_merged_model(
    exports: dict[str, ExportResult], trained_run: Path, name: str, weight_type: str, logit_tol: float
) -> None:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = exports[name].out_dir / "model.gguf"
    reader = gguf.GGUFReader(str(path))
    fields = {key: reader.fields[key].contents() for key in reader.fields if not key.startswith("GGUF.")}
    run_info = load_run(trained_run)
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.chat_template"] == run_info.chat_template
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.eos_token_id"] == run_info.tokenizer.eos_token_id
    assert len(fields["tokenizer.ggml.tokens"]) == len(run_info.tokenizer)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == weight_type and types["blk.1.ffn_down.weight"] == weight_type
    assert types["output_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd

    # transformers' GGUF loader as the runtime: same token ids, same logits
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompt = run_info.chat_format()._render(run_info.task.messages("what's the weather like in 2 days?"), True)
    ids = run_info.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    merged = merged_model(run_info)
    with torch.inference_mode():
        ref = merged(input_ids=torch.tensor([ids])).logits
        got = loaded(input_ids=torch.tensor([ids])).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < logit_tol
    assert torch.equal(got[0].argmax(-1), ref[0].argmax(-1))
    checks = exports[name].checks["gguf"]
    assert checks["tokenizer_round_trip"] and checks["labels"]["clear_disagreements"] == 0


def test_q8_0_is_smaller_than_f16(exports: dict[str, ExportResult]) -> None:
    f16 = (exports["gguf-f16"].out_dir / "model.gguf").stat().st_size
    q8 = (exports["gguf-q8_0"].out_dir / "model.gguf").stat().st_size
    assert q8 < 0.75 * f16


def test_gguf_check_catches_a_missing_qk_permutation(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import taskling.export.gguf_arch as export_gguf

    monkeypatch.setattr(export_gguf, "permute", lambda weights, n_head, n_head_kv=None: weights)
    with pytest.raises(ExportError, match=r"q_proj.*differs from the merged model"):
        export(trained_run, "gguf", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.iterdir())  # the partial directory is gone too


def test_gguf_refuses_other_architectures() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from taskling.export.gguf_arch import arch_for

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ExportError, match="GGUF export supports LlamaForCausalLM") as err:
        arch_for(Qwen2ForCausalLM(Qwen2Config(vocab_size=64, num_key_value_heads=2, **small)))
    assert "Qwen2ForCausalLM" in str(err.value) and "--to merged" in str(err.value)
    scaled = LlamaConfig(vocab_size=64, rope_scaling={"rope_type": "yarn", "factor": 2.0}, **small)
    with pytest.raises(ExportError, match="rope scaling 'yarn'"):
        arch_for(LlamaForCausalLM(scaled))


def test_ollama_modelfile_carries_the_training_template(exports: dict[str, ExportResult], trained_run: Path) -> None:
    out = exports["ollama"].out_dir
    text = (out / "Modelfile").read_text()
    run = load_run(trained_run)
    assert "FROM ./model.gguf\n" in text
    assert f'SYSTEM """{run.task.system_prompt()}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for user in ["how much is in my checking account", "  spaced\nout  "]:
        messages = run.task.messages(user)
        jinja = run.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go_template(template, run.task.system_prompt(), user) == jinja
    assert render_go_template(template, run.task.system_prompt(), "hi") == (
        f"<|im_start|>system\n{run.task.system_prompt()}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (out / "model.gguf").is_file()


def test_ollama_template_keeps_smollm2_default_system_prompt(trained_run: Path) -> None:
    run = load_run(trained_run)
    run.tokenizer.chat_template = run.manifest["chat_template"] = SMOLLM2_TEMPLATE
    template = ollama_template(run)
    no_system = run.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "named SmolLM" in no_system
    assert render_go_template(template, None, "hello") == no_system
    assert render_go_template(template, "Be brief.", "hello").startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_ollama_refuses_a_template_it_cannot_translate(trained_run: Path, tmp_path: Path) -> None:
    run = load_run(trained_run)
    trimming = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    run.tokenizer.chat_template = run.manifest["chat_template"] = trimming + "<|im_start|>assistant\n"
    with pytest.raises(ExportError, match="cannot translate this run's chat template"):
        ollama_template(run)


def test_vllm_launch_line_and_structured_choice(exports: dict[str, ExportResult], trained_run: Path) -> None:
    out = exports["vllm"].out_dir
    launch = (out / "launch.sh").read_text()
    run = json.loads((trained_run / "run.json").read_text())
    assert f"vllm serve {run['base_model_path']} --enable-lora --lora-modules clinc8=" in launch
    assert "--max-lora-rank 8" in launch  # r=4, rounded up to a rank vLLM accepts
    request = json.loads((out / "request.json").read_text())
    assert request["model"] == "clinc8"
    assert request["structured_outputs"]["choice"] == run["task"]["labels"]
    assert request["messages"][0] == {"role": "system", "content": run["task"]["instruction"]}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "adapter" / name).read_bytes() == (trained_run / "adapter" / name).read_bytes()
    assert (out / "chat_template.jinja").read_text() == run["chat_template"]


def test_export_replaces_an_old_export_but_nothing_else(trained_run: Path, tmp_path: Path) -> None:
    first = export(trained_run, "vllm", tmp_path / "vllm")
    (first.out_dir / "stale.txt").write_text("from an older export")
    second = export(trained_run, "vllm", tmp_path / "vllm")
    assert not (second.out_dir / "stale.txt").exists() and (second.out_dir / "manifest.json").is_file()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("do not delete")
    with pytest.raises(ExportError, match="is not a taskling export"):
        export(trained_run, "vllm", keep)
    assert (keep / "notes.txt").read_text() == "do not delete"


def test_failed_export_leaves_the_previous_one_intact(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import taskling.export.exporter as export_module

    good = export(trained_run, "vllm", tmp_path / "vllm")
    before = (good.out_dir / "manifest.json").read_text()

    def broken(run: Any, out: Path, **_: Any) -> dict[str, Any]:
        (out / "launch.sh").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "write_vllm", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(trained_run, "vllm", tmp_path / "vllm")
    assert (good.out_dir / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm"]


def test_cli_export(trained_run: Path, tmp_path: Path) -> None:
    from taskling.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", str(trained_run), "--to", "vllm", "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    assert "launch.sh" in result.output and (tmp_path / "v" / "manifest.json").is_file()
    result = runner.invoke(app, ["export", str(trained_run), "--to", "onnx"])
    assert result.exit_code == 2
    assert "unknown export format 'onnx'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(trained_run), "--to", "gguf", "--quant", "q4_k"])
    assert result.exit_code == 2 and "f16, q8_0" in result.output


@pytest.mark.slow
def test_real_bundled_model_exports_to_ollama_q8_0(tmp_path: Path) -> None:
    """SmolLM2-135M (30 layers, 9 query / 3 key-value heads): a 2-step run, exported and read back."""
    from taskling.config import build_config
    from taskling.train.sft import train

    fixtures = Path(__file__).parent / "fixtures"
    labels = ["balance", "timer", "weather", "translate"]
    rows = [json.loads(x) for x in (fixtures / "clinc8_train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["label"] in labels]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:20]))
    config = build_config(
        {
            "task": {"name": "real4", "labels": labels},
            "data": {"train": [str(tmp_path / "train.jsonl")], "validation": [str(tmp_path / "val.jsonl")]},
            "model": {"base": "bundled:smollm2-135m", "max_length": 96},
            "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "seed": 0},
            "run_dir": str(tmp_path / "run"),
        }
    )
    train(config)
    result = export(tmp_path / "run", "ollama", tmp_path / "ollama", quant="q8_0")
    checks = result.checks["gguf"]
    assert checks["tensors"] == 272 and "Q8_0" in checks["tensor_types"]
    assert checks["weights_max_relative_diff"] < 1e-2 and checks["logits_max_relative_diff"] < 0.06
    assert checks["labels"]["clear_disagreements"] == 0
    modelfile = (result.out_dir / "Modelfile").read_text()
    assert "{{ else }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in modelfile
    assert sorted(result.files) == ["Modelfile", "model.gguf"]
