"""Two training processes (DDP over gloo, launched like `torchrun`) end where one process does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from taskling.config import build_config
from taskling.train.sft import train

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_give_the_same_adapter_as_one(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    tiny_config["train"].update(max_steps=4, batch_size=16, eval_every=2, gradient_accumulation=1)
    single = train(build_config({**tiny_config, "run_dir": str(tmp_path / "single")}))

    config = tmp_path / "task.yaml"
    config.write_text(yaml.safe_dump({**tiny_config, "run_dir": str(tmp_path / "multi")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "taskling.cli", "train", str(config),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    one = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "multi" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-6)
    summary = yaml.safe_load((tmp_path / "multi" / "train_summary.json").read_text())
    assert summary["steps"] == single.steps == 4
    assert summary["best_val_loss"] == pytest.approx(single.best_val_loss, rel=1e-5)
