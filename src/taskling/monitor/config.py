"""The monitor's types: its thresholds (`MonitorConfig`), the checks' results and the report.

They live apart from the code that computes them so the reference, the checks and the HTML
page can all name them without importing each other.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskling.errors import ConfigError

# The label an abstaining classifier gives (abstain.UNKNOWN; not imported: that pulls in torch).
UNKNOWN = "unknown"


class MonitorConfig(BaseModel):
    """Alarm thresholds for `taskling monitor` (YAML via `--config`; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    # "minilm": all-MiniLM-L6-v2 sentence embeddings; "hashing": character n-gram hashing
    # (no model, for tests and quick looks).
    embedder: Literal["minilm", "hashing"] = "minilm"
    # Fewer rows than this in the window: report, but never alarm (too noisy to judge).
    min_rows: int = Field(50, ge=1)
    # Label shift alarms when PSI exceeds psi_max AND chi-squared p is below chi2_p_max:
    # PSI says the shift is large, the test says it is not sampling noise of a small window.
    psi_max: float = Field(0.25, gt=0)
    chi2_p_max: float = Field(0.001, gt=0, lt=1)
    confidence_drop_max: float = Field(0.05, gt=0)
    low_margin: float = Field(0.2, gt=0, lt=1)  # an answer with margin below this is "low-margin"
    low_margin_increase_max: float = Field(0.10, gt=0)
    # Centroid cosine distance; None: calibrated as embedding_distance_factor x (mean + 4 sd)
    # of resampled validation windows of the window's size. The factor leaves room for the
    # mild, harmless difference between held-out training rows and live traffic.
    embedding_distance_max: float | None = Field(None, gt=0)
    embedding_distance_factor: float = Field(1.5, ge=1)
    ood_quantile: float = Field(0.01, gt=0, lt=0.5)
    ood_share_max: float = Field(0.08, gt=0, lt=1)
    length_change_max: float = Field(0.5, gt=0)  # relative change in mean words per input
    abstain_share_max: float = Field(0.10, gt=0, lt=1)  # share of `unknown` answers
    # Generation runs (monitor/generation.py): relative change in mean answer tokens, and the
    # drop in format validity rate, against the run's eval answers.
    output_length_change_max: float = Field(0.5, gt=0)
    validity_drop_max: float = Field(0.05, gt=0, lt=1)
    buckets: int = Field(20, ge=2, le=200)


def load_monitor_config(path: str | Path | None) -> MonitorConfig:
    if path is None:
        return MonitorConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"monitor config {path} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return MonitorConfig.model_validate(raw.get("monitor", raw))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in err.errors()
        )
        raise ConfigError(f"{path} is invalid: {problems}", fix="see docs/monitor.md for the keys") from None


@dataclass
class Signal:
    name: str
    value: float | None
    threshold: float | None
    alarm: bool
    detail: str


@dataclass
class CategoryShift:
    label: str
    train_share: float
    window_share: float
    count: int
    psi: float
    residual: float  # (observed - expected) / sqrt(expected)


@dataclass
class DriftReport:
    run_dir: str
    window: dict[str, Any]
    signals: list[Signal]
    categories: list[CategoryShift]
    text_stats: dict[str, Any]
    ood_examples: list[dict[str, Any]]
    series: list[dict[str, Any]]
    config: dict[str, Any]
    window_start_index: int = 0
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    @property
    def alarm(self) -> bool:
        return any(s.alarm for s in self.signals)

    @property
    def moved(self) -> list[Signal]:
        return [s for s in self.signals if s.alarm]

    def to_dict(self) -> dict[str, Any]:
        return {"alarm": self.alarm, **asdict(self)}
