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

A cascade run's `cascade.json` (`taskling cascade`) holds a curve: for each threshold
setting, the share of traffic each stage decides, accuracy, p50/p99 latency and cost per
million calls. `cascade_curve` reads it for `taskling cost RUN` and the report.
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


# ---------------------------------------------------------------- the cascade's curve

CURVE_KEYS = ("thresholds", "share", "accuracy", "p50_ms", "p99_ms", "cost_per_million")


@dataclass(frozen=True)
class CurvePoint:
    """One threshold setting of a cascade: where traffic goes, how right, how fast, how dear."""

    thresholds: dict[str, float]  # stage -> confidence threshold
    share: dict[str, float]  # stage -> fraction of messages it decided
    accuracy: float
    p50_ms: float
    p99_ms: float
    cost_per_million: float
    chosen: bool = False


@dataclass(frozen=True)
class CascadeCurve:
    stages: list[str]
    points: list[CurvePoint]

    @property
    def chosen(self) -> CurvePoint | None:
        return next((p for p in self.points if p.chosen), None)

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """Headers and text cells, one row per point; the chosen one marked. Shared by the report and the CLI."""
        headers = ["", *(f"t {s}" for s in self.stages), *(f"share {s}" for s in self.stages)]
        headers += ["accuracy", "p50 ms", "p99 ms", "$ per million"]
        rows = []
        for p in self.points:
            thresholds = [_threshold(p.thresholds.get(s)) for s in self.stages]
            shares = [f"{p.share.get(s, 0.0):.1%}" for s in self.stages]
            tail = [f"{p.accuracy:.2%}", f"{p.p50_ms:.1f}", f"{p.p99_ms:.1f}", f"{p.cost_per_million:,.2f}"]
            rows.append(["chosen" if p.chosen else "", *thresholds, *shares, *tail])
        return headers, rows


def _threshold(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def cascade_curve(run_dir: str | Path) -> CascadeCurve | None:
    """The accuracy / latency / cost curve in RUN_DIR/cascade.json (`taskling cascade`); None without one."""
    path = RunDir(run_dir).cascade
    if not path.is_file():
        return None
    data = read_json(path)
    curve, chosen = data.get("curve"), data.get("chosen")
    fix = f"rebuild it: taskling cascade {run_dir}"
    if not isinstance(curve, list) or not curve:
        raise TasklingError(f"{path}: `curve` is missing or empty", fix=fix)
    points = []
    for i, point in enumerate(curve):
        missing = [k for k in CURVE_KEYS if not isinstance(point, dict) or k not in point]
        if missing:
            raise TasklingError(f"{path}: curve[{i}] has no {', '.join(missing)}", fix=fix)
        try:
            points.append(CurvePoint(**{k: point[k] for k in CURVE_KEYS}, chosen=i == chosen))
        except TypeError as err:
            raise TasklingError(f"{path}: curve[{i}] is malformed ({err})", fix=fix) from None
    named = [s.get("name") for s in data.get("stages") or [] if isinstance(s, dict)]
    stages = [n for n in named if isinstance(n, str)]
    for p in points:  # stages of the curve that cascade.json does not list, in order of appearance
        stages += [s for s in [*p.share, *p.thresholds] if s not in stages]
    return CascadeCurve(stages, points)
