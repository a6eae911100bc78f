"""report.html: self-contained, has every chart, and renders without console errors in a real
headless Chromium (Debian's `chromium` + `chromium-driver`, installed by .ci/run)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.data.load import Example, content_hash
from taskling.evaluate.gate import pin_baseline
from taskling.evaluate.report import build_report, calibration_bins, expected_calibration_error, write_report

LABELS = ["balance", "transfer", "card_lost"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def scored_run(tmp_path: Path) -> Path:
    """A run directory as `taskling eval` leaves it, plus history, a pinned baseline and a ladder."""
    run = tmp_path / "run"
    run.mkdir()
    gold = [LABELS[i % 3] for i in range(30)]
    texts = [f"<b>message</b> {i} & more" for i in range(30)]  # markup must be escaped, not rendered
    predicted = [g if i % 5 else LABELS[(i + 1) % 3] for i, g in enumerate(gold)]
    rows = [
        {"text": t, "gold": g, "label": p, "probability": 0.9 if g == p else 0.6, "margin": 0.3}
        for t, g, p in zip(texts, gold, predicted, strict=True)
    ]
    write_jsonl(run / "predictions.jsonl", rows)
    (run / "labels.json").write_text(json.dumps(LABELS))
    history = [{"step": s, "epoch": 0, "train_loss": 2.0 / s, "lr": 1e-4} for s in range(1, 21)]
    history += [{"step": 10, "val_loss": 0.4, "best": True}, {"step": 20, "val_loss": 0.3, "best": True}]
    write_jsonl(run / "history.jsonl", history)
    gold_file = write_jsonl(
        tmp_path / "gold.jsonl", [{"text": t, "label": g} for t, g in zip(texts, gold, strict=True)]
    )
    teacher = write_jsonl(
        tmp_path / "teacher.jsonl", [{"text": t, "label": g} for t, g in zip(texts, gold, strict=True)]
    )
    pin_baseline(run, gold_file, teacher, labels=LABELS, name="teacher")
    ladder = {
        "gold_file": str(gold_file),
        "gold_hash": content_hash(Example(t, g) for t, g in zip(texts, gold, strict=True)),
        "bar": "accuracy >= 90%",
        "smallest": "lora",
        "rungs": [
            {
                "name": name,
                "accuracy": acc,
                "macro_f1": acc,
                "worst_category": "transfer",
                "worst_category_accuracy": acc - 0.1,
                "latency_ms": 3.0,
                "messages_per_second": 100.0,
                "memory_mb": 1.0,
                "clears": acc >= 0.9,
                "why": "" if acc >= 0.9 else "accuracy too low",
            }
            for name, acc in (("tfidf", 0.7), ("lora", 0.95))
        ],
    }
    (run / "ladder.json").write_text(json.dumps(ladder))
    return run


def test_report_is_self_contained_and_has_every_section(scored_run: Path) -> None:
    html = build_report(scored_run, ladder=scored_run / "ladder.json")
    for heading in ("Confusion matrix", "Per-category accuracy against the baseline", "Calibration",
                    "Training and validation loss", "Ladder", "Worst examples"):  # fmt: skip
        assert f"<h2>{heading}</h2>" in html
    assert html.count('<svg class="chart"') == 4
    assert not re.search(r"(src|href)=\"?https?:", html)  # nothing fetched from the network
    assert "<script" not in html
    assert "&lt;b&gt;message&lt;/b&gt;" in html and "<b>message</b>" not in html
    assert "80.00%" in html  # accuracy: every 5th row wrong
    assert "baseline (teacher) accuracy" in html and "100.00%" in html
    assert "6 wrong of 30" in html


def test_calibration_bins_and_error() -> None:
    bins = calibration_bins([0.95, 0.95, 0.55, 0.55], [True, False, True, True])
    assert [(b["confidence"], b["accuracy"], b["count"]) for b in bins] == [(0.55, 1.0, 2.0), (0.95, 0.5, 2.0)]
    assert expected_calibration_error(bins) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)


def test_report_command_writes_report_html(scored_run: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(scored_run), "--ladder", str(scored_run / "ladder.json")])
    assert result.exit_code == 0, result.output
    assert (scored_run / "report.html").is_file()
    missing = CliRunner().invoke(app, ["report", str(scored_run / "nope")])
    assert missing.exit_code == 2 and "no predictions.jsonl" in missing.output


# ---------------------------------------------------------------- real headless browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    driver_path, chromium = shutil.which("chromedriver"), shutil.which("chromium")
    if not driver_path or not chromium:
        pytest.skip("Debian chromium/chromium-driver not installed (apt-get install -y chromium chromium-driver)")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_console_error_capture_works(browser: Any, tmp_path: Path) -> None:
    # Guards the test below: a page that logs an error must be caught, or "no errors" means nothing.
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>console.error('boom')</script></body></html>")
    browser.get(page.as_uri())
    assert any("boom" in e["message"] for e in console_errors(browser))


def test_report_renders_in_headless_chromium_without_console_errors(browser: Any, scored_run: Path) -> None:
    from selenium.webdriver.common.by import By

    path = write_report(scored_run, ladder=scored_run / "ladder.json")
    browser.get(path.as_uri())
    assert browser.title == "taskling report: run"
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    names = [c.get_attribute("aria-label") for c in charts]
    assert names == [
        "confusion matrix heatmap",
        "per-category accuracy",
        "calibration curve",
        "training and validation loss",
    ]
    for chart in charts:  # laid out, not collapsed to nothing
        assert chart.size["width"] > 100 and chart.size["height"] > 100
    cells = browser.find_elements(By.CSS_SELECTOR, "svg rect.cell")
    assert len(cells) == 3 * 4  # 3 gold labels x (3 labels + outside the set)
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg rect.bar.baseline")) == 3
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg polyline.curve")) == 3  # calibration, train, val
    ladder_rows = browser.find_elements(By.CSS_SELECTOR, "table.ladder tbody tr")
    assert [r.find_element(By.TAG_NAME, "td").text for r in ladder_rows] == ["tfidf", "lora"]
    assert console_errors(browser) == []


# ---------------------------------------------------------------- a generation run's review form

NASTY = "</script><b id=injected>x</b> & 'q'"


@pytest.fixture
def generation_run(tmp_path: Path) -> Path:
    """A scored generation run (no model): manifest, metrics.json, predictions.jsonl, history."""
    from taskling.generate.spec import GenerationTask
    from taskling.io import write_json
    from taskling.rundir import GENERATION, RunDir

    run = RunDir(tmp_path / "genrun")
    output = {"format": "regex", "pattern": r"[A-Z]{2}-\d{3}"}
    task = GenerationTask(name="codes", output=output)  # type: ignore[arg-type]
    write_json(run.manifest, {"kind": GENERATION, "task": task.model_dump(mode="json")})
    run.adapter.mkdir()
    run.adapter_weights.write_bytes(b"")

    def row(text: str, gold: str, output: str, rouge: float) -> dict[str, Any]:
        scores = {"exact": float(gold == output), "rouge_l": rouge, "valid": 1.0}
        return {"text": text, "gold": gold, "label": output, "output": output, "valid": True, "problem": "",
                "slice": text[:1], "scores": scores}  # fmt: skip

    write_jsonl(run.predictions, [row("alpha", "AB-123", "AB-123", 1.0), row("bravo", "BR-111", "BR-112", 0.2),
                                  row(NASTY, "NA-100", "NA-101", 0.5)])  # fmt: skip
    means = {"exact": 1 / 3, "rouge_l": 0.5667, "valid": 1.0}
    write_json(run.metrics, {"kind": "generation", "metric": "rouge_l", "n": 3, "means": means, "gold_hash": "ab" * 16,
                             "per_slice": {"a": {"n": 1, "rouge_l": 1.0, "valid": 1.0}}, "worst_slice": "a",
                             "worst_slice_score": 1.0})  # fmt: skip
    history = [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}, {"step": 2, "val_loss": 1.7}]
    write_jsonl(run.history, history)
    return run.root


def test_generation_report_lists_the_worst_rows_escaped(generation_run: Path) -> None:
    page = build_report(generation_run)
    assert "<h2>Review</h2>" in page and 'id="review-download"' in page
    assert "<b id=injected>" not in page  # neither in the table nor in the embedded JSON
    assert page.count("</script>") == 2  # the data block and the script: no text closes one early
    assert page.index("bravo") < page.index("&lt;/script&gt;")  # ranked as `taskling review`: worst first
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_review_form_marks_download_as_the_jsonl_review_apply_reads(browser: Any, generation_run: Path) -> None:
    from selenium.webdriver.common.by import By

    from taskling.generate.review import review_candidates
    from taskling.io import read_jsonl
    from taskling.rundir import RunDir

    browser.get(write_report(generation_run).as_uri())
    assert not browser.find_elements(By.ID, "injected")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.review tbody tr")
    assert [r.get_attribute("id") for r in rows] == ["review-1", "review-2"]
    ids = {c["text"]: c["id"] for c in review_candidates(generation_run)}
    bravo, nasty = ids["bravo"], ids[NASTY]
    browser.find_element(By.CSS_SELECTOR, f'input[name="mark-{bravo}"][value="fixed"]').click()
    box = browser.find_element(By.ID, f"fixed-{bravo}")
    box.clear()
    box.send_keys("BR-999")
    browser.find_element(By.CSS_SELECTOR, f'input[name="mark-{nasty}"][value="wrong"]').click()
    browser.find_element(By.ID, "review-download").click()  # the Blob download runs without an error
    assert not console_errors(browser)
    text = browser.execute_script("return reviewJsonl();")
    marked = generation_run / "marked.jsonl"
    marked.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(app, ["review", str(generation_run), "--apply", str(marked)])
    assert result.exit_code == 0, result.output
    run = RunDir(generation_run)
    gold = {r["instruction"]: r["response"] for r in read_jsonl(run.reviewed_gold)}
    assert gold == {"bravo": "BR-999", NASTY: "NA-100"}
    assert {r["instruction"]: r["response"] for r in read_jsonl(run.reviewed_train)} == gold
    pairs = read_jsonl(run.reviewed_pairs)
    assert {"text": "bravo", "chosen": "BR-999", "rejected": "BR-112", "source": "review_fixed"} in pairs
