"""The loop's progress (`TrainState`), resumable checkpoints, and crash-safe adapter saves.

`RUN_DIR/checkpoint/` holds the adapter, the optimizer, scheduler and RNG state, and the
`TrainState` as JSON. Directories are written beside their target and swapped in with two
renames (`swap_in`); `recover_swaps` repairs a crash between the renames, so a complete
adapter and a complete checkpoint are always on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from taskling.io import read_json, write_json
from taskling.rundir import ADAPTER_WEIGHTS, RunDir

log = logging.getLogger(__name__)

# Names inside RUN_DIR/checkpoint/: private to this module.
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
ADAPTER_DIR = "adapter"


@dataclass
class TrainState:
    """Where the loop is: everything a resumed run needs besides weights and optimizer."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next micro-batch comes from
    position: int = 0  # micro-batches of that epoch already used
    best_val_loss: float | None = None
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the last improvement
    stopped_early: bool = False
    tokens_seen: int = 0  # tokens (prompt and answer, all processes) in completed steps

    @classmethod
    def from_dict(cls, raw: dict[str, Any], micro_per_epoch: int) -> TrainState:
        """Read a saved state; one from before `epoch`/`position` counted `micro_batches` instead."""
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in raw.items() if k in names})
        if "epoch" not in raw and "micro_batches" in raw:
            state.epoch, state.position = divmod(int(raw["micro_batches"]), micro_per_epoch)
        return state


def swap_in(tmp: Path, final: Path) -> None:
    """Replace directory `final` with the complete directory `tmp`.

    Two renames: `final` -> `final.old`, `tmp` -> `final`. A crash between them leaves `final.old`,
    which `recover_swaps` puts back, so some complete version is always on disk.
    """
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)


def _partial(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def recover_swaps(run_dir: str | Path) -> None:
    """Undo a swap that a crash cut between its two renames, and drop half-written temp directories."""
    run = RunDir(run_dir)
    for final in (run.checkpoint, run.adapter):
        old = final.with_name(final.name + ".old")
        if old.is_dir() and not final.exists():
            old.replace(final)
            log.warning("restored %s from %s after an interrupted save", final, old)
        shutil.rmtree(_partial(final), ignore_errors=True)


def save_adapter(run_dir: str | Path, model: Any) -> None:
    """Write the model's LoRA adapter to RUN_DIR/adapter/, replacing the old one in one swap."""
    final = RunDir(run_dir).adapter
    tmp = _partial(final)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    swap_in(tmp, final)


def save_checkpoint(run_dir: str | Path, model: Any, optimizer: Any, scheduler: Any, state: TrainState) -> None:
    """Write RUN_DIR/checkpoint/ (adapter, optimizer, scheduler, RNG, state) in one swap."""
    final = RunDir(run_dir).checkpoint
    tmp = _partial(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / ADAPTER_DIR)
    blob = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(blob, tmp / OPTIMIZER_FILE)
    write_json(tmp / STATE_FILE, dataclasses.asdict(state))
    swap_in(tmp, final)


def has_checkpoint(run_dir: str | Path) -> bool:
    return (RunDir(run_dir).checkpoint / STATE_FILE).is_file()


def checkpoint_step(run_dir: str | Path) -> int:
    """The optimizer step the checkpoint was saved at."""
    return int(read_json(RunDir(run_dir).checkpoint / STATE_FILE)["step"])


def load_checkpoint(
    run_dir: str | Path, model: Any, optimizer: Any, scheduler: Any, micro_per_epoch: int
) -> TrainState:
    """Load weights, optimizer, scheduler and RNG state saved by `save_checkpoint`; return the state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = RunDir(run_dir).checkpoint
    set_peft_model_state_dict(model, load_file(str(ckpt / ADAPTER_DIR / ADAPTER_WEIGHTS)))
    blob = torch.load(ckpt / OPTIMIZER_FILE, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return TrainState.from_dict(read_json(ckpt / STATE_FILE), micro_per_epoch)
