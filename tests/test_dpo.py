"""DPO refinement: pairs from the SFT model's mistakes and a teacher, the loss, the new run, the verdict."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from taskling.errors import DataError
from taskling.evaluate.refine import compare
from taskling.train.dpo import build_pairs, dpo, dpo_loss

FIXTURES = Path(__file__).parent / "fixtures"


def test_dpo_loss_values() -> None:
    zero = torch.zeros(3)
    loss, margin = dpo_loss(zero, zero, zero, zero, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))  # policy == reference: no preference yet
    loss, margin = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert margin.item() == pytest.approx(0.5 * ((-1 + 2) - (-5 + 2)))  # 2.0
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))))


@pytest.fixture(scope="module")
def sft_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A private copy: DPO writes beside the run and must not touch the shared session run.
    run = tmp_path_factory.mktemp("sft") / "run"
    shutil.copytree(trained_run, run)
    return run


def test_pairs_come_from_mistakes_and_teacher_disagreements(sft_run: Path, tmp_path: Path, labels: list[str]) -> None:
    from taskling.serve.classifier import Classifier

    train_rows = [json.loads(x) for x in (sft_run / "data" / "train.jsonl").read_text().splitlines()][:24]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    # The teacher says "balance" for everything: wherever the student says otherwise, a pair.
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("".join(json.dumps({"text": r["text"], "label": "balance"}) + "\n" for r in train_rows[:10]))
    path, counts = build_pairs(sft_run, tmp_path / "pairs.jsonl", data=data, teacher=teacher)
    pairs = [json.loads(x) for x in path.read_text().splitlines()]

    said = {p.text: p.label for p in Classifier.from_run(sft_run).predict([r["text"] for r in train_rows])}
    gold = {r["text"]: r["label"] for r in train_rows}
    mistakes = [p for p in pairs if p["source"] == "sft_mistake"]
    assert len(mistakes) == sum(said[t] != gold[t] for t in gold)
    assert all(p["chosen"] == gold[p["text"]] and p["rejected"] == said[p["text"]] for p in mistakes)
    taught = [p for p in pairs if p["source"] == "teacher_disagreement"]
    assert len(taught) == sum(said[r["text"]] != "balance" for r in train_rows[:10])
    assert all(p["chosen"] == "balance" and p["rejected"] != "balance" for p in taught)
    assert counts["pairs"] == len(pairs) and counts["rows"] == 24
    assert all(p["chosen"] in labels and p["rejected"] in labels for p in pairs)


def test_dpo_refines_into_a_new_run_and_reports_per_category(sft_run: Path, tmp_path: Path) -> None:
    from taskling.serve.classifier import Classifier

    pairs_path, counts = build_pairs(sft_run, tmp_path / "pairs.jsonl", margin_below=1.01, limit=24)
    assert counts["pairs"] == 24  # every row: a mistake, or a right answer paired with its runner-up
    out = tmp_path / "run-dpo"
    result = dpo(sft_run, pairs_path, out, beta=0.5, learning_rate=5e-3, epochs=3, batch_size=8)
    assert result.run_dir == out and result.pairs == counts["pairs"]
    assert result.first_loss == pytest.approx(math.log(2), abs=1e-3)  # starts at the reference
    assert result.last_loss < result.first_loss and result.reward_accuracy > 0.5
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["dpo"]["parent"] == str(sft_run) and (out / "adapter").is_dir()
    before = (sft_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != before
    # The refined run is an ordinary run: the classifier loads it and stays inside the label set.
    preds = Classifier.from_run(out).predict(["what is my balance", "book a flight"])
    assert all(p.label in Classifier.from_run(sft_run).task.labels for p in preds)

    report = compare(sft_run, out, FIXTURES / "clinc8_gold.jsonl")
    # Recomputed here from each run's own predictions, not from the report's numbers: fails if
    # compare scores one run twice, swaps before and after, or mislabels a category.
    gold = [json.loads(x) for x in (FIXTURES / "clinc8_gold.jsonl").read_text().splitlines()]
    texts = [g["text"] for g in gold]
    said = {"before": Classifier.from_run(sft_run).predict(texts), "after": Classifier.from_run(out).predict(texts)}
    for when, preds in said.items():
        right = [p.label == g["label"] for p, g in zip(preds, gold, strict=True)]
        assert report[f"accuracy_{when}"] == pytest.approx(sum(right) / len(gold))
        for label, row in report["per_category"].items():
            mine = [r for r, g in zip(right, gold, strict=True) if g["label"] == label]
            assert row[when] == pytest.approx(sum(mine) / len(mine)), (when, label)
            assert row["support"] == len(mine)
    for label, row in report["per_category"].items():
        assert (label in report["helped"]) == (row["after"] > row["before"])
        assert (label in report["hurt"]) == (row["after"] < row["before"])
    assert set(report["per_category"]) == set(json.loads((sft_run / "run.json").read_text())["task"]["labels"])
    assert isinstance(report["gate_passed"], bool)
    assert json.loads((out / "gate.json").read_text())["passed"] == report["gate_passed"]


def test_bad_pairs_file_names_the_line(sft_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"text": "x", "chosen": "balance", "rejected": "not-a-label"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1.*not a label"):
        dpo(sft_run, bad, tmp_path / "out")
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:1"):
        dpo(sft_run, bad, tmp_path / "out")


def test_cli_pairs_and_dpo_on_an_extraction_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    from taskling.cli import app

    config = tmp_path / "extract.yaml"
    config.write_text(
        f"task:\n  json_schema: {FIXTURES / 'extract8_schema.json'}\n"
        f"data:\n  train: [{FIXTURES / 'extract8_train.jsonl'}]\n  validation_fraction: 0.0\n"
        f"model:\n  base: {tiny_model_dir}\n  dtype: float32\n  max_length: 160\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        "train: {max_steps: 4, batch_size: 16, learning_rate: 0.005, threads: 1}\n"
        f"run_dir: {tmp_path / 'run'}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["extract-train", str(config)])
    assert result.exit_code == 0, result.output
    test_rows = tmp_path / "test.jsonl"  # a dozen rows keep the three decoding passes quick
    test_rows.write_text("".join((FIXTURES / "extract8_test.jsonl").read_text().splitlines(keepends=True)[:12]))
    result = runner.invoke(
        app, ["pairs", str(tmp_path / "run"), "--data", str(test_rows), "--out", str(tmp_path / "p.jsonl")]
    )
    assert result.exit_code == 0, result.output
    pairs = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert pairs and all(json.loads(p["chosen"]) != json.loads(p["rejected"]) for p in pairs)
    result = runner.invoke(
        app,
        [
            "dpo",
            str(tmp_path / "run"),
            "--pairs",
            str(tmp_path / "p.jsonl"),
            "--gold",
            str(test_rows),
            "--epochs",
            "0.2",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run-dpo" / "dpo_report.json").read_text())
    assert report["kind"] == "extraction" and "intent" in report["per_category"] and "city" in report["per_category"]
    assert set(report["gate"]) == {"intent", "domain", "day"}
    assert "did DPO help?" in result.output
