"""Training: answer-only loss, one chat format for training and inference, best checkpoint, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from taskling.config import build_config
from taskling.model.loader import ChatFormat, load_tokenizer
from taskling.serve.classifier import Classifier
from taskling.task import Task
from taskling.train import train
from taskling.train.loss import answer_loss, collate


def adapter_tensors(run_dir: Path, where: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / where / "adapter_model.safetensors"))


def test_loss_is_masked_to_the_answer_tokens(tiny_model_dir: Path, labels: list[str]) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    fmt = ChatFormat(tokenizer, Task(labels=tuple(labels)), max_length=128)
    ids, targets = fmt.training_ids("what is my balance", "balance")
    prompt = fmt.prompt_ids("what is my balance")
    answer = fmt.answer_ids("balance")
    assert ids == prompt + answer
    assert targets == [-100] * len(prompt) + answer
    # The answer is the label and the template's end-of-turn marker, nothing else.
    assert tokenizer.decode(answer) == "balance<|im_end|>"
    assert tokenizer.decode(ids).endswith(
        "<|im_start|>user\nwhat is my balance<|im_end|>\n<|im_start|>assistant\nbalance<|im_end|>"
    )


def test_answer_loss_ignores_prompt_tokens(tiny_model_dir: Path, labels: list[str]) -> None:
    """Changing the prompt's target ids must not change the loss; changing the answer must."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    fmt = ChatFormat(tokenizer, Task(labels=tuple(labels)), max_length=128)
    rows = [fmt.training_ids("what is my balance", "balance"), fmt.training_ids("set a timer", "timer")]
    batch = collate(rows, tokenizer.pad_token_id, "cpu")
    loss, count = answer_loss(model, batch)
    assert count == len(fmt.answer_ids("balance")) + len(fmt.answer_ids("timer"))
    # Reference: full-vocabulary logits at every position, cross-entropy with -100 ignored.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_inference_uses_the_training_prompt(trained_run: Path) -> None:
    clf = Classifier.from_run(trained_run)
    manifest = json.loads((trained_run / "run.json").read_text())
    assert manifest["chat_template"] == clf.fmt.tokenizer.chat_template
    for label in clf.task.labels:
        assert clf.fmt.answer_text(label) == manifest["label_answers"][label] == f"{label}<|im_end|>"
    # The ids the classifier scores are exactly the ids the adapter was trained on.
    train_rows = [json.loads(x) for x in (trained_run / "data" / "train.jsonl").read_text().splitlines()]
    text, label = train_rows[0]["text"], train_rows[0]["label"]
    ids, _ = clf.fmt.training_ids(text, label)
    assert ids == clf.fmt.prompt_ids(text) + clf.fmt.label_sequences[clf.task.labels.index(label)]


def test_run_directory_has_the_documented_files(trained_run: Path) -> None:
    for name in ("config.yaml", "run.json", "history.jsonl", "train_summary.json", "tokenizer", "adapter"):
        assert (trained_run / name).exists(), name
    manifest = json.loads((trained_run / "run.json").read_text())
    assert len(manifest["data"]["train_hash"]) == 64
    assert manifest["data"]["train_rows"] + manifest["data"]["validation_rows"] == 240
    assert set(manifest["versions"]) == {"torch", "transformers", "peft"}


def test_training_lowers_validation_loss(trained_run: Path) -> None:
    """Measured from outside the loop: the base model and the saved adapter on the saved validation rows.

    Fails if training does not learn (e.g. no optimizer step, or a loss mask that hides the
    answer), if the adapter saved is not the best one, or if the summary misreports it.
    """
    from transformers import AutoModelForCausalLM

    from taskling.data.load import load_file
    from taskling.train.loss import validation_loss
    from taskling.train.sft import tokenize

    clf = Classifier.from_run(trained_run, merge=False)
    val = tokenize(load_file(trained_run / "data" / "validation.jsonl", clf.task).examples, clf.fmt)
    pad = clf.fmt.tokenizer.pad_token_id
    manifest = json.loads((trained_run / "run.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(manifest["base_model_path"], dtype=torch.float32)
    untrained = validation_loss(base, val, 16, pad, "cpu")
    trained = validation_loss(clf.model, val, 16, pad, "cpu")
    assert trained < untrained - 0.05
    summary = json.loads((trained_run / "train_summary.json").read_text())
    assert summary["best_val_loss"] == pytest.approx(trained, rel=1e-4)


def test_early_stopping_keeps_the_best_adapter_not_the_last(tiny_config: dict[str, Any]) -> None:
    # A learning rate this high first helps, then wrecks the model: validation loss turns up.
    tiny_config["train"].update(learning_rate=0.3, epochs=8, eval_every=2, patience=2, batch_size=16)
    result = train(build_config(tiny_config))
    history = [json.loads(x) for x in (result.run_dir / "history.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert result.stopped_early and result.steps < 8 * 12
    assert result.best_step == best_step < result.steps
    assert evals[-1][1] > best_loss
    # Reload the kept adapter and measure: it is the best one's loss, not the last one's.
    # In float32, as it trained: reloaded in the CPU's default bf16 the loss moves by ~1e-3, as
    # much as the best and the last evaluations differ here.
    clf = Classifier.from_run(result.run_dir, merge=False, dtype="float32")
    from taskling.data.load import load_file
    from taskling.train.loss import validation_loss
    from taskling.train.sft import tokenize

    val = load_file(result.run_dir / "data" / "validation.jsonl", clf.task).examples
    loss = validation_loss(clf.model, tokenize(val, clf.fmt), 16, clf.fmt.tokenizer.pad_token_id, "cpu")
    assert loss == pytest.approx(best_loss, rel=1e-4)


def test_interrupted_run_resumes_to_the_same_adapter(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    tiny_config["train"].update(epochs=2, eval_every=4, gradient_accumulation=2, batch_size=8, checkpoint_every=3)
    tiny_config["lora"]["dropout"] = 0.1  # exercises the saved RNG state
    whole = build_config({**tiny_config, "run_dir": str(tmp_path / "whole")})
    split = build_config({**tiny_config, "run_dir": str(tmp_path / "split")})
    full = train(whole)
    first = train(split, stop_after_steps=5)
    assert first.interrupted and json.loads((tmp_path / "split/checkpoint/state.json").read_text())["step"] == 5
    second = train(split)
    assert not second.interrupted and second.steps == full.steps
    a, b = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "split/history.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (tmp_path / "whole/history.jsonl").read_text().splitlines()]


def test_bad_rows_in_skip_mode_are_reported_in_the_run(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "noisy.jsonl"
    rows = Path(tiny_config["data"]["train"][0]).read_text().splitlines()[:40]
    rows += ['{"text": "x", "label": "not_a_label"}', "{broken", '{"text": "", "label": "timer"}']
    data.write_text("\n".join(rows) + "\n")
    tiny_config["data"].update(train=[str(data)], on_bad_rows="skip")
    tiny_config["train"].update(max_steps=1)
    result = train(build_config(tiny_config))
    assert result.skipped_rows == 3 and result.train_rows + result.validation_rows == 40
    bad = [json.loads(x) for x in (result.run_dir / "data" / "bad_rows.jsonl").read_text().splitlines()]
    assert sorted((b["line"], b["reason"]) for b in bad) == [
        (41, "label_not_in_set"),
        (42, "malformed"),
        (43, "empty_text"),
    ]


def test_a_save_cut_between_its_renames_is_recovered(tmp_path: Path) -> None:
    from taskling.train.checkpoint import recover_swaps, swap_in

    final, new = tmp_path / "adapter", tmp_path / "adapter.partial"
    final.mkdir()
    (final / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    swap_in(new, final)
    assert (final / "w").read_text() == "new" and not new.exists()
    # The crash window: the old version moved aside, the new one not yet renamed in.
    final.replace(tmp_path / "adapter.old")
    (tmp_path / "adapter.partial").mkdir()
    recover_swaps(tmp_path)
    assert (final / "w").read_text() == "new"
    assert not (tmp_path / "adapter.old").exists() and not (tmp_path / "adapter.partial").exists()


def test_history_skips_a_torn_last_line_but_not_a_bad_one_inside(tmp_path: Path) -> None:
    from taskling.errors import DataError
    from taskling.train.loop import iter_history

    (tmp_path / "history.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train_lo')
    assert [r["step"] for r in iter_history(tmp_path)] == [1, 2]  # a crash cut the last write
    (tmp_path / "history.jsonl").write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"history.jsonl:2"):  # damage in the middle is not a crash
        list(iter_history(tmp_path))
