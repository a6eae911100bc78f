"""A generation run refined: the adapter kept by the task metric (`train.select_by: metric`),
and DPO on the review's pairs (fixed text chosen, model text rejected), on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from taskling.config import build_config
from taskling.errors import ConfigError, RunError
from taskling.generate.spec import build_generation_config
from taskling.io import read_json, read_jsonl
from taskling.rundir import GENERATION, RunDir
from taskling.train.dpo import build_pairs, dpo
from taskling.train.generation import train_generation
from taskling.train.select import MetricSelector

CODE = r"[A-Z]{2}-\d{3}"
WORDS = ["flight", "balance", "timer", "bill"]
SCRIPTED = [0.2, 0.9, 0.1]  # the metric the selector reports at evaluations 1, 2, 3: step 2 must be kept


def rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"instruction": f"ticket about my {WORDS[i % 4]} {i}", "response": f"{WORDS[i % 4][:2].upper()}-"
             f"{rng.randint(100, 999)}"} for i in range(n)]  # fmt: skip


def config(root: Path, tiny_model_dir: Path, **train: Any) -> dict[str, Any]:
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(16, 0)))
    return {
        "task": {"kind": "generate", "name": "tickets", "instruction": "Answer with the ticket code.",
                 "output": {"format": "regex", "pattern": CODE, "max_tokens": 8}},
        "data": {"train": [str(data)], "validation_fraction": 0.25},
        "model": {"base": str(tiny_model_dir), "dtype": "float32", "max_length": 96},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"batch_size": 4, "learning_rate": 5e-3, "seed": 0, "threads": 1, **train},
        "run_dir": str(root / "run"),
    }  # fmt: skip


def lora_total(weights: dict[str, torch.Tensor]) -> float:
    return float(sum(v.double().abs().sum() for k, v in weights.items() if "lora_B" in k))


@pytest.fixture(scope="module")
def selected(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float], list[float]]:
    """(run dir, the real metric at each evaluation, the LoRA-B weight total at each evaluation)."""
    root = tmp_path_factory.mktemp("select")
    raw = config(root, tiny_model_dir, max_steps=3, eval_every=1, patience=0, select_by="metric", metric_rows=4)
    real, totals = [], []
    score = MetricSelector.score

    def scripted(self: MetricSelector, model: Any) -> float:
        real.append(score(self, model))  # generates and scores for real
        from peft import get_peft_model_state_dict

        totals.append(lora_total(get_peft_model_state_dict(model)))
        return SCRIPTED[len(real) - 1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MetricSelector, "score", scripted)
        result = train_generation(build_generation_config(raw))
    assert result.best_step == 2
    return root / "run", real, totals


def test_history_carries_the_metric_and_the_best_metric_adapter_is_kept(
    selected: tuple[Path, list[float], list[float]],
) -> None:
    run_dir, real, totals = selected
    evals = [r for r in read_jsonl(RunDir(run_dir).history) if "val_loss" in r]
    assert [r["metric"] for r in evals] == SCRIPTED
    assert {r["metric_name"] for r in evals} == {"rouge_l"}
    assert [r["best"] for r in evals] == [True, True, False]
    assert len(real) == 3 and all(0.0 <= v <= 1.0 for v in real)
    assert len(set(totals)) == 3  # the adapter changed between evaluations, so "which one was kept" means something
    kept = lora_total(load_file(str(RunDir(run_dir).adapter_weights)))
    assert kept == pytest.approx(totals[1], rel=1e-6)  # step 2's, not the last
    assert read_json(RunDir(run_dir).manifest)["kind"] == GENERATION


def test_select_by_metric_is_refused_where_answers_are_labels(tiny_config: dict[str, Any]) -> None:
    raw = {**tiny_config, "train": {**tiny_config["train"], "select_by": "metric"}}
    with pytest.raises(ConfigError, match="select_by"):
        build_config(raw)


def test_select_by_metric_needs_validation_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = config(tmp_path, tiny_model_dir, max_steps=1, select_by="metric")
    raw["data"]["validation_fraction"] = 0.0
    with pytest.raises(ConfigError, match="validation"):
        train_generation(build_generation_config(raw))


def test_dpo_on_review_pairs_raises_the_chosen_over_rejected_margin(
    selected: tuple[Path, list[float], list[float]], tmp_path: Path
) -> None:
    run_dir = selected[0]
    pairs = [{"text": r["instruction"], "chosen": r["response"], "rejected": "ZZ-000", "source": "review_fixed"}
             for r in rows(6, 5)]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = dpo(run_dir, path, tmp_path / "dpo", learning_rate=5e-3, batch_size=3, max_steps=6, beta=0.5)
    assert result.steps == 6 and result.pairs == 6
    assert result.last_loss < result.first_loss
    assert result.reward_accuracy > 0.5
    assert read_json(RunDir(tmp_path / "dpo").manifest)["kind"] == GENERATION
    from taskling.generate.generator import Generator

    assert Generator.from_run(tmp_path / "dpo").generate(["ticket about my timer 3"])[0].valid


def test_pairs_from_a_generation_run_point_to_the_review(selected: tuple[Path, list[float], list[float]]) -> None:
    with pytest.raises(RunError, match="review"):
        build_pairs(selected[0])
