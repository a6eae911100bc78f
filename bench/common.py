"""What the bench scripts share: `--smoke`, tables, a tiny model and run, CLINC150 subsets.

Every script in bench/ runs two ways: for real (the numbers quoted in README and docs/) and
with `--smoke`: a tiny random model and tiny data, seconds, no network, through the same code
path, printing the same table. tests/test_bench_scripts.py runs every script's smoke mode.

Scripts import this module as `common` (Python puts a script's folder on sys.path). Nothing
here imports from tests/; the smoke data are the files in tests/fixtures/, read as data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
INSTRUCTION = "Classify the user's message. Answer with exactly one category name."
CACHE = Path(tempfile.gettempdir()) / "taskling-bench"


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser showing the script's docstring, with `--smoke`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny random model and tiny data: seconds, checks it runs")
    return p


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> None:
    """Print a rich table (width fixed at 120 so logs and docs look the same everywhere)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    Console(width=120).print(table)


def work_dir(prefix: str) -> Path:
    """A fresh temporary folder (kept, so a failed run can be inspected)."""
    return Path(tempfile.mkdtemp(prefix=f"taskling-bench-{prefix}-"))


# ---------------------------------------------------------------- a tiny model and a tiny run


def clinc8_labels() -> list[str]:
    return (FIXTURES / "clinc8_labels.txt").read_text().split()


def tiny_model(out: Path) -> Path:
    """The test suite's tiny random Llama (tokenizer trained on the clinc8 fixture texts)."""
    from taskling.model.tiny import build_tiny_model

    if (out / "config.json").is_file():
        return out
    texts = [json.loads(line)["text"] for line in (FIXTURES / "clinc8_train.jsonl").read_text().splitlines()]
    return build_tiny_model(out, texts=[*texts, *clinc8_labels(), INSTRUCTION])


def tiny_run(root: Path | None = None, *, epochs: float = 2, max_steps: int | None = None) -> Path:
    """A tiny model trained on the clinc8 fixtures, in `root` (default: a shared cache, built once)."""
    from taskling.config import build_config
    from taskling.rundir import RunDir
    from taskling.train.sft import train

    root = root or CACHE
    run = root / "run"
    if RunDir(run).summary.is_file() and RunDir(run).is_finished():
        return run
    model = tiny_model(root / "tiny-llama")
    train_cfg: dict[str, Any] = {"epochs": epochs, "batch_size": 16, "learning_rate": 5e-3, "seed": 0, "threads": 1}
    if max_steps:
        train_cfg["max_steps"] = max_steps
    config = build_config(
        {
            "task": {"name": "clinc8", "labels": clinc8_labels()},
            "data": {"train": [str(FIXTURES / "clinc8_train.jsonl")], "validation_fraction": 0.2},
            "model": {"base": str(model), "dtype": "float32", "max_length": 128},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": train_cfg,
            "run_dir": str(run),
        }
    )
    return Path(train(config).run_dir)


# ---------------------------------------------------------------- CLINC150 and subsets of it


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def clinc8(out: Path) -> Path:
    """A CLINC150-shaped folder from the clinc8 fixtures: 8 intents, 25/5/10 train/validation/test
    rows each, 20 + 40 out-of-scope rows (oos.jsonl, split val/test) and LABELS.txt."""
    labels = clinc8_labels()
    train, validation = [], []
    for label in labels:
        rows = [r for r in read_rows(FIXTURES / "clinc8_train.jsonl") if r["label"] == label]
        train += rows[:25]
        validation += rows[25:]
    write_rows(out / "train.jsonl", train)
    write_rows(out / "validation.jsonl", validation)
    write_rows(out / "test.jsonl", read_rows(FIXTURES / "clinc8_gold.jsonl"))
    oos = read_rows(FIXTURES / "clinc_oos60.jsonl")
    write_rows(out / "oos.jsonl", ({**r, "split": "val" if i < 20 else "test"} for i, r in enumerate(oos)))
    (out / "LABELS.txt").write_text("\n".join(labels) + "\n")
    return out


def clinc_dir(explicit: Path | None, smoke: bool) -> Path:
    """CLINC150: the clinc8 subset in smoke mode, else `explicit` or the one `taskling demo` finds."""
    if smoke:
        return clinc8(work_dir("clinc8"))
    from taskling.data.demo import find_clinc

    return find_clinc(explicit)


def clinc_texts(data: Path, n: int, labels: Iterable[str] | None = None, seed: int | None = None) -> list[str]:
    """`n` test messages of CLINC150 (of `labels` if given), repeated as needed, shuffled if `seed`."""
    rows = read_rows(data / "test.jsonl")
    keep = set(labels or ())
    texts = [r["text"] for r in rows if not keep or r["label"] in keep] or [r["text"] for r in rows]
    if seed is not None:
        random.Random(seed).shuffle(texts)
    return [texts[i % len(texts)] for i in range(n)]
