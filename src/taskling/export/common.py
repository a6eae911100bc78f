"""What every export format shares: the run being exported, its sample texts, the tolerances.

`exporter.py` (the formats and the `export` entry point) and `gguf.py` (the GGUF writer and
its round-trip check) both build on this module; neither imports the other at module level
for these pieces, so the two stay free of an import cycle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from taskling.errors import TasklingError
from taskling.io import iter_jsonl
from taskling.model.loader import ChatFormat, base_path, load_model, load_tokenizer
from taskling.rundir import RunDir, read_manifest
from taskling.task import Task

# Relative error of the logits (max |diff| / max |reference|) a GGUF may show against the
# merged transformers model: f16 rounds weights to ~3 significant digits, q8_0 to ~2.
# 4-bit files (q4_0, q4_K_M) round to ~1 digit: their bound only catches a broken file.
LOGIT_TOLERANCE = {"f16": 0.01, "q8_0": 0.06, "q4_0": 0.5, "q4_K_M": 0.5}
# The same, per tensor, for the weights read back (f16: 2^-11 relative rounding; q8_0: 1/254
# of a 32-value block's largest magnitude). A wrong q/k layout is off by O(1).
WEIGHT_TOLERANCE = {"f16": 1e-3, "q8_0": 1e-2, "q4_0": 0.15, "q4_K_M": 0.15}
# A label disagreement between two numerically equivalent models is only an error when the
# reference was not near a tie: bf16 vs fp32 merges may flip a coin-toss.
NEAR_TIE = 0.05
FALLBACK_TEXTS = ("what is my credit score", "play the next song please", "thanks a lot")


class ExportError(TasklingError):
    """A run cannot be exported to the requested format, or the export failed its check."""


@dataclass
class RunInfo:
    run_dir: Path
    manifest: dict[str, Any]
    task: Task
    tokenizer: Any
    base_path: str

    @property
    def files(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def chat_template(self) -> str:
        return str(self.manifest["chat_template"])

    def chat_format(self, tokenizer: Any | None = None) -> ChatFormat:
        return ChatFormat(tokenizer or self.tokenizer, self.task, int(self.manifest["max_length"]))


def load_run(run_dir: str | Path) -> RunInfo:
    """The pieces of a finished classification run an export needs."""
    run = RunDir(Path(run_dir).resolve())
    manifest = read_manifest(run.root)
    tokenizer = load_tokenizer(str(run.tokenizer), manifest["chat_template"])
    return RunInfo(run.root, manifest, Task.model_validate(manifest["task"]), tokenizer, base_path(manifest))


def merged_model(run: RunInfo) -> Any:
    """Base + the run's best adapter, merged in float32 (the merge itself loses nothing)."""
    from peft import PeftModel

    base = load_model(run.base_path, torch.float32)
    model = PeftModel.from_pretrained(base, str(run.files.adapter)).merge_and_unload()
    return model.eval()


def sample_texts(run: RunInfo, n: int = 8) -> list[str]:
    """A few real messages from the run's own data, to check exports on."""
    texts: list[str] = []
    for path in (run.files.validation_data, run.files.train_data):
        if not path.is_file():
            continue
        for _, row in iter_jsonl(path):
            if len(texts) >= n:
                break
            texts.append(str(row["text"]))
    return texts or list(FALLBACK_TEXTS)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compare_predictions(reference: Sequence[Any], candidate: Sequence[Any]) -> dict[str, Any]:
    """Label agreement of two prediction lists; disagreements on a clear reference answer fail."""
    disagree = [
        {"text": r.text, "reference": r.label, "export": c.label, "reference_margin": round(r.margin, 4)}
        for r, c in zip(reference, candidate, strict=True)
        if r.label != c.label
    ]
    max_diff = max(
        abs(r.probabilities[label] - c.probabilities[label])
        for r, c in zip(reference, candidate, strict=True)
        for label in r.probabilities
    )
    return {
        "texts": len(reference),
        "agree": len(reference) - len(disagree),
        "max_probability_diff": round(max_diff, 6),
        "disagreements": disagree,
        "clear_disagreements": sum(d["reference_margin"] >= NEAR_TIE for d in disagree),
    }
