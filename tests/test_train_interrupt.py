"""Ctrl-C / SIGTERM during training: checkpoint the current step, say so, resume to the same adapter.

Issue 13 item 4: a signal used to end the process with no message and lose every step since
the last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from taskling.config import build_config
from taskling.train import TrainingInterrupted, train


def signal_at(step: int, signum: int) -> Any:
    """A progress callback that signals this very process once `step` is done."""

    def progress(done: int, total: int, metrics: dict[str, float]) -> None:
        if done == step:
            os.kill(os.getpid(), signum)

    return progress


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_current_step_and_resume_matches(
    tiny_config: dict[str, Any], tmp_path: Path, signum: int
) -> None:
    # No checkpoint is due at step 5 (checkpoint_every 3, eval every 4): only the signal saves it.
    tiny_config["train"].update(epochs=2, eval_every=4, gradient_accumulation=2, batch_size=8, checkpoint_every=3)
    tiny_config["lora"]["dropout"] = 0.1  # the saved RNG state matters
    whole = train(build_config({**tiny_config, "run_dir": str(tmp_path / "whole")}))
    split = build_config({**tiny_config, "run_dir": str(tmp_path / "split")})
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as err:
        train(split, progress=signal_at(5, signum))
    assert signal.Signals(signum).name in err.value.message
    assert "all 5 steps are saved" in err.value.message
    assert err.value.fix is not None and "run the same command again" in err.value.fix and "--fresh" in err.value.fix
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())["step"] == 5
    assert not (tmp_path / "split" / "train_summary.json").exists()

    resumed = train(split)
    assert resumed.steps == whole.steps and resumed.best_step == whole.best_step
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_extraction_stops_cleanly_and_says_it_does_not_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    from taskling.extract.schema import build_extraction_config
    from taskling.train.extraction import train_extraction

    fixtures = Path(__file__).parent / "fixtures"
    config = build_extraction_config(
        {
            "task": {"name": "x", "json_schema": str(fixtures / "extract8_schema.json")},
            "data": {"train": [str(fixtures / "extract8_train.jsonl")], "validation_fraction": 0.2},
            "model": {"base": str(tiny_model_dir), "dtype": "float32", "max_length": 160},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 6, "eval_every": 2, "batch_size": 16, "threads": 1},
            "run_dir": str(tmp_path / "run"),
        }
    )
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a background shell
    with pytest.raises(TrainingInterrupted, match=r"SIGINT at step 3 of 6.*does not resume"):
        train_extraction(config, progress=signal_at(3, signal.SIGINT))
    assert signal.getsignal(signal.SIGINT) is before
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()  # the best of steps 1-2
