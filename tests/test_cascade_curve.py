"""The cascade's curve (cascade.json) in `taskling report` and `taskling cost RUN`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import test_report
from taskling.cli import app
from taskling.errors import TasklingError
from taskling.evaluate.cost import cascade_curve
from taskling.evaluate.report import build_report, write_report
from test_report import console_errors

# The report tests' fixtures: a scored run directory, a headless chromium (skipped where absent).
scored_run = test_report.scored_run
browser = test_report.browser

runner = CliRunner()
STAGES = ["tfidf", "<b>lora</b>", "teacher"]  # a stage name is text, never markup


def point(t: float, shares: tuple[float, float, float], accuracy: float, cost: float) -> dict[str, Any]:
    return {
        "thresholds": {"tfidf": t, "<b>lora</b>": t / 2},
        "share": dict(zip(STAGES, shares, strict=True)),
        "accuracy": accuracy,
        "p50_ms": 2.0 + 100 * shares[1],
        "p99_ms": 40.0 + 300 * shares[2],
        "cost_per_million": cost,
    }


CURVE = [
    point(0.5, (0.9, 0.08, 0.02), 0.91, 8.0),
    point(0.8, (0.7, 0.25, 0.05), 0.955, 20.0),
    point(0.95, (0.4, 0.5, 0.1), 0.962, 41.5),
]


def write_cascade(run: Path, chosen: int = 1, curve: list[dict[str, Any]] | None = None) -> None:
    stages = [{"name": s, "kind": "x"} for s in STAGES]
    (run / "cascade.json").write_text(json.dumps({"stages": stages, "curve": curve or CURVE, "chosen": chosen}))


def test_report_shows_the_curve_with_the_chosen_point_marked(scored_run: Path) -> None:
    assert "Cascade" not in build_report(scored_run)  # no cascade.json, no section
    write_cascade(scored_run, chosen=1)
    html = build_report(scored_run)
    section = html[html.index("<h2>Cascade") :]
    assert "<b>lora</b>" not in html and "&lt;b&gt;lora&lt;/b&gt;" in section
    rows = section[section.index("<tbody>") : section.index("</tbody>")].split("</tr>")[:-1]
    assert len(rows) == 3
    assert "class=chosen" in rows[1] and "chosen" not in rows[0] + rows[2]
    for cell in ("0.800", "70.0%", "25.0%", "5.0%", "95.50%", "27.0", "55.0", "20.00"):
        assert f"<td>{cell}</td>" in rows[1], cell
    assert section.count('<circle class="point"') == 3 and section.count('class="chosen"') == 1


def test_a_malformed_curve_names_the_file_and_point(scored_run: Path) -> None:
    broken = [CURVE[0], {k: v for k, v in CURVE[1].items() if k != "p99_ms"}]
    write_cascade(scored_run, curve=broken)
    with pytest.raises(TasklingError, match=r"cascade\.json: curve\[1\] has no p99_ms"):
        cascade_curve(scored_run)


def test_cost_run_prints_the_curve(scored_run: Path) -> None:
    missing = runner.invoke(app, ["cost", str(scored_run)])
    assert missing.exit_code != 0 and "no cascade.json" in missing.output
    write_cascade(scored_run, chosen=2)
    result = runner.invoke(app, ["cost", str(scored_run)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "%" in line]
    assert len(lines) == 3 and "chosen" in lines[2] and "chosen" not in lines[0]
    assert "41.50" in lines[2] and "96.20%" in lines[2] and "<b>lora</b>" in result.output
    no_prices = runner.invoke(app, ["cost", "--calls-per-day", "1000"])
    assert no_prices.exit_code != 0 and "--teacher-input-price" in no_prices.output


def test_the_curve_renders_in_headless_chromium(browser: Any, scored_run: Path) -> None:
    from selenium.webdriver.common.by import By

    write_cascade(scored_run, chosen=0)
    browser.get(write_report(scored_run).as_uri())
    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart[aria-label='cascade accuracy against cost']")
    assert chart.size["width"] > 100 and chart.size["height"] > 100
    rows = browser.find_elements(By.CSS_SELECTOR, "table.cascade tbody tr")
    assert [r.get_attribute("class") for r in rows] == ["chosen", "", ""]
    assert console_errors(browser) == []
