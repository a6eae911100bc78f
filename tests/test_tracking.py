"""Experiment tracking (`train.report_to`): what a tracker records is what history.jsonl says.

TensorBoard is tested for real, offline: the tiny model trains 3 steps and the event file is
read back with TensorBoard's own reader. MLflow, Trackio and W&B are checked for the calls
taskling makes, with stand-in modules in their place (their real clients need a server or a
login); a missing package and an unknown tracker name are config errors naming what to do.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from taskling.config import build_config
from taskling.errors import ConfigError


def history(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def three_steps(tiny_config: dict[str, Any], report_to: Any) -> Any:
    tiny_config["train"].update({"max_steps": 3, "eval_every": 3, "report_to": report_to})
    return build_config(tiny_config)


def test_tensorboard_records_the_losses_of_history_jsonl(tiny_config: dict[str, Any]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from taskling.train.sft import train

    config = three_steps(tiny_config, ["tensorboard"])
    result = train(config)
    logdir = Path(config.run_dir) / "tracking" / "tensorboard"
    events = EventAccumulator(str(logdir))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    records = history(Path(config.run_dir))
    train_loss = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    assert [step for step, _ in train_loss] == [1, 2, 3]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in train_loss], rel=1e-6)
    assert [v for _, v in scalars["train/learning_rate"]] == pytest.approx(
        [r["lr"] for r in records if "lr" in r], rel=1e-6
    )
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in scalars["val/loss"]] == val
    assert len(scalars["train/tokens_per_s"]) == 3 and all(v > 0 for _, v in scalars["train/tokens_per_s"])
    # The config is logged as text; the final numbers go to the HParams run beside it.
    assert "config/text_summary" in events.Tags()["tensors"]
    hparams = EventAccumulator(str(logdir / "hparams"))
    hparams.Reload()
    final = {tag: hparams.Scalars(tag)[0].value for tag in hparams.Tags()["scalars"]}
    assert final["final/steps"] == result.steps == 3
    assert final["final/best_val_loss"] == pytest.approx(result.best_val_loss, rel=1e-6)


class Recorder:
    """Stand-ins for mlflow / trackio / wandb that record every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def module(self, name: str) -> types.ModuleType:
        mod = types.ModuleType(name)
        rec = self

        def record(method: str, result: Any = None) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                rec.calls.append((f"{name}.{method}", (args, kwargs)))
                return result

            return call

        if name == "wandb":
            run = types.SimpleNamespace(
                config=types.SimpleNamespace(update=record("config.update")),
                summary=types.SimpleNamespace(update=record("summary.update")),
                log=record("log"),
                finish=record("finish"),
            )
            mod.init = record("init", run)  # type: ignore[attr-defined]
        else:
            for method in ("start_run", "log_params", "log_metrics", "end_run", "init", "log", "finish"):
                setattr(mod, method, record(method))
        return mod

    def named(self, prefix: str) -> list[tuple[str, Any]]:
        return [(n, a) for n, a in self.calls if n.startswith(prefix)]


@pytest.mark.parametrize("name", ["mlflow", "trackio", "wandb"])
def test_other_trackers_get_config_losses_and_final_numbers(
    tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from taskling.train.sft import train

    rec = Recorder()
    monkeypatch.setitem(sys.modules, name, rec.module(name))
    config = three_steps(tiny_config, name)  # one name alone is accepted too
    train(config)
    calls = rec.named(name)
    metric_call = {"mlflow": "mlflow.log_metrics", "trackio": "trackio.log", "wandb": "wandb.log"}[name]
    logged = [args[0] for n, (args, kwargs) in calls if n == metric_call]
    losses = [m["train/loss"] for m in logged if "train/loss" in m]
    assert losses == [r["train_loss"] for r in history(Path(config.run_dir)) if "train_loss" in r]
    assert any("final/steps" in m for m in logged) or name == "wandb"
    params_call = {"mlflow": "mlflow.log_params", "trackio": "trackio.init", "wandb": "wandb.config.update"}[name]
    (args, kwargs) = next(a for n, a in calls if n == params_call)
    params = kwargs.get("config") or args[0]
    assert str(params["train.max_steps"]) == "3" and str(params["lora.r"]) == "4"
    closing = {"mlflow": "mlflow.end_run", "trackio": "trackio.finish", "wandb": "wandb.finish"}[name]
    assert calls[-1][0] == closing


def test_a_missing_tracker_package_names_the_pip_package(
    tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskling.train.sft import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError) as err:
        train(three_steps(tiny_config, ["wandb"]))
    assert "wandb" in err.value.message and err.value.fix is not None and "pip install wandb" in err.value.fix


def test_an_unknown_tracker_is_a_config_error_naming_the_key(tiny_config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        three_steps(tiny_config, ["comet"])
    assert "train.report_to" in err.value.message


def test_a_failing_tracker_never_stops_training(
    tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from taskling.train.sft import train

    rec = Recorder()
    broken = rec.module("mlflow")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    broken.log_metrics = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", broken)
    result = train(three_steps(tiny_config, ["mlflow"]))
    assert result.steps == 3
    assert "tracking with mlflow failed (OSError: disk full)" in caplog.text
    assert not rec.named("mlflow.end_run")  # switched off after the failure: no more calls
