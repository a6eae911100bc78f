"""Cost per million calls, teacher vs specialist, and the volume where the specialist pays back.

The teacher is priced per token (input and output prices per million tokens). The
specialist is priced per hour of hardware, turned into a per-call cost by the throughput
measured locally (`metrics.json` from `taskling eval` records messages per second), plus a
fixed monthly maintenance cost (retraining, monitoring, someone's time). Break-even is the
monthly volume where the teacher's bill equals the specialist's:

    V * teacher_per_call = maintenance + V * specialist_per_call
    V = maintenance / (teacher_per_call - specialist_per_call)

With `always_on` the hardware is rented for the whole month whatever the traffic, so its
monthly rent joins the fixed cost and the per-call compute cost is zero (up to capacity).
If the specialist's per-call cost is not below the teacher's, it never pays back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from taskling.errors import TasklingError
from taskling.io import read_json
from taskling.rundir import RunDir

DAYS_PER_MONTH = 30.4
HOURS_PER_MONTH = 24 * DAYS_PER_MONTH


@dataclass(frozen=True)
class CostInputs:
    teacher_input_price: float  # $ per million input tokens
    teacher_output_price: float  # $ per million output tokens
    input_tokens_per_call: float
    output_tokens_per_call: float
    calls_per_day: float
    messages_per_second: float  # measured specialist throughput on the target hardware
    hardware_per_hour: float  # $ per hour for that hardware
    maintenance_per_month: float  # $ per month: retraining, monitoring, on-call
    always_on: bool = False
    latency_ms: float | None = None  # measured, reported only

    def check(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, float | int) and not isinstance(value, bool) and value < 0:
                raise TasklingError(f"cost: {name} is negative ({value})", fix="give a value >= 0")
        if self.messages_per_second <= 0:
            raise TasklingError(
                "cost: the specialist's throughput is unknown or zero",
                fix="pass --run RUN_DIR (its metrics.json records messages/s) or --throughput N",
            )


@dataclass(frozen=True)
class CostReport:
    inputs: CostInputs
    teacher_per_million: float
    specialist_per_million: float  # compute only, at the measured throughput
    specialist_fixed_per_month: float  # maintenance (+ the month's rent when always on)
    calls_per_month: float
    teacher_per_month: float
    specialist_per_month: float
    break_even_calls_per_day: float | None  # None: never pays back
    capacity_calls_per_day: float
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(inputs: CostInputs) -> CostReport:
    """Both costs per million calls, this traffic's monthly bills, and the break-even volume."""
    inputs.check()
    teacher_per_call = (
        inputs.input_tokens_per_call * inputs.teacher_input_price
        + inputs.output_tokens_per_call * inputs.teacher_output_price
    ) / 1e6
    compute_per_call = inputs.hardware_per_hour / 3600 / inputs.messages_per_second
    capacity_per_day = inputs.messages_per_second * 86400
    calls_per_month = inputs.calls_per_day * DAYS_PER_MONTH
    if inputs.always_on:
        fixed = inputs.maintenance_per_month + inputs.hardware_per_hour * HOURS_PER_MONTH
        marginal = 0.0
    else:
        fixed = inputs.maintenance_per_month
        marginal = compute_per_call
    teacher_month = calls_per_month * teacher_per_call
    specialist_month = fixed + calls_per_month * marginal
    saving_per_call = teacher_per_call - marginal
    break_even: float | None = None
    if saving_per_call > 0:
        break_even = fixed / saving_per_call / DAYS_PER_MONTH
    if break_even is None:
        verdict = (
            f"never pays back: a call costs the specialist ${marginal * 1e6:,.2f} per million in compute, "
            f"the teacher ${teacher_per_call * 1e6:,.2f}"
        )
    elif inputs.calls_per_day < break_even:
        verdict = (
            f"does not pay back at {inputs.calls_per_day:,.0f} calls/day: break-even is {break_even:,.0f} calls/day; "
            f"at this volume the specialist costs ${specialist_month - teacher_month:,.2f}/month more"
        )
    else:
        verdict = (
            f"pays back: {inputs.calls_per_day:,.0f} calls/day is above the break-even of {break_even:,.0f}; "
            f"saves ${teacher_month - specialist_month:,.2f}/month"
        )
    if break_even is not None and break_even > capacity_per_day and not inputs.always_on:
        verdict += " (break-even is above one machine's capacity: scale out; the per-call cost holds)"
    if inputs.always_on and inputs.calls_per_day > capacity_per_day:
        verdict += f" (traffic exceeds one machine's capacity of {capacity_per_day:,.0f} calls/day)"
    return CostReport(
        inputs=inputs,
        teacher_per_million=teacher_per_call * 1e6,
        specialist_per_million=compute_per_call * 1e6,
        specialist_fixed_per_month=fixed,
        calls_per_month=calls_per_month,
        teacher_per_month=teacher_month,
        specialist_per_month=specialist_month,
        break_even_calls_per_day=break_even,
        capacity_calls_per_day=capacity_per_day,
        verdict=verdict,
    )


def measured_throughput(run_dir: str | Path) -> tuple[float, float | None]:
    """(messages per second, latency ms or None) measured by `taskling eval` / the ladder."""
    metrics = RunDir(run_dir).metrics
    if not metrics.is_file():
        raise TasklingError(
            f"{metrics} does not exist",
            fix=f"measure first: taskling eval {run_dir} --data GOLD.jsonl, or pass --throughput",
        )
    data = read_json(metrics)
    rate = data.get("messages_per_second")
    if not rate:
        raise TasklingError(f"{metrics} has no messages_per_second", fix="re-run taskling eval, or pass --throughput")
    latency = data.get("latency_ms")
    return float(rate), None if latency is None else float(latency)
