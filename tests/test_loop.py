"""The relabel loop: sampling, gold versions, training set versions, retrain through the gate, a cycle."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from taskling.data.gold import add_gold, load_version, versions
from taskling.data.load import Example, load_file, stratified_split, write_examples
from taskling.data.split import load_gold
from taskling.io import write_jsonl
from taskling.monitor.drift import MonitorConfig, hashing_embedder, load_reference, monitor_rows
from taskling.monitor.retrain import (
    SampleConfig,
    new_training_version,
    read_registry,
    retrain,
    run_cycle,
    sample_rows,
    score_on_gold,
)
from taskling.serve.classifier import Prediction

FIXTURES = Path(__file__).parent / "fixtures"
CONFIG = MonitorConfig(embedder="hashing", min_rows=40)


# ---------------------------------------------------------------- a cheap stand-in specialist


class HashCentroid:
    """Nearest class centroid on hashing features, softmax over cosine similarities.

    Trains in milliseconds and predicts like a `Classifier` (probabilities over the labels).
    """

    def __init__(self, labels: list[str], centroids: np.ndarray) -> None:
        self.labels, self.centroids = labels, centroids

    def predict(self, texts: list[str], *, batch_size: int = 32) -> list[Prediction]:
        logits = 20 * hashing_embedder(texts) @ self.centroids.T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        out = []
        for text, row in zip(texts, probs, strict=True):
            k = int(row.argmax())
            out.append(
                Prediction(text, self.labels[k], float(row[k]), dict(zip(self.labels, row.tolist(), strict=True)))
            )
        return out


def make_trainer(labels: list[str], *, shuffle_labels: bool = False) -> Any:
    def train(train_file: Path, run_dir: Path) -> None:
        rows = load_file(train_file).examples
        if shuffle_labels:  # the deliberately bad candidate
            shuffled = [ex.label for ex in rows]
            random.Random(0).shuffle(shuffled)
            rows = [Example(ex.text, y) for ex, y in zip(rows, shuffled, strict=True)]
        train, validation = stratified_split(rows, 0.15, seed=0)
        write_examples(run_dir / "data" / "train.jsonl", train)
        write_examples(run_dir / "data" / "validation.jsonl", validation)
        x = hashing_embedder([ex.text for ex in rows])
        y = np.array([ex.label for ex in rows])
        centroids = np.stack([x[y == k].mean(axis=0) if (y == k).any() else np.zeros(x.shape[1]) for k in labels])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-9)
        np.save(run_dir / "centroids.npy", centroids)
        (run_dir / "run.json").write_text(json.dumps({"task": {"labels": labels}}))

    return train


def load_hashlr(run_dir: Path) -> HashCentroid:
    labels = json.loads((run_dir / "run.json").read_text())["task"]["labels"]
    return HashCentroid(labels, np.load(run_dir / "centroids.npy"))


def as_log_rows(model: Any, texts: list[str], start: float = 0.0) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "time": start + i,
            "text": p.text,
            "label": p.label,
            "probability": p.probability,
            "probabilities": p.probabilities,
        }
        for i, p in enumerate(model.predict(texts))
    ]


@pytest.fixture(scope="module")
def pools() -> dict[str, list[Example]]:
    return {
        "train": load_file(FIXTURES / "clinc8_train.jsonl").examples,
        "gold": load_file(FIXTURES / "clinc8_gold.jsonl").examples,
        "oos": load_file(FIXTURES / "clinc_oos60.jsonl").examples,
    }


# ---------------------------------------------------------------- sampling


def test_sample_prefers_uncertain_and_unfamiliar_rows_and_never_gold(
    tmp_path: Path, pools: dict[str, list[Example]], labels: list[str]
) -> None:
    run = tmp_path / "prod"
    make_trainer(labels)(_write(tmp_path / "t.jsonl", pools["train"]), run)
    ref = load_reference(run, CONFIG, hashing_embedder)
    familiar = [ex.text for ex in pools["train"][:60]]
    oos = [ex.text for ex in pools["oos"][:12]]
    gold_copies = [ex.text for ex in pools["gold"][:5]]
    near_gold = [ex.text + "?" for ex in pools["gold"][5:8]]

    def row(text: str, top: float) -> dict[str, Any]:
        probs = {label: (top if label == "balance" else (1 - top) / 7) for label in labels}
        return {"id": 0, "time": 0.0, "text": text, "label": "balance", "probability": top, "probabilities": probs}

    # confident on familiar rows; unsure on the out-of-scope ones and on the gold copies
    rows = [
        *(row(t, 0.95) for t in familiar),
        *(row(t, 0.3) for t in [*oos, *gold_copies, *near_gold]),
        *(row(t, 0.95) for t in familiar[:5]),
    ]
    result = sample_rows(rows, ref, hashing_embedder, pools["gold"], SampleConfig(budget=15, random_share=0.2))
    assert len(result.rows) == 15
    assert result.excluded["duplicate"] == 5
    # the 8 planted copies, plus any training row CLINC itself near-duplicates into its test split
    assert result.excluded["gold_leak"] >= 8
    gold_texts = {ex.text for ex in pools["gold"]} | set(near_gold)
    assert not {r["text"] for r in result.rows} & gold_texts
    active = [r for r in result.rows if r["picked"] == "active"]
    assert len(active) == 12 and sum(r["picked"] == "random" for r in result.rows) == 3
    # the out-of-scope queries are both unfamiliar and uncertain: they fill the active picks
    assert sum(r["text"] in set(oos) for r in active) >= 9
    assert all({"text", "label", "model_label", "margin", "max_similarity"} <= set(r) for r in result.rows)


# ---------------------------------------------------------------- gold versions


def _write(path: Path, rows: list[Example]) -> Path:
    write_examples(path, rows)
    return path


def test_gold_versions_grow_without_rewriting_old_ones(
    tmp_path: Path, pools: dict[str, list[Example]], labels: list[str]
) -> None:
    gold_root = tmp_path / "gold"
    first = add_gold(gold_root, [_write(tmp_path / "a.jsonl", pools["gold"][:40])], labels)
    assert first.version.name == "v1" and first.added == 40
    v1_hash = first.version.content_hash
    extra = [*pools["gold"][40:], pools["gold"][0], pools["gold"][1], pools["train"][3]]
    second = add_gold(gold_root, [_write(tmp_path / "b.jsonl", extra)], labels, train=pools["train"][:5])
    assert versions(gold_root) == ["v1", "v2"]
    assert second.added == 40 and len(second.version.rows) == 80
    assert sorted(r["reason"] for r in second.rejected) == [
        "already_in_gold",
        "already_in_gold",
        "copies_training_row_exact",
    ]
    assert load_version(gold_root, "v1").content_hash == v1_hash  # v1 is untouched
    rows, manifest = load_gold(gold_root / "v2" / "gold.manifest.json")  # the split stage reads it
    assert len(rows) == 80 and manifest["parent"] == first.version.tag and manifest["version"] == "v2"
    assert len((gold_root / "v2" / "rejected.jsonl").read_text().splitlines()) == 3

    run = tmp_path / "prod"
    make_trainer(labels)(_write(tmp_path / "t.jsonl", pools["train"]), run)
    scored = score_on_gold(load_hashlr(run), second.version, labels, run / "evals" / "gold-v2")
    saved = json.loads((run / "evals" / "gold-v2" / "metrics.json").read_text())
    assert saved["gold_version"] == "v2" and saved["gold_tag"] == second.version.tag
    assert saved["metrics"]["n"] == 80 and scored["metrics"]["accuracy"] == saved["metrics"]["accuracy"]


def test_gold_add_cli(tmp_path: Path, pools: dict[str, list[Example]], labels: list[str]) -> None:
    from typer.testing import CliRunner

    from taskling.cli import app

    src = _write(tmp_path / "g.jsonl", pools["gold"][:20])
    result = CliRunner().invoke(app, ["gold", "add", str(tmp_path / "gold"), str(src), "--labels", ",".join(labels)])
    assert result.exit_code == 0, result.output
    assert "v1@" in result.output and "20 rows" in result.output
    again = CliRunner().invoke(app, ["gold", "add", str(tmp_path / "gold"), str(src), "--labels", ",".join(labels)])
    assert again.exit_code == 2 and "none of the 20 new rows" in " ".join(again.output.split())


# ---------------------------------------------------------------- training set versions


def test_relabeled_rows_go_through_cleaning_into_a_new_version(
    tmp_path: Path, pools: dict[str, list[Example]], labels: list[str]
) -> None:
    gold_root = tmp_path / "gold"
    add_gold(gold_root, [_write(tmp_path / "gold.jsonl", pools["gold"])], labels)
    base = _write(tmp_path / "base.jsonl", pools["train"][:100])
    relabeled = [
        *({"text": ex.text, "label": ex.label} for ex in pools["train"][100:130]),  # 30 good new rows
        {"text": pools["oos"][0].text, "label": "oos"},  # the rater says: out of scope
        {"text": pools["gold"][2].text, "label": pools["gold"][2].label},  # copies gold
        {"text": pools["train"][5].text, "label": pools["train"][5].label},  # already in training
    ]
    write_jsonl(tmp_path / "relabeled.jsonl", relabeled)
    v1 = new_training_version(
        tmp_path / "versions", [tmp_path / "relabeled.jsonl"], labels, base_train=base, gold_roots=[gold_root]
    )
    assert v1.name == "v1"
    assert v1.counts == {
        "previous_rows": 100,
        "relabeled_rows": 33,
        "added": 30,
        "review": 0,
        "rejected": 2,
        "skipped_out_of_label_set": 1,
        "rows": 130,
    }
    reasons = {json.loads(line)["reason"] for line in (v1.path / "rejected.jsonl").read_text().splitlines()}
    assert reasons == {"gold_leak", "exact_duplicate"}
    write_jsonl(tmp_path / "more.jsonl", ({"text": ex.text, "label": ex.label} for ex in pools["train"][130:140]))
    v2 = new_training_version(tmp_path / "versions", [tmp_path / "more.jsonl"], labels, gold_roots=[gold_root])
    assert v2.name == "v2" and v2.counts["previous_rows"] == 130
    # Rows 130-139 are new to v1 unless one repeats or near-duplicates a row already there.
    kept = load_file(v2.train_file).examples[130:]
    assert v2.counts["added"] == len(kept) and v2.counts["rows"] == 130 + len(kept)
    assert v2.counts["rejected"] == 10 - len(kept) == len((v2.path / "rejected.jsonl").read_text().splitlines())
    assert json.loads((v2.path / "manifest.json").read_text())["parent"].endswith("v1/train.jsonl")


# ---------------------------------------------------------------- retrain through the gate


def _scarce_timer(pools: dict[str, list[Example]]) -> tuple[list[Example], list[Example]]:
    """Training data without `timer` (a category launched after training), and the timer rows."""
    timer = [ex for ex in pools["train"] if ex.label == "timer"]
    rest = [ex for ex in pools["train"] if ex.label != "timer"]
    return rest, timer


def test_retrain_promotes_a_better_candidate_and_blocks_a_bad_one(
    tmp_path: Path, pools: dict[str, list[Example]], labels: list[str]
) -> None:
    scarce, held = _scarce_timer(pools)
    prod = tmp_path / "runs" / "prod"
    make_trainer(labels)(_write(tmp_path / "scarce.jsonl", scarce), prod)
    gold = add_gold(tmp_path / "gold", [_write(tmp_path / "gold.jsonl", pools["gold"])], labels).version
    registry = tmp_path / "runs" / "registry.json"
    full = _write(tmp_path / "full.jsonl", [*scarce, *held])

    bad = retrain(
        full,
        tmp_path / "runs" / "bad",
        production=prod,
        gold=gold,
        labels=labels,
        registry=registry,
        trainer=make_trainer(labels, shuffle_labels=True),
        loader=load_hashlr,
    )
    assert not bad.promoted and bad.candidate_accuracy < bad.production_accuracy
    assert any(f.startswith("accuracy") for f in bad.verdict["failed"])
    assert read_registry(registry)["production"] is None  # nothing promoted yet

    good = retrain(
        full,
        tmp_path / "runs" / "good",
        production=prod,
        gold=gold,
        labels=labels,
        registry=registry,
        trainer=make_trainer(labels),
        loader=load_hashlr,
    )
    assert good.promoted and good.candidate_accuracy > good.production_accuracy
    assert good.gold == gold.tag
    reg = read_registry(registry)
    assert reg["production"] == str(tmp_path / "runs" / "good")
    assert [e["event"] for e in reg["events"]] == ["blocked", "promoted"]
    assert all(e["gold"] == gold.tag for e in reg["events"])
    gate_file = tmp_path / "runs" / "bad" / "evals" / "gold-v1" / "gate.json"
    assert json.loads(gate_file.read_text())["passed"] is False


def test_a_scheduled_cycle_on_a_simulated_stream(
    tmp_path: Path, pools: dict[str, list[Example]], labels: list[str]
) -> None:
    """quiet before the shift; after it: alarm -> sample -> relabel -> retrain -> promoted, accuracy recovers."""
    scarce, held = _scarce_timer(pools)
    prod = tmp_path / "runs" / "prod"
    make_trainer(labels)(_write(tmp_path / "scarce.jsonl", scarce), prod)
    model = load_hashlr(prod)
    ref = load_reference(prod, CONFIG, hashing_embedder)
    gold_root = tmp_path / "gold"
    add_gold(gold_root, [_write(tmp_path / "gold.jsonl", pools["gold"])], labels)
    truth = {ex.text: ex.label for ex in [*pools["train"], *pools["oos"]]}

    before = [ex.text for ex in random.Random(0).sample([ex for ex in scarce if ex.label != "timer"], 80)]
    quiet = run_cycle(monitor_rows(as_log_rows(model, before), ref, CONFIG, hashing_embedder), *_never())
    assert not quiet.alarm and quiet.retrain is None and quiet.steps == ["monitor: quiet"]

    stream_timer, eval_timer = held[:20], held[20:]
    shifted = [*(ex.text for ex in stream_timer), *(ex.text for ex in pools["oos"][:20]), *before[:40]]
    random.Random(1).shuffle(shifted)
    window = as_log_rows(model, shifted, start=1000)
    report = monitor_rows(window, ref, CONFIG, hashing_embedder)

    def labeler(rows: list[dict[str, Any]]) -> Path:  # the human (or teacher) corrects each label
        path = tmp_path / "relabeled.jsonl"
        write_jsonl(path, ({"text": r["text"], "label": truth[r["text"]]} for r in rows))
        return path

    cycle = run_cycle(
        report,
        lambda: sample_rows(window, ref, hashing_embedder, pools["gold"], SampleConfig(budget=40)),
        labeler,
        lambda labeled: new_training_version(
            tmp_path / "versions", [labeled], labels, base_train=prod / "data" / "train.jsonl", gold_roots=[gold_root]
        ),
        lambda version: retrain(
            version.train_file,
            tmp_path / "runs" / f"cand-{version.name}",
            production=prod,
            gold=load_version(gold_root),
            labels=labels,
            registry=tmp_path / "registry.json",
            trainer=make_trainer(labels),
            loader=load_hashlr,
        ),
    )
    assert cycle.alarm and cycle.steps[0].startswith("monitor: alarm") and cycle.sampled == 40
    assert cycle.retrain is not None and cycle.retrain.promoted
    timer_rows = [r for r in window if truth[r["text"]] == "timer"]
    assert sum(truth[r["text"]] == "timer" for r in timer_rows) == 20
    # accuracy on held-back traffic of the grown category recovers
    new = load_hashlr(cycle.retrain.candidate)
    texts = [ex.text for ex in eval_timer]
    old_acc = np.mean([p.label == "timer" for p in model.predict(texts)])
    new_acc = np.mean([p.label == "timer" for p in new.predict(texts)])
    assert new_acc >= old_acc + 0.3, (old_acc, new_acc)


def _never() -> tuple[Any, Any, Any, Any]:
    def fail(*_: Any) -> Any:
        raise AssertionError("a quiet monitor must not start the loop")

    return fail, fail, fail, fail


def test_retrain_cli_with_the_tiny_lora_model(
    tmp_path: Path, tiny_config: dict[str, Any], trained_run: Path, labels: list[str]
) -> None:
    """The real path: relabeled rows -> new version -> LoRA candidate -> gate vs production -> registry."""
    from typer.testing import CliRunner

    from taskling.cli import app

    config_path = tmp_path / "project.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config))
    gold_root = tmp_path / "gold"
    add_gold(gold_root, [FIXTURES / "clinc8_gold.jsonl"], labels)
    relabeled = _write(tmp_path / "relabeled.jsonl", load_file(FIXTURES / "clinc8_train.jsonl").examples[:16])
    registry = tmp_path / "registry.json"
    args = [
        "retrain",
        str(config_path),
        "--data",
        str(relabeled),
        "--gold",
        str(gold_root),
        "--registry",
        str(registry),
    ]
    args += ["--production", str(trained_run), "--versions", str(tmp_path / "versions")]
    args += ["--candidate", str(tmp_path / "cand")]
    result = CliRunner().invoke(app, args)
    (event,) = read_registry(registry)["events"]
    assert event["gold"].startswith("v1@") and event["candidate"] == str(tmp_path / "cand")
    evals = tmp_path / "cand" / "evals" / "gold-v1"
    metrics = json.loads((evals / "metrics.json").read_text())
    assert metrics["gold_version"] == "v1" and metrics["metrics"]["n"] == 80
    assert (tmp_path / "cand" / "adapter").is_dir() and (tmp_path / "versions" / "v1" / "manifest.json").is_file()
    # The tiny random model answers one label for everything, before and after training: the
    # candidate's answers equal production's, so the gate passes and it is promoted.
    answers = [
        [
            json.loads(line)["label"]
            for line in (run / "evals" / "gold-v1" / "predictions.jsonl").read_text().splitlines()
        ]
        for run in (tmp_path / "cand", trained_run)
    ]
    assert answers[0] == answers[1]
    assert json.loads((evals / "gate.json").read_text())["passed"] is True
    assert event["event"] == "promoted" and result.exit_code == 0, result.output
    assert read_registry(registry)["production"] == str(tmp_path / "cand")
    # The 16 relabeled rows come from the fixture production trained on: the ones its split
    # put in training are duplicates (rejected); the ones it held out for validation are new.
    in_training = {ex.text for ex in load_file(trained_run / "data" / "train.jsonl").examples}
    held_out = sum(ex.text not in in_training for ex in load_file(relabeled).examples)
    counts = json.loads((tmp_path / "versions" / "v1" / "manifest.json").read_text())["counts"]
    assert 0 < held_out < 16
    assert (counts["added"], counts["rejected"], counts["relabeled_rows"]) == (held_out, 16 - held_out, 16)
    assert counts["rows"] == counts["previous_rows"] + held_out


def test_sample_cli_reads_the_prediction_log(
    tmp_path: Path, pools: dict[str, list[Example]], labels: list[str]
) -> None:
    import time

    from typer.testing import CliRunner

    from taskling.cli import app
    from taskling.serve.predlog import LogRow, PredictionLog, default_url

    run = tmp_path / "prod"
    make_trainer(labels)(_write(tmp_path / "t.jsonl", pools["train"]), run)
    gold_root = tmp_path / "gold"
    add_gold(gold_root, [_write(tmp_path / "gold.jsonl", pools["gold"][:20])], labels)
    texts = [ex.text for ex in [*pools["gold"][:10], *pools["oos"][:30], *pools["train"][:30]]]
    plog = PredictionLog(default_url(run))
    now = time.time()
    plog.write(
        [
            LogRow(
                "r", "default", "v1", r["text"], r["label"], r["probability"], r["probabilities"], 1.0, time=now - 60
            )
            for r in as_log_rows(load_hashlr(run), texts)
        ]
    )
    plog.close()
    (tmp_path / "m.yaml").write_text("embedder: hashing\n")
    out = tmp_path / "relabel.jsonl"
    args = ["sample", str(run), "--budget", "20", "--since", "1h", "--gold", str(gold_root), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--config", str(tmp_path / "m.yaml")])
    assert result.exit_code == 0, result.output
    picked = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(picked) == 20
    assert not {r["text"] for r in picked} & {ex.text for ex in pools["gold"][:10]}  # gold v1 rows never sampled
    said = " ".join(result.output.split())
    assert "20 of 70 rows" in said and "'gold_leak':" in said
