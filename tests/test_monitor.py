"""The drift report: quiet on training-like traffic, loud on a shifted stream; abstention."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from taskling.data.load import Example, load_file, stratified_split, write_examples
from taskling.errors import ConfigError
from taskling.monitor.drift import (
    MonitorConfig,
    build_reference,
    calibrate,
    hashing_embedder,
    label_shift,
    load_monitor_config,
    monitor,
    monitor_rows,
    parse_since,
    write_report,
)
from taskling.serve.abstain import AbstainingClassifier, AbstainThreshold, calibrate_threshold, oos_report
from taskling.serve.classifier import Prediction
from taskling.serve.predlog import LogRow, PredictionLog, default_url

FIXTURES = Path(__file__).parent / "fixtures"
CONFIG = MonitorConfig(embedder="hashing", min_rows=40)


def probs_for(label: str, labels: list[str], top: float, runner: float = 0.0) -> dict[str, float]:
    """`top` on `label`, `runner` on the next label, the rest spread evenly."""
    second = labels[(labels.index(label) + 1) % len(labels)]
    rest = (1 - top - runner) / (len(labels) - 1 - (runner > 0))
    return {x: (top if x == label else runner if runner and x == second else rest) for x in labels}


def log_rows(
    examples: list[Example], labels: list[str], *, top: float = 0.9, runner: float = 0.0, start: float = 0.0
) -> list[dict[str, Any]]:
    """Rows as `predlog.read_rows` yields them, from a specialist that answers the gold label."""
    return [
        {
            "id": i,
            "time": start + i,
            "text": ex.text,
            "label": ex.label if ex.label in labels else labels[i % len(labels)],
            "probability": top,
            "probabilities": probs_for(
                ex.label if ex.label in labels else labels[i % len(labels)], labels, top, runner
            ),
        }
        for i, ex in enumerate(examples)
    ]


@pytest.fixture(scope="module")
def data(labels: list[str]) -> dict[str, list[Example]]:
    train, validation = stratified_split(load_file(FIXTURES / "clinc8_train.jsonl").examples, 0.2, seed=0)
    return {
        "train": train,
        "validation": validation,
        "gold": load_file(FIXTURES / "clinc8_gold.jsonl").examples,
        "oos": load_file(FIXTURES / "clinc_oos60.jsonl").examples,
    }


@pytest.fixture(scope="module")
def reference(data: dict[str, list[Example]], labels: list[str]) -> Any:
    ref = build_reference(data["train"], data["validation"], labels, hashing_embedder, CONFIG)
    ref.confidence, ref.low_margin_share = 0.9, 0.0
    return ref


def shifted(data: dict[str, list[Example]], labels: list[str]) -> list[dict[str, Any]]:
    """A category grows (timer), new phrasings appear, and out-of-scope queries arrive."""
    timer = [ex for ex in data["gold"] if ex.label == "timer"] * 4
    phrased = [Example(f"yo bot quick q pls: {ex.text} thx!!", ex.label) for ex in data["gold"][:20]]
    rows = log_rows([*timer, *phrased], labels, top=0.6, runner=0.3)
    oos = log_rows(data["oos"][:30], labels, top=0.35, runner=0.3)
    mixed = rows + oos
    random.Random(0).shuffle(mixed)
    return mixed


def test_quiet_on_in_distribution_traffic(data: dict[str, list[Example]], labels: list[str], reference: Any) -> None:
    report = monitor_rows(log_rows(data["gold"], labels), reference, CONFIG, hashing_embedder)
    names = {s.name for s in report.signals}
    assert names == {
        "label_shift",
        "confidence_drop",
        "low_margin_share",
        "input_drift",
        "ood_share",
        "text_length",
        "abstained",
    }
    assert not report.alarm, [s.detail for s in report.moved]
    shift = next(s for s in report.signals if s.name == "label_shift")
    assert shift.value is not None and shift.value < 0.05  # balanced gold vs balanced train


def test_alarms_after_the_shift_and_says_what_moved(
    data: dict[str, list[Example]], labels: list[str], reference: Any
) -> None:
    report = monitor_rows(shifted(data, labels), reference, CONFIG, hashing_embedder)
    moved = {s.name for s in report.moved}
    assert {"label_shift", "confidence_drop", "low_margin_share", "ood_share", "input_drift"} <= moved
    assert report.categories[0].label == "timer"  # the grown category tops the PSI table
    assert report.categories[0].window_share > 0.3 > report.categories[0].train_share
    # the least familiar inputs shown are the out-of-scope ones
    oos_texts = {ex.text for ex in data["oos"]}
    assert sum(e["text"] in oos_texts for e in report.ood_examples) >= 4


def test_sliding_windows_quiet_before_the_shift_and_alarm_within_40_requests(
    data: dict[str, list[Example]], labels: list[str], reference: Any
) -> None:
    rng = random.Random(0)
    before = log_rows(rng.sample(data["gold"] * 3, 200), labels)
    stream = before + shifted(data, labels)
    window, step = 100, 10
    alarms = {
        end: monitor_rows(stream[end - window : end], reference, CONFIG, hashing_embedder).alarm
        for end in range(window, len(stream) + 1, step)
    }
    assert not any(alarm for end, alarm in alarms.items() if end <= len(before))
    first = min(end for end, alarm in alarms.items() if alarm)
    assert len(before) < first <= len(before) + 40
    assert all(alarm for end, alarm in alarms.items() if end >= len(before) + 40)


def test_too_small_a_window_is_reported_but_never_alarms(
    data: dict[str, list[Example]], labels: list[str], reference: Any
) -> None:
    report = monitor_rows(shifted(data, labels)[:10], reference, CONFIG, hashing_embedder)
    assert not report.alarm
    assert "not judged" in report.signals[0].detail


def test_label_shift_psi_and_chi2() -> None:
    share = {"a": 0.5, "b": 0.5}
    psi, p, _ = label_shift(["a", "b"] * 100, share)
    assert psi < 0.01 and p > 0.5
    psi, p, cats = label_shift(["a"] * 180 + ["b"] * 20, share)
    assert psi > 0.5 and p < 1e-6
    assert cats[0].count in (180, 20) and {c.label for c in cats} == {"a", "b"}


def test_confidence_reference_falls_back_to_rows_before_the_window(
    data: dict[str, list[Example]], labels: list[str]
) -> None:
    ref = build_reference(data["train"], data["validation"], labels, hashing_embedder, CONFIG)
    assert ref.confidence is None
    before = log_rows(data["gold"], labels, top=0.95)
    window = log_rows(data["gold"], labels, top=0.7, start=1000)
    report = monitor_rows(window, ref, CONFIG, hashing_embedder, before=before)
    drop = next(s for s in report.signals if s.name == "confidence_drop")
    assert drop.alarm and drop.value == pytest.approx(0.25)
    assert "80 log rows before the window" in drop.detail


def test_end_to_end_from_the_prediction_log_with_cli_exit_codes(
    tmp_path: Path, data: dict[str, list[Example]], labels: list[str]
) -> None:
    from typer.testing import CliRunner

    from taskling.cli import app

    run = tmp_path / "run"
    write_examples(run / "data" / "train.jsonl", data["train"])
    write_examples(run / "data" / "validation.jsonl", data["validation"])
    (run / "run.json").write_text(json.dumps({"task": {"labels": labels}}))
    calibrate(run, [probs_for(ex.label, labels, 0.9) for ex in data["validation"]], CONFIG)
    now = time.time()  # the CLI reads the window up to the real clock
    plog = PredictionLog(default_url(run))

    def write(rows: list[dict[str, Any]], t0: float) -> None:
        plog.write(
            [
                LogRow(
                    "r", "default", "v1", r["text"], r["label"], r["probability"], r["probabilities"], 1.0, time=t0 + i
                )
                for i, r in enumerate(rows)
            ]
        )

    write(log_rows(data["gold"], labels), now - 3 * 86400)  # last week: in distribution
    write(shifted(data, labels), now - 3600)  # the last hour: shifted
    plog.close()

    then = now - 3 * 86400 + 3600  # as if monitored last week: only the in-distribution rows
    quiet = monitor(run, since="2h", config=CONFIG, now=then)
    assert quiet.window["rows"] == 80 and not quiet.alarm
    loud = monitor(run, since="2h", config=CONFIG, now=now)
    assert loud.window["rows"] == 90 and loud.alarm
    assert "validation answers" in next(s for s in loud.signals if s.name == "confidence_drop").detail

    json_path, html_path = write_report(loud, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert saved["alarm"] is True and {s["name"] for s in saved["signals"] if s["alarm"]} >= {
        "label_shift",
        "ood_share",
    }
    page = html_path.read_text()
    assert page.count("<svg") == 4 and "<polyline" in page and "ALARM" in page
    assert "<script" not in page and "http" not in page  # self-contained

    (tmp_path / "m.yaml").write_text("embedder: hashing\nmin_rows: 40\n")
    runner = CliRunner()
    args = ["monitor", str(run), "--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "cli")]
    result = runner.invoke(app, [*args, "--since", "2h"])
    assert result.exit_code == 1, result.output
    assert "label_shift" in result.output and (tmp_path / "cli" / "drift.html").is_file()
    result = runner.invoke(app, [*args, "--since", "1m"])  # an empty window: nothing to judge
    assert result.exit_code == 0, result.output


def test_parse_since_and_config_errors(tmp_path: Path) -> None:
    assert parse_since("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_since("30m", now=5000.0) == 5000.0 - 1800
    assert parse_since("2026-01-01") == pytest.approx(1767225600.0)
    with pytest.raises(ConfigError):
        parse_since("last tuesday")
    (tmp_path / "bad.yaml").write_text("psi_maximum: 0.3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_monitor_config(tmp_path / "bad.yaml")


# ---------------------------------------------------------------- abstention


class FakeClassifier:
    """Answers the label of the nearest training row (hashing vectors), softmax over labels."""

    def __init__(self, train: list[Example], labels: list[str]) -> None:
        self.labels = labels
        self.vectors = hashing_embedder([ex.text for ex in train])
        self.y = np.array([labels.index(ex.label) for ex in train])

    def predict(self, texts: list[str], *, batch_size: int = 32) -> list[Prediction]:
        sims = hashing_embedder(texts) @ self.vectors.T
        out = []
        for text, row in zip(texts, sims, strict=True):
            best = np.array([row[self.y == k].max() for k in range(len(self.labels))]) * 20
            p = np.exp(best - best.max())
            p /= p.sum()
            k = int(p.argmax())
            out.append(Prediction(text, self.labels[k], float(p[k]), dict(zip(self.labels, p.tolist(), strict=True))))
        return out


def test_abstention_threshold_is_chosen_on_validation_and_catches_oos(
    data: dict[str, list[Example]], labels: list[str], tmp_path: Path
) -> None:
    clf = FakeClassifier(data["train"], labels)
    calib = [*data["validation"], *data["oos"][:30]]
    threshold = calibrate_threshold(clf.predict([ex.text for ex in calib]), [ex.label for ex in calib], labels)
    assert threshold.n_out_of_scope == 30 and threshold.value > 0
    assert "OOS recall" in threshold.method
    wrapped = AbstainingClassifier(clf, threshold)
    test = [*data["gold"], *data["oos"][30:]]
    preds = wrapped.predict([ex.text for ex in test])
    base = clf.predict([ex.text for ex in test])
    report = oos_report(preds, [ex.label for ex in test], labels)
    plain = oos_report(base, [ex.label for ex in test], labels)
    assert plain["oos_recall"] == 0.0  # without abstention every OOS query gets a label
    assert report["oos_recall"] > 0.3
    assert report["in_scope_coverage"] > 0.6
    # the trade is worth it: the mean of in-scope accuracy and OOS recall goes up
    balanced = (report["in_scope_accuracy"] + report["oos_recall"]) / 2
    assert balanced > (plain["in_scope_accuracy"] + plain["oos_recall"]) / 2 + 0.1, (report, plain)
    # Only the label changes, and only to `unknown`, for low-probability answers.
    for p, b in zip(preds, base, strict=True):
        assert p.probabilities == b.probabilities
        assert p.label == b.label or (p.label == "unknown" and b.probability < threshold.value)
    threshold.save(tmp_path)
    assert AbstainThreshold.load(tmp_path) == threshold


def test_in_scope_only_calibration_targets_coverage(data: dict[str, list[Example]], labels: list[str]) -> None:
    clf = FakeClassifier(data["train"], labels)
    preds = clf.predict([ex.text for ex in data["gold"]])
    threshold = calibrate_threshold(
        preds, [ex.label for ex in data["gold"]], labels, metric="margin", target_coverage=0.9
    )
    assert threshold.oos_recall is None
    assert 0.88 <= threshold.in_scope_coverage <= 0.95


def test_abstaining_wrapper_keeps_the_classifier_default(trained_run: Path) -> None:
    from taskling.serve.classifier import Classifier

    clf = Classifier.from_run(trained_run)
    texts = ["what's my balance", "set a timer for ten minutes", "how do I say hello in french"]
    plain = clf.predict(texts)
    assert all(p.label in clf.task.labels for p in plain)  # the default never abstains
    never = AbstainingClassifier(clf, AbstainThreshold("probability", 0.0, "test", 0, 0, 0, 0, None))
    always = AbstainingClassifier(clf, AbstainThreshold("probability", 1.01, "test", 0, 0, 0, 0, None))
    assert [p.label for p in never.predict(texts)] == [p.label for p in plain]
    assert [p.label for p in always.predict(texts)] == ["unknown"] * 3
    assert always.task.labels == clf.task.labels


@pytest.mark.slow
def test_minilm_monitor_quiet_then_loud(data: dict[str, list[Example]], labels: list[str]) -> None:
    """The default embedder (all-MiniLM-L6-v2): same verdicts as the hashing stand-in."""
    from taskling.model.embed import embed

    config = MonitorConfig(min_rows=40)
    ref = build_reference(data["train"], data["validation"], labels, embed, config)
    ref.confidence, ref.low_margin_share = 0.9, 0.0
    quiet = monitor_rows(log_rows(data["gold"], labels), ref, config, embed)
    assert not quiet.alarm, [s.detail for s in quiet.moved]
    loud = monitor_rows(shifted(data, labels), ref, config, embed)
    assert {"label_shift", "ood_share", "input_drift"} <= {s.name for s in loud.moved}


def test_calibrate_cli_writes_the_threshold_and_the_monitor_reference(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from taskling.cli import app

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # the session's run stays untouched
    result = CliRunner().invoke(app, ["calibrate", str(run), "--oos", str(FIXTURES / "clinc_oos60.jsonl")])
    assert result.exit_code == 0, result.output
    threshold = AbstainThreshold.load(run)
    assert threshold.n_out_of_scope == 60 and threshold.oos_recall is not None
    assert f"{threshold.value:.4f}" in result.output
    cal = json.loads((run / "monitor" / "calibration.json").read_text())
    assert cal["n"] == threshold.n_in_scope and 0 < cal["confidence"] <= 1
    wrapped = AbstainingClassifier.from_run(run)
    assert wrapped.threshold == threshold
    bad = CliRunner().invoke(app, ["calibrate", str(run), "--metric", "entropy"])
    assert bad.exit_code == 2 and "--metric" in bad.output
