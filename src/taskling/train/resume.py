"""Whether a run directory may be resumed, and clearing it for a fresh start.

A run folder holds one run. Training into a folder that already holds one continues it only
when the resolved config and the data (train/validation content hashes) are the ones the
folder recorded; anything else is refused with what differs. A fresh start (`--fresh`)
first removes every file the old run left, so an adapter, its metrics and its gate verdict
always belong to the same run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from taskling.errors import RunError
from taskling.io import read_json
from taskling.rundir import RunDir

log = logging.getLogger(__name__)

# Settings that change how fast a run goes or where it is reported, not what it learns, and
# where the data was read from (its content is compared by hash instead).
NOT_COMPARED = {
    "run_dir",
    "train.threads",
    "train.checkpoint_every",
    "train.report_to",
    "data.train",
    "data.validation",
}
FRESH_FIX = "pass --fresh to start over in this folder (removes the old run's files), or set run_dir to a new folder"


def holds_a_run(run_dir: str | Path) -> bool:
    """True when the folder holds a config, a manifest or a checkpoint of an earlier run."""
    run = RunDir(run_dir)
    return run.config.is_file() or run.manifest.is_file() or run.checkpoint.exists()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _describe(key: str, old: Any, new: Any) -> str:
    if isinstance(old, list) and isinstance(new, list):
        added = [x for x in new if x not in old]
        gone = [x for x in old if x not in new]
        what = "labels" if key.endswith("labels") else "items"
        text = f"{key}: {len(old)} {what} in the run, {len(new)} in the config"
        if added or gone:
            text += f" (new: {', '.join(map(str, added[:5])) or '-'}; gone: {', '.join(map(str, gone[:5])) or '-'})"
        elif old != new:
            text += " (a different order)"
        return text
    return f"{key}: {old!r} in the run, {new!r} in the config"


def differences(run_dir: str | Path, config: dict[str, Any], data_hashes: dict[str, str]) -> list[str]:
    """What differs between the run the folder recorded and the one `config` and its data describe."""
    run = RunDir(run_dir)
    found: list[str] = []
    if run.config.is_file():
        old = _flatten(yaml.safe_load(run.config.read_text(encoding="utf-8")) or {})
        new = _flatten(config)
        for key in sorted(old.keys() | new.keys()):
            if key not in NOT_COMPARED and old.get(key) != new.get(key):
                found.append(_describe(key, old.get(key), new.get(key)))
    if run.manifest.is_file():
        recorded = read_json(run.manifest).get("data", {})
        for key, value in data_hashes.items():
            if recorded.get(key) != value:
                was = str(recorded.get(key) or "none")[:12]
                found.append(f"data.{key}: {was} in the run, {value[:12]} in the config's data (other rows)")
    return found


def check_resumable(run_dir: str | Path, config: dict[str, Any], data_hashes: dict[str, str]) -> None:
    """Raise RunError naming what differs when the folder holds a different run."""
    found = differences(run_dir, config, data_hashes)
    if found:
        listed = "\n  ".join(found)
        raise RunError(f"{run_dir} holds a different run than this config describes:\n  {listed}", fix=FRESH_FIX)


def clear_run(run_dir: str | Path) -> list[str]:
    """Remove every file an earlier run left in the folder; returns the names removed.

    Kept: `source/` (where `taskling demo` puts the data it trains on) and anything taskling
    did not write.
    """
    run = RunDir(run_dir)
    outputs = [
        run.config, run.manifest, run.data, run.tokenizer, run.adapter, run.checkpoint, run.history, run.summary,
        run.metrics, run.predictions, run.baseline, run.gate, run.report, run.abstain, run.prediction_log,
        run.monitor, run.exports, run.ladder, run.labels, run.fields, run.evals, run.pairs, run.dpo_summary,
        run.dpo_report, run.comparison, run.tracking,
    ]  # fmt: skip
    for folder in (run.adapter, run.checkpoint):
        outputs += [folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")]
    removed = []
    for path in outputs:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    if removed:
        log.info("fresh start in %s: removed %s", run.root, ", ".join(removed))
    return removed
