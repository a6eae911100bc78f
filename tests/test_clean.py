"""Cleaning, splitting and leakage: each injected problem is caught with the right count."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from noisy_logs import load_pairs, make_noisy_logs
from taskling.config import build_config
from taskling.data.clean import CleanConfig, category_status, clean_examples, duplicate_clusters, normalize
from taskling.data.distill import DistillConfig, distill, parse_log_row, read_logs
from taskling.data.load import Example, load_file
from taskling.data.split import MANIFEST, SplitConfig, assert_no_leakage, find_leaks, freeze_gold, split_dataset
from taskling.errors import DataError
from taskling.task import Task
from taskling.train.sft import prepare_data

FIXTURES = Path(__file__).parent / "fixtures"
NO_MODEL = CleanConfig(label_errors=False)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def labels() -> list[str]:
    return (FIXTURES / "clinc8_labels.txt").read_text().split()


@pytest.fixture(scope="module")
def gold() -> list[Example]:
    return load_file(FIXTURES / "clinc8_gold.jsonl").examples


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory, labels: list[str], gold: list[Example]) -> dict[str, Any]:
    """Noisy logs from the clinc8 fixtures, distilled once against a frozen gold set."""
    root = tmp_path_factory.mktemp("distill")
    logs = make_noisy_logs(load_pairs(FIXTURES / "clinc8_train.jsonl"), gold, labels, seed=0)
    (root / "gold").mkdir()
    freeze_gold(root / "gold", gold, SplitConfig(), CleanConfig())
    config = DistillConfig(min_confidence=0.7, gold_manifest=root / "gold" / MANIFEST)
    result = distill([logs.write(root / "logs.jsonl")], Task(labels=labels), root / "out", config)
    return {"logs": logs, "result": result, "out": root / "out"}


# ---------------------------------------------------------------- building blocks


def test_normalize_folds_case_punctuation_and_spacing() -> None:
    assert normalize("  What's   MY balance?! ") == normalize("what s my balance")
    assert normalize("Ｆｕｌｌ width") == "full width"


def test_exact_and_near_duplicates_are_grouped_and_threshold_is_configurable() -> None:
    texts = [
        "how do i set a timer for ten minutes",
        "How do I set a timer for ten minutes?",
        "how do i set a timer for ten minutes please",
        "what is the weather like in paris tomorrow",
    ]
    assert duplicate_clusters(texts, NO_MODEL) == [[0, 1, 2]]
    strict = CleanConfig(label_errors=False, minhash_threshold=0.99)
    assert duplicate_clusters(texts, strict) == [[0, 1]]
    off = CleanConfig(label_errors=False, near_duplicates="off")
    assert duplicate_clusters(texts, off) == [[0, 1]]


def test_unknown_clean_setting_is_an_error() -> None:
    with pytest.raises(ValidationError, match="extra"):
        CleanConfig(minhash_treshold=0.5)  # type: ignore[call-arg]


def test_conflicting_labels_go_to_review_not_resolved() -> None:
    rows = [
        Example("cancel my card", "cancel"),
        Example("Cancel my card!", "card_declined"),
        Example("cancel my card", "cancel"),
        Example("what time is it in tokyo", "timer"),
    ]
    result = clean_examples(rows, ["cancel", "card_declined", "timer"], NO_MODEL)
    assert [d.destination for d in result.decisions] == ["review", "review", "review", "train"]
    assert result.conflicts[0]["labels"] == {"cancel": 2, "card_declined": 1}


def test_category_status_follows_the_guide() -> None:
    assert [category_status(n) for n in (0, 49, 50, 99, 100, 300, 301)] == [
        "missing",
        "too few",
        "thin",
        "thin",
        "ok",
        "ok",
        "plenty",
    ]


def test_openai_log_confidence_comes_from_logprobs() -> None:
    row = {
        "request": {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "book me a flight"}]},
        "response": {
            "choices": [
                {
                    "message": {"role": "assistant", "content": "book_flight"},
                    "logprobs": {
                        "content": [{"token": "book", "logprob": -0.1}, {"token": "_flight", "logprob": -0.2}]
                    },
                }
            ]
        },
        "timestamp": "2026-11-01T10:00:00Z",
    }
    text, label, confidence, meta = parse_log_row(row)
    assert (text, label, meta) == ("book me a flight", "book_flight", {"timestamp": "2026-11-01T10:00:00Z"})
    assert confidence == pytest.approx(math.exp(-0.3))
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "timer"}], "logprob": -1}
    assert parse_log_row(chat)[1:3] == ("timer", pytest.approx(math.exp(-1)))


def test_bad_log_rows_are_rejected_with_reasons(tmp_path: Path) -> None:
    path = tmp_path / "logs.jsonl"
    path.write_text('{"input": "a", "output": "timer", "confidence": 1.5}\n[1]\n{"prompt": "b"}\n', encoding="utf-8")
    rows, bad = read_logs([path])
    assert rows == []
    assert [(b["line"], b["reason"]) for b in bad] == [(1, "bad_confidence"), (2, "malformed"), (3, "missing_field")]


# ---------------------------------------------------------------- distill on noisy logs


def test_every_row_lands_in_exactly_one_place(distilled: dict[str, Any]) -> None:
    out, result = distilled["out"], distilled["result"]
    train, review, rejected = (read_jsonl(out / f"{n}.jsonl") for n in ("train", "review", "rejected"))
    assert result.rows_read == distilled["logs"].truth["rows"]
    assert len(train) + len(review) + len(rejected) == result.rows_read
    assert (len(train), len(review), len(rejected)) == (result.train, result.review, result.rejected)
    report = json.loads((out / "report.json").read_text())
    assert report["train"] + report["review_queue"] + report["rejected"] == report["rows_read"]
    assert sum(c["count"] for c in report["categories"]) == len(train)


def test_each_injected_problem_is_caught_with_the_right_count(distilled: dict[str, Any]) -> None:
    truth, report = distilled["logs"].truth, distilled["result"].report
    assert report["invented_labels"] == truth["invented"]
    assert report["rejected_reasons"]["invented_label"] == sum(truth["invented"].values())
    assert report["labels_normalised"] == truth["loose"]
    assert report["rejected_reasons"]["malformed"] + report["rejected_reasons"]["empty_text"] == truth["malformed"]
    assert report["review_reasons"]["low_confidence"] == truth["low_confidence"]
    assert report["duplicates_removed"] == {"exact": truth["exact_duplicates"], "near": truth["near_duplicates"]}
    assert report["conflicts"] == truth["conflict_groups"]
    assert report["review_reasons"]["conflicting_labels"] == 2 * truth["conflict_groups"]
    assert report["gold_leaks"] == report["rejected_reasons"]["gold_leak"] == truth["gold_leaks"]


def test_flipped_labels_are_ranked_for_review(distilled: dict[str, Any]) -> None:
    review = read_jsonl(distilled["out"] / "review.jsonl")
    flagged = [r for r in review if r["reason"] == "likely_label_error"]
    flipped = distilled["logs"].flipped_texts
    caught = {r["text"] for r in flagged} & flipped
    assert len(caught) >= 7, f"caught {len(caught)} of {len(flipped)} flipped labels"
    assert len(caught) / len(flagged) >= 0.6
    # The queue starts with label-error candidates, most suspicious first.
    assert review[0]["reason"] == "likely_label_error" and review[0]["detail"].startswith("rank 1:")


def test_data_report_cli_writes_json(distilled: dict[str, Any], tmp_path: Path, labels: list[str]) -> None:
    from taskling.cli import app

    task = tmp_path / "task.yaml"
    task.write_text("labels: [" + ", ".join(labels) + "]\n", encoding="utf-8")
    data = tmp_path / "train.jsonl"
    data.write_text((distilled["out"] / "train.jsonl").read_text(), encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "report", str(data), "--task", str(task), "--set", "label_errors=false"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "train.report.json").read_text())
    assert report["rows_read"] == distilled["result"].train
    assert report["duplicates_removed"] == {"exact": 0, "near": 0}
    assert all(c["status"] == "too few" for c in report["categories"])
    assert "few-shot prompting disguised as fine-tuning" in report["guide"]
    assert "too few" in result.output
    bad = CliRunner().invoke(app, ["data", "report", str(data), "--task", str(task), "--set", "treshold=1"])
    assert bad.exit_code == 2 and "treshold" in bad.output


# ---------------------------------------------------------------- split, freeze, leakage


def _rows(labels: list[str]) -> list[Example]:
    rows = load_file(FIXTURES / "clinc8_train.jsonl").examples
    rare = [ex for ex in rows if ex.label == "timer"][:3]
    return [ex for ex in rows if ex.label != "timer"] + rare


def test_split_is_stratified_and_a_rare_label_gets_gold(tmp_path: Path, labels: list[str]) -> None:
    rows = _rows(labels)
    result = split_dataset(rows, tmp_path, SplitConfig(gold_fraction=0.15, min_gold_per_label=2, seed=1), NO_MODEL)
    gold_labels = {ex.label for ex in result.gold}
    assert gold_labels == set(labels)
    assert sum(ex.label == "timer" for ex in result.gold) == 2
    assert sum(ex.label == "timer" for ex in result.train + result.validation) == 1
    assert len(result.train) + len(result.validation) + len(result.gold) == len(rows)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["rows"] == len(result.gold) and manifest["label_counts"]["timer"] == 2
    assert find_leaks(result.train + result.validation, result.gold, NO_MODEL) == []


def test_near_duplicates_never_straddle_train_and_gold(tmp_path: Path) -> None:
    base = load_file(FIXTURES / "clinc8_train.jsonl").examples
    variants = [Example(ex.text + " please", ex.label) for ex in base[:40]]
    result = split_dataset(base + variants, tmp_path, SplitConfig(seed=3), NO_MODEL)
    assert find_leaks(result.train + result.validation, result.gold, NO_MODEL) == []


def test_gold_is_frozen_and_later_leaks_are_dropped(tmp_path: Path, labels: list[str]) -> None:
    rows = _rows(labels)
    first = split_dataset(rows, tmp_path, SplitConfig(seed=0), NO_MODEL)
    frozen = (tmp_path / "gold.jsonl").read_text()
    smuggled = [Example(first.gold[0].text.upper(), first.gold[0].label), Example(first.gold[1].text + " now", "x")]
    fresh = (first.train + first.validation)[:50]
    again = split_dataset(fresh + smuggled, tmp_path, SplitConfig(seed=9), NO_MODEL)
    assert again.gold_reused and (tmp_path / "gold.jsonl").read_text() == frozen
    assert [leak["kind"] for leak in again.leaked] == ["exact", "near"]
    assert len(read_jsonl(tmp_path / "leaked.jsonl")) == 2
    (tmp_path / "gold.jsonl").write_text(frozen + '{"text": "sneaky", "label": "timer"}\n')
    with pytest.raises(DataError, match="changed after it was frozen"):
        split_dataset(rows, tmp_path, SplitConfig(), NO_MODEL)


def test_training_refuses_gold_rows(tmp_path: Path, labels: list[str]) -> None:
    rows = _rows(labels)
    split = split_dataset(rows, tmp_path / "split", SplitConfig(seed=0), NO_MODEL)
    leaky = tmp_path / "leaky.jsonl"
    text = (tmp_path / "split" / "train.jsonl").read_text()
    text += json.dumps({"text": split.gold[0].text + " please", "label": split.gold[0].label}) + "\n"
    leaky.write_text(text)
    raw = {
        "task": {"labels": labels},
        "data": {"train": [str(leaky)], "gold_manifest": str(tmp_path / "split" / MANIFEST)},
    }
    with pytest.raises(DataError, match="1 training/validation rows leak") as err:
        prepare_data(build_config(raw))
    assert split.gold[0].text in str(err.value)
    raw["data"]["train"] = [str(tmp_path / "split" / "train.jsonl")]
    assert len(prepare_data(build_config(raw)).train) > 0
    assert_no_leakage({"train": split.train}, tmp_path / "split" / MANIFEST)


@pytest.mark.slow
def test_minilm_embeddings_and_semantic_near_duplicates() -> None:
    import numpy as np

    from taskling.model.embed import embed

    vectors = embed(["what's my account balance", "how much money do i have", "set a timer for 5 minutes"])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    texts = ["how much money do i have in my account", "how much money is in my account", "set a timer"]
    semantic = CleanConfig(label_errors=False, near_duplicates="embedding", embedding_threshold=0.85)
    assert duplicate_clusters(texts, semantic) == [[0, 1]]


def test_split_cli_freezes_gold_once(tmp_path: Path, labels: list[str]) -> None:
    from taskling.cli import app

    task = tmp_path / "task.yaml"
    task.write_text("task:\n  labels: [" + ", ".join(labels) + "]\n", encoding="utf-8")
    data = str(FIXTURES / "clinc8_train.jsonl")
    args = ["split", data, "--out", str(tmp_path / "split"), "--task", str(task), "--min-gold", "3"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "froze a new gold set" in first.output
    manifest = json.loads((tmp_path / "split" / MANIFEST).read_text())
    assert min(manifest["label_counts"].values()) >= 3
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "reused the frozen gold set" in again.output
    assert json.loads((tmp_path / "split" / MANIFEST).read_text()) == manifest
