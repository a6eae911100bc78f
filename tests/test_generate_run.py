"""A generation run end to end on the tiny model: train (through `taskling train`), generate, eval, baseline, gate."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import regex
import yaml
from typer.testing import CliRunner

from taskling.cli import app
from taskling.errors import RunError
from taskling.evaluate.generation import evaluate_generation
from taskling.evaluate.generation_gate import gate_generation, pin_generation_baseline
from taskling.generate.generator import Generator
from taskling.io import read_json
from taskling.rundir import GENERATION, RunDir

CODE = r"[A-Z]{2}-\d{3}"
WORDS = ["flight", "balance", "timer", "bill", "weather", "transfer", "alarm", "rate"]


def rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        code = f"{word[:2].upper()}-{rng.randint(100, 999)}"
        out.append({"instruction": f"open a ticket about my {word} {i}", "response": code, "slice": word[0]})
    return out


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def gen_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, gold file): trained once through `taskling train`, which dispatches on task.kind."""
    root = tmp_path_factory.mktemp("gen")
    train = write_jsonl(root / "train.jsonl", [*rows(24, 0), {"instruction": "bad row", "response": "nope"}])
    gold = write_jsonl(root / "gold.jsonl", rows(8, 1))
    config = {
        "task": {"kind": "generate", "name": "tickets", "instruction": "Answer with the ticket code.",
                 "output": {"format": "regex", "pattern": CODE, "max_tokens": 8}},
        "data": {"train": [str(train)], "validation_fraction": 0.25, "on_bad_rows": "skip"},
        "model": {"base": str(tiny_model_dir), "dtype": "float32", "max_length": 96},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "seed": 0, "threads": 1},
        "run_dir": str(root / "run"),
    }  # fmt: skip
    path = root / "gen.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    return root / "run", gold


def test_train_dispatches_and_writes_a_generation_run(gen_run: tuple[Path, Path]) -> None:
    run, _ = gen_run
    manifest = read_json(RunDir(run).manifest)
    assert manifest["kind"] == GENERATION and manifest["task"]["output"]["pattern"] == CODE
    assert manifest["data"]["train_rows"] + manifest["data"]["validation_rows"] == 24
    assert manifest["data"]["skipped_rows"] == 1
    bad = [json.loads(line) for line in RunDir(run).bad_rows.read_text().splitlines()]
    assert [(b["line"], b["reason"]) for b in bad] == [(25, "answer_fails_format")]
    history = [json.loads(line) for line in RunDir(run).history.read_text().splitlines()]
    assert any("val_loss" in h for h in history) and RunDir(run).is_finished()
    # The kept rows read back as instruction/response rows with their slice.
    first = json.loads(RunDir(run).train_data.read_text().splitlines()[0])
    assert set(first) == {"instruction", "response", "slice"}
    # Unset auto fields are recorded as resolved, like a classifier run's (warmup was left unset).
    recorded = yaml.safe_load(RunDir(run).config.read_text())["train"]
    assert recorded["warmup_ratio"] is not None and recorded["epochs"] == 1


def test_label_set_objective_is_refused_for_generation(gen_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = gen_run
    config = yaml.safe_load(RunDir(run).config.read_text())
    config["train"]["objective"] = "labels"
    config["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "train.objective=labels" in result.output
    assert not (tmp_path / "run").exists()


def test_generator_from_run_answers_in_format(gen_run: tuple[Path, Path]) -> None:
    run, _ = gen_run
    gen = Generator.from_run(run, device="cpu", dtype="float32")
    results = gen.generate(["open a ticket about my flight", "x"], batch_size=2)
    assert all(regex.fullmatch(CODE, r.output) and r.valid for r in results)
    with pytest.raises(RunError, match="generation run"):
        from taskling.extract.extractor import Extractor

        Extractor.from_run(run)


def test_eval_writes_metrics_per_slice_and_the_worst_slice(gen_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, gold = gen_run
    result = evaluate_generation(run, gold, out_dir=tmp_path, embed=False)
    m = read_json(tmp_path / "metrics.json")
    assert m == json.loads(json.dumps(result.metrics))
    assert m["kind"] == "generation" and m["n"] == 8 and m["metric"] == "rouge_l"
    assert m["validity_rate"] == 1.0 and m["cut_by_max_tokens"] == 0
    assert set(m["means"]) == {"exact", "normalised", "rouge_l", "chrf", "valid"}
    assert set(m["per_slice"]) == {w[0] for w in WORDS}
    assert m["worst_slice_score"] == min(s["rouge_l"] for s in m["per_slice"].values())
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all(regex.fullmatch(CODE, p["output"]) for p in preds)
    assert all(set(p["scores"]) >= {"rouge_l", "valid"} for p in preds)


def test_baseline_and_gate_on_the_per_row_metric(gen_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, gold = gen_run
    cand = tmp_path / "cand"
    cand.mkdir()
    for name in ("run.json", "adapter"):
        (cand / name).symlink_to(RunDir(run).root / name)
    evaluate_generation(run, gold, out_dir=cand, embed=False)
    golds = [json.loads(line) for line in gold.read_text().splitlines()]
    # A teacher that answers every gold row wrong: the candidate cannot be worse.
    weak = write_jsonl(tmp_path / "weak.jsonl", [{"text": g["instruction"], "output": "ZZ-000"} for g in golds])
    pin_generation_baseline(cand, gold, weak, embed=False)
    verdict = gate_generation(cand, margin=0.0)
    assert verdict.passed, verdict.checks
    assert read_json(RunDir(cand).gate)["passed"] is True
    # A perfect teacher: the tiny candidate falls short on the mean and on slices.
    perfect = write_jsonl(
        tmp_path / "perfect.jsonl", [{"text": g["instruction"], "output": g["response"]} for g in golds]
    )
    with pytest.raises(Exception, match="already pinned"):
        pin_generation_baseline(cand, gold, perfect, embed=False)
    pin_generation_baseline(cand, gold, perfect, embed=False, repin=True)
    verdict = gate_generation(cand, margin=0.01)
    assert not verdict.passed
    assert verdict.reference_mean == 1.0 and verdict.candidate_mean < 1.0
    assert not verdict.checks[0]["passed"] and not verdict.checks[1]["passed"]
    # The absolute slice floor alone fails a candidate that holds the mean.
    pin_generation_baseline(cand, gold, weak, embed=False, repin=True)
    assert not gate_generation(cand, margin=1.0, slice_floor=0.99).passed


def test_cli_generate_eval_baseline_gate(gen_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, gold = gen_run
    runner = CliRunner()
    out = runner.invoke(app, ["generate", str(run), "open a ticket about my bill", "--json"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.output.strip().splitlines()[-1])
    assert regex.fullmatch(CODE, row["output"]) and row["valid"] is True and row["n_tokens"] > 0
    scored = tmp_path / "scored"
    out = runner.invoke(app, ["eval", str(run), "--data", str(gold), "--out", str(scored), "--no-embed"])
    assert out.exit_code == 0, out.output
    assert "format validity" in out.output and read_json(scored / "metrics.json")["validity_rate"] == 1.0


def test_cli_bad_gold_row_is_a_clear_error(gen_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = gen_run
    bad = write_jsonl(
        tmp_path / "gold.jsonl", [{"instruction": "a", "response": "AB-123"}, {"instruction": "b", "response": "b"}]
    )
    out = CliRunner().invoke(app, ["eval", str(run), "--data", str(bad), "--no-embed"])
    assert out.exit_code != 0
    assert f"{bad}:2" in out.output and "fix" in out.output


def test_cli_generate_from_a_file_flags_empty_lines(gen_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = gen_run
    messages = tmp_path / "in.txt"
    messages.write_text("open a ticket about my rate\n\nopen a ticket about my alarm\n")
    out = CliRunner().invoke(app, ["generate", str(run), "--file", str(messages), "--json"])
    assert out.exit_code == 1  # the empty line
    lines = [json.loads(line) for line in out.output.splitlines() if line.startswith("{")]
    assert [("output" in r, r.get("line")) for r in lines] == [(True, None), (False, 2), (True, None)]
