"""Cost per million calls and break-even volume, checked against arithmetic done by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.evaluate.cost import DAYS_PER_MONTH, CostInputs, estimate


def inputs(**overrides: float | bool) -> CostInputs:
    base = {
        "teacher_input_price": 3.0,  # $/M input tokens
        "teacher_output_price": 15.0,  # $/M output tokens
        "input_tokens_per_call": 200,
        "output_tokens_per_call": 4,
        "calls_per_day": 100_000,
        "messages_per_second": 50.0,
        "hardware_per_hour": 0.36,
        "maintenance_per_month": 1_000.0,
    }
    base.update(overrides)
    return CostInputs(**base)  # type: ignore[arg-type]


def test_cost_per_million_calls_and_break_even_by_hand() -> None:
    report = estimate(inputs())
    # Teacher: 200 * $3 + 4 * $15 = $660 per million calls.
    assert report.teacher_per_million == pytest.approx(660.0)
    # Specialist: $0.36/h / 3600 s / 50 msg/s = $2e-6 a call = $2 per million.
    assert report.specialist_per_million == pytest.approx(2.0)
    # Break-even: $1000 / ($660e-6 - $2e-6) per call = 1,519,757 calls/month.
    assert report.break_even_calls_per_day == pytest.approx(1000 / 658e-6 / DAYS_PER_MONTH)
    assert report.verdict.startswith("pays back")


def test_low_volume_never_pays_back_its_maintenance() -> None:
    report = estimate(inputs(calls_per_day=500))
    assert report.verdict.startswith("does not pay back at 500 calls/day")
    assert report.specialist_per_month > report.teacher_per_month
    never = estimate(inputs(teacher_input_price=0.001, teacher_output_price=0.0, hardware_per_hour=36.0))
    assert never.break_even_calls_per_day is None
    assert never.verdict.startswith("never pays back")


def test_always_on_hardware_is_a_fixed_cost() -> None:
    report = estimate(inputs(always_on=True))
    assert report.specialist_fixed_per_month == pytest.approx(1000 + 0.36 * 24 * DAYS_PER_MONTH)
    assert report.break_even_calls_per_day == pytest.approx(report.specialist_fixed_per_month / 660e-6 / DAYS_PER_MONTH)


def test_cost_command_uses_measured_throughput(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"messages_per_second": 50.0, "latency_ms": 12.0}))
    args = ["cost", "--teacher-input-price", "3", "--teacher-output-price", "15", "--calls-per-day", "500"]
    result = CliRunner().invoke(app, [*args, "--input-tokens", "200", "--output-tokens", "4", "--run", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "$660.00" in result.output and "12 ms latency" in result.output
    assert "does not pay back at 500 calls/day" in result.output
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "--throughput" in missing.output
