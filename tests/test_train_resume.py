"""A run folder holds one run: resume only the same run, refuse another, --fresh starts clean.

Issue 13 item 1: `taskling train other.yaml run_dir=EXISTING_RUN` (a finished 4-label run,
the config now naming more labels) used to print "resuming", rewrite config.yaml, run.json
and data/ for the new task, keep the old adapter and the old metrics, and exit 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from taskling.config import build_config
from taskling.errors import RunError
from taskling.train import train

# Files later stages write into a run; a fresh start must take them away with the old adapter.
STALE = ("metrics.json", "predictions.jsonl", "gate.json", "baseline.json", "report.html", "abstain.json")


def four_labels(tiny_config: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    tiny_config["task"]["labels"] = labels[:4]
    tiny_config["data"]["on_bad_rows"] = "skip"  # rows of the other four labels
    tiny_config["train"].update(max_steps=2, eval_every=2)
    return tiny_config


def all_labels(raw: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    return {**raw, "task": {**raw["task"], "labels": labels}}


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_four(tiny_config: dict[str, Any], labels: list[str]) -> tuple[dict[str, Any], Path]:
    raw = four_labels(tiny_config, labels)
    run = train(build_config(raw)).run_dir
    for name in STALE:  # as if eval, gate and report had run on it
        (run / name).write_text("{}\n")
    return raw, run


@pytest.mark.parametrize("keep_checkpoint", [True, False])
def test_a_different_task_in_a_finished_run_is_refused(
    finished_four: tuple[dict[str, Any], Path], labels: list[str], keep_checkpoint: bool
) -> None:
    raw, run = finished_four
    if not keep_checkpoint:
        shutil.rmtree(run / "checkpoint")
    before = snapshot(run)
    with pytest.raises(RunError, match=r"task\.labels: 4 labels in the run, 8 in the config") as err:
        train(build_config(all_labels(raw, labels)))
    assert err.value.fix is not None and "--fresh" in err.value.fix and "new folder" in err.value.fix
    assert snapshot(run) == before  # nothing rewritten: config, manifest, data, adapter, metrics


def test_other_data_in_a_finished_run_is_refused(finished_four: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    raw, run = finished_four
    rows = Path(raw["data"]["train"][0]).read_text().splitlines(keepends=True)
    kept = [r for r in rows if json.loads(r)["label"] in raw["task"]["labels"]]
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(kept[3:]))  # three rows of the run's own labels fewer
    before = snapshot(run)
    with pytest.raises(RunError, match=r"data\.train_hash"):
        train(build_config({**raw, "data": {**raw["data"], "train": [str(fewer)]}}))
    assert snapshot(run) == before


def test_the_same_run_resumes_and_a_speed_setting_may_change(finished_four: tuple[dict[str, Any], Path]) -> None:
    raw, run = finished_four
    weights = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    raw["train"]["threads"] = 2
    result = train(build_config(raw))
    assert result.steps == 2 and (run / "adapter" / "adapter_model.safetensors").read_bytes() == weights
    assert all((run / name).exists() for name in STALE)  # the same run: its scores still hold


def test_fresh_removes_the_old_runs_files(finished_four: tuple[dict[str, Any], Path], labels: list[str]) -> None:
    raw, run = finished_four
    (run / "adapter.old").mkdir()  # left by a crash mid-save
    result = train(build_config(all_labels(raw, labels)), resume=False)
    assert result.steps == 2
    assert [name for name in STALE if (run / name).exists()] == []
    assert not (run / "adapter.old").exists()
    assert json.loads((run / "run.json").read_text())["task"]["labels"] == labels
    assert len(json.loads((run / "run.json").read_text())["label_answers"]) == 8
    assert yaml.safe_load((run / "config.yaml").read_text())["task"]["labels"] == labels
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "train_loss" in r] == [1, 2]  # only the new run's steps


def test_cli_refuses_another_run_and_fresh_starts_over(
    finished_four: tuple[dict[str, Any], Path], labels: list[str], tmp_path: Path
) -> None:
    from taskling.cli import app

    raw, run = finished_four
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**all_labels(raw, labels), "run_dir": str(tmp_path / "elsewhere")}))
    runner = CliRunner()
    refused = runner.invoke(app, ["train", str(other), f"run_dir={run}"])
    assert refused.exit_code == 2, refused.output
    assert "4 labels in the run, 8 in the config" in refused.output and "--fresh" in refused.output
    assert "resuming" not in refused.output
    assert json.loads((run / "run.json").read_text())["task"]["labels"] == labels[:4]
    assert (run / "metrics.json").exists()

    fresh = runner.invoke(app, ["train", str(other), f"run_dir={run}", "--fresh"])
    assert fresh.exit_code == 0, fresh.output
    assert json.loads((run / "run.json").read_text())["task"]["labels"] == labels
    assert not (run / "metrics.json").exists() and not (run / "gate.json").exists()
