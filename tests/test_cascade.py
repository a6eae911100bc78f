"""The cascade: routing by calibrated confidence, threshold choice, cascade.json, refusals, the CLI."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.errors import ConfigError, RunError
from taskling.evaluate.cascade import StageRun, build_cascade, check_stages, fit_calibration, stage_scores, sweep
from taskling.serve.cascade import Calibration, Cascade, CascadeSpec, StageSpec
from taskling.serve.classifier import Classifier
from taskling.serve.prediction import UNKNOWN, Prediction
from taskling.serve.rungs import Rung
from taskling.task import Task

LABELS = ["a", "b"]


class FakeStage:
    """Answers from a table text -> (label, top probability); records what it was asked."""

    def __init__(self, answers: dict[str, tuple[str, float]]) -> None:
        self.answers = answers
        self.seen: list[str] = []
        self.cost_per_call = 0.001

    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> list[Prediction]:
        self.seen += list(texts)
        out = []
        for t in texts:
            label, p = self.answers[t]
            other = next(x for x in LABELS if x != label)
            out.append(Prediction(t, label, p, {label: p, other: 1 - p}))
        return out


def cascade_of(*stages: tuple[StageSpec, FakeStage | None]) -> Cascade:
    return Cascade(list(stages), Task(name="t", labels=LABELS), "test")


def test_a_confident_stage_answers_and_the_rest_go_on() -> None:
    cheap = FakeStage({"easy": ("a", 0.95), "hard": ("a", 0.55), "edge": ("b", 0.8)})
    big = FakeStage({"hard": ("b", 0.9), "edge": ("a", 0.9)})
    c = cascade_of((StageSpec("cheap", "tfidf", threshold=0.8), cheap), (StageSpec("big", "lora"), big))
    preds = c.predict(["easy", "hard", "edge"])
    assert [p.label for p in preds] == ["a", "b", "b"]
    assert [p.stage for p in preds] == ["cheap", "big", "cheap"]  # 0.8 is at the threshold: answered
    assert big.seen == ["hard"]  # a message the cheap stage answered never reaches the next
    assert preds[1].probabilities == {"b": 0.9, "a": pytest.approx(0.1)}  # the deciding stage's own
    assert c("easy").stage == "cheap" and c.stage_names == ["cheap", "big"]


def test_unknown_last_abstains_on_what_reaches_it() -> None:
    model = FakeStage({"in": ("a", 0.9), "out": ("b", 0.55)})
    c = cascade_of((StageSpec("lora", "lora", threshold=0.6), model), (StageSpec(UNKNOWN, UNKNOWN), None))
    preds = c.predict(["in", "out"])
    assert [(p.label, p.stage) for p in preds] == [("a", "lora"), (UNKNOWN, UNKNOWN)]
    assert preds[1].probabilities["b"] == 0.55  # the last model stage's probabilities, kept for inspection


def test_calibration_changes_what_is_routed() -> None:
    cheap = FakeStage({"x": ("a", 0.7)})
    big = FakeStage({"x": ("b", 0.99)})
    # Isotonic: a raw 0.7 from this stage was right only 30% of the time on validation.
    iso = Calibration("isotonic", x=[0.5, 0.9], y=[0.1, 0.5])
    c = cascade_of(
        (StageSpec("cheap", "tfidf", calibration=iso, threshold=0.5), cheap), (StageSpec("big", "lora"), big)
    )
    assert c("x").stage == "big"
    hot = Calibration("temperature", temperature=0.2)  # sharpens 0.7 to ~0.99
    c = cascade_of(
        (StageSpec("cheap", "tfidf", calibration=hot, threshold=0.9), cheap), (StageSpec("big", "lora"), big)
    )
    assert c("x").stage == "cheap"


def stage_run(name: str, labels: list[str], gold: list[str], conf: list[float], model: object = "m") -> StageRun:
    preds = [
        Prediction("t", lab, c, {lab: c, next(x for x in LABELS if x != lab): 1 - c})
        for lab, c in zip(labels, conf, strict=True)
    ]
    run = StageRun(StageSpec(name, name), model)  # type: ignore[arg-type]
    run.predictions, run.confidence, run.ms = preds, np.array(conf), 1.0 if name == "cheap" else 50.0
    run.correct = np.array([p == g for p, g in zip(labels, gold, strict=True)])
    run.cost_per_call = 0.0 if name == "cheap" else 0.01
    return run


def test_sweep_keeps_accuracy_within_max_loss_and_sends_least_to_the_big_stage() -> None:
    # 100 rows: the cheap stage is right at 0.95 and 0.62, wrong on its 20 rows at 0.6.
    gold = ["a"] * 100
    cheap_labels = ["a"] * 70 + ["b"] * 20 + ["a"] * 10
    cheap_conf = [0.95] * 70 + [0.6] * 20 + [0.62] * 10
    big = stage_run("big", ["a"] * 99 + ["b"], gold, [0.9] * 100)
    runs = [stage_run("cheap", cheap_labels, gold, cheap_conf), big]
    curve, chosen, reference = sweep(runs, gold, LABELS, max_loss=0.0)
    point = curve[chosen]
    assert reference == pytest.approx(0.99)
    assert point["accuracy"] >= reference  # within max_loss = 0
    assert point["share"]["cheap"] == pytest.approx(0.80)  # every row it gets right stays cheap, no wrong one
    assert 0.6 < point["thresholds"]["cheap"] <= 0.62
    loose = sweep(runs, gold, LABELS, max_loss=0.25, category_margin=1.0)
    assert loose[0][loose[1]]["share"]["cheap"] == 1.0  # 80% >= 99% - 25%: the big stage gets nothing
    assert point["p50_ms"] == 1.0 and point["p99_ms"] == pytest.approx(51.0)


def test_sweep_refuses_a_point_that_sinks_one_category() -> None:
    # The cheap stage is sure and right on all 90 "a" rows, sure and wrong on all 10 "b" rows:
    # 90% overall is within a 10-point max_loss of the big stage's 100%, but "b" falls to 0%.
    gold = ["a"] * 90 + ["b"] * 10
    cheap = stage_run("cheap", ["a"] * 100, gold, [0.9] * 100)
    runs = [cheap, stage_run("big", gold, gold, [0.9] * 100)]
    curve, chosen, _ = sweep(runs, gold, LABELS, max_loss=0.10)
    assert curve[chosen]["share"]["cheap"] == 0.0  # nothing separates the "b" rows: all go to the big stage
    assert curve[chosen]["accuracy"] == 1.0 and all("_right" not in p for p in curve)
    aggregate_only = sweep(runs, gold, LABELS, max_loss=0.10, category_margin=1.0)
    assert aggregate_only[0][aggregate_only[1]]["share"]["cheap"] == 1.0


def test_temperature_fit_sharpens_an_underconfident_stage() -> None:
    preds = [Prediction("t", "a", 0.6, {"a": 0.6, "b": 0.4})] * 50
    cal = fit_calibration(preds, ["a"] * 50, LABELS, "probability", "temperature")
    assert cal.method == "temperature" and cal.temperature < 0.5


def test_check_stages() -> None:
    assert check_stages(["tfidf", " lora", "unknown"]) == ["tfidf", "lora", "unknown"]
    for bad in (["tfidf", "bert"], ["unknown", "lora"], ["teacher", "lora"], ["lora", "lora"]):
        with pytest.raises(ConfigError):
            check_stages(bad)


def test_stage_scores() -> None:
    preds = [Prediction("t", "a", 1, {}, "x"), Prediction("t", "b", 1, {}, "x"), Prediction("t", "a", 1, {}, "y")]
    assert stage_scores(["a", "a", "a"], preds) == {
        "x": {"share": pytest.approx(2 / 3), "n": 2, "accuracy": 0.5},
        "y": {"share": pytest.approx(1 / 3), "n": 1, "accuracy": 1.0},
    }


# ---------------------------------------------------------------- on a real (tiny) run


@pytest.fixture(scope="module")
def cascade_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cascade") / "run"
    shutil.copytree(trained_run, run)
    build_cascade(run, ["tfidf", "lora"], max_loss=0.05, latency_samples=3)
    return run


def test_cascade_json_round_trip_and_from_run(cascade_run: Path) -> None:
    raw = json.loads((cascade_run / "cascade.json").read_text())
    spec = CascadeSpec.load(cascade_run)
    assert spec.to_dict() == raw
    assert [s["name"] for s in raw["stages"]] == ["tfidf", "lora"]
    assert raw["stages"][0]["path"] == "cascade/tfidf.joblib" and raw["stages"][1]["threshold"] is None
    assert 0 <= raw["chosen"] < len(raw["curve"])
    v = raw["validation"]
    assert v["cascade_accuracy"] >= v["reference_accuracy"] - 0.05
    clf = Classifier.from_run(cascade_run, dtype="float32", device="cpu")
    assert isinstance(clf, Cascade) and clf.stage_names == ["tfidf", "lora"]
    preds = clf.predict(["what is my balance", "book a flight to paris"])
    assert all(p.stage in ("tfidf", "lora") and p.label in clf.task.labels for p in preds)
    assert isinstance(Classifier.from_run(cascade_run, cascade=False), Classifier)


def test_extra_calibration_rows_join_the_validation_rows_and_training_rows_are_refused(
    cascade_run: Path, tmp_path: Path
) -> None:
    from taskling.errors import ConfigError
    from taskling.io import read_jsonl, write_jsonl

    run = tmp_path / "run"
    shutil.copytree(cascade_run, run)
    validation = list(read_jsonl(run / "data" / "validation.jsonl"))
    labels = json.loads((run / "cascade.json").read_text())["labels"]
    fresh = [{"text": f"a message nobody trained on number {i}", "label": labels[i % len(labels)]} for i in range(12)]
    extra = tmp_path / "calibrate.jsonl"
    write_jsonl(extra, [*fresh, *validation[:3]])  # 3 rows already among the validation rows: skipped
    spec = build_cascade(run, ["tfidf", "lora"], max_loss=0.05, latency_samples=3, calibration_file=extra)
    assert spec.validation["n"] == len(validation) + len(fresh)
    trained = next(iter(read_jsonl(run / "data" / "train.jsonl")))
    write_jsonl(extra, [*fresh, {"text": trained["text"], "label": trained["label"]}])
    with pytest.raises(ConfigError, match=r"calibrate.jsonl: 1 row\(s\) are training rows"):
        build_cascade(run, ["tfidf", "lora"], max_loss=0.05, latency_samples=3, calibration_file=extra)


def test_a_cascade_on_other_labels_or_data_is_refused(cascade_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(cascade_run, run)
    raw = json.loads((run / "cascade.json").read_text())
    (run / "cascade.json").write_text(json.dumps({**raw, "data_hash": "0" * 64}))
    with pytest.raises(RunError, match="built on other training rows than the run"):
        Cascade.from_run(run, lora=lambda: None)  # type: ignore[arg-type,return-value]
    labels = raw["labels"][:-1]
    from taskling.serve.cascade import labels_hash

    (run / "cascade.json").write_text(json.dumps({**raw, "labels": labels, "labels_hash": labels_hash(labels)}))
    with pytest.raises(RunError, match="labels differ"):
        Cascade.from_run(run)
    (run / "cascade.json").write_text(json.dumps(raw))
    rung = Rung.load(run / "cascade" / "tfidf.joblib")
    rung.data_hash = "1" * 64
    rung.save(run / "cascade" / "tfidf.joblib")
    with pytest.raises(RunError, match="fitted on other training rows"):
        Cascade.from_run(run)


def test_classify_and_eval_use_the_cascade(cascade_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["classify", str(cascade_run), "what is my balance", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.splitlines()[-1])["stage"] in ("tfidf", "lora")
    plain = runner.invoke(app, ["classify", str(cascade_run), "what is my balance", "--json", "--no-cascade"])
    assert "stage" not in json.loads(plain.output.splitlines()[-1])
    gold = Path(__file__).parent / "fixtures" / "clinc8_train.jsonl"
    res = runner.invoke(app, ["eval", str(cascade_run), "--data", str(gold), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    stages = json.loads((tmp_path / "metrics.json").read_text())["stages"]
    assert set(stages) <= {"tfidf", "lora"} and sum(s["share"] for s in stages.values()) == pytest.approx(1.0)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == set(stages)


def test_cascade_cli_prints_the_curve(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    res = CliRunner().invoke(app, ["cascade", str(run), "--stages", "tfidf,lora,unknown", "--max-loss", "0.1"])
    assert res.exit_code == 0, res.output
    assert "chosen" in res.output and (run / "cascade.json").is_file()
    assert [s["kind"] for s in json.loads((run / "cascade.json").read_text())["stages"]][-1] == UNKNOWN
