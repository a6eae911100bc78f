"""Benchmark scripts keep running: every bench/*.py script has a --smoke mode, and it passes.

The list is read from the folder, so a new script without --smoke fails here. Smoke modes run
the script's real code path on a tiny random model and tiny data; the slower ones (servers,
the fuzz suite, the GPU shapes, 300 adversarial messages) are marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# Modules the scripts import, not scripts.
HELPERS = {"common.py", "noisy_logs.py", "adversarial_inputs.py", "generate_tasks.py"}
# Smoke modes that take more than ~10 s on a busy 2-core box.
SLOW = {"adversarial.py", "cascade.py", "fuzz.py", "gpu.py", "load.py", "serve.py"}
# Scripts with a sub-command before the options.
ARGS = {"extract_clinc.py": ["run", "--smoke"]}
# A line each smoke run must print: its table.
EXPECT = {
    "accuracy.py": "| lora+tfidf | full |",
    "cascade.py": "gate (cascade vs lora, same gold rows):",
    "adversarial.py": "answers outside the label set: 0 / 300",
    "clean_gain.py": "| TF-IDF + softmax regression |",
    "cpu.py": "speed ratio, batch 1 latency",
    "data.py": "| total (dedupe + label errors)",
    "dpo_refine.py": "gate: passed",
    "drift.py": "| one loop | value |",
    "export.py": "gguf:q8_0",
    "extract_clinc.py": "record exact match",
    "fuzz.py": "total",
    "generate.py": "queries that wrote: 0, hung: 0",
    "gpu.py": "| tiny-llama | ratio |",
    "ladder.py": "smallest that clears the bar",
    "load.py": "lost log rows 0",
    "serve.py": "rows logged (must equal answered)",
}


def scripts() -> list[str]:
    return sorted(p.name for p in BENCH.glob("*.py") if p.name not in HELPERS)


def test_every_script_has_a_smoke_check() -> None:
    missing = [name for name in scripts() if name not in EXPECT]
    assert not missing, f"add {missing} to EXPECT (and give the script a --smoke mode)"
    for name in scripts():
        assert "bench_parser(" in (BENCH / name).read_text(), f"{name}: build its parser with common.bench_parser"


def test_bench_scripts_import_nothing_from_tests() -> None:
    for path in BENCH.glob("*.py"):
        text = path.read_text()
        assert "sys.path.insert" not in text, f"{path.name}: import through bench/common.py, not sys.path"
        assert "conftest" not in text, f"{path.name}: use taskling.model.tiny / common.tiny_model"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in scripts()])
def test_smoke(name: str, tmp_path: Path) -> None:
    done = run_script(name, ARGS.get(name, ["--smoke"]), tmp_path)
    assert EXPECT[name] in done.stdout, done.stdout[-3000:]


def run_script(name: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run bench/NAME with `args` in `tmp_path` (offline, one thread); it must exit 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_gpu_bench_prints_both_paths_and_the_ratio(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--smoke"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| tiny-llama")]
    assert [row.split("|")[2].strip() for row in rows] == ["stock", "taskling", "ratio"]
    # A smoke run writes its JSON to a temp folder, never over gpu_bench.json where it runs.
    assert not (tmp_path / "gpu_bench.json").exists()
    assert "wrote " in done.stdout and "taskling-bench-gpu-" in done.stdout


def test_cpu_bench_compares_the_label_trie_and_the_linear_head(tmp_path: Path) -> None:
    done = run_script("cpu.py", ["--heads", "--smoke"], tmp_path)
    assert "linear / labels, batched messages/s:" in done.stdout
    names = [line.split("│")[1].strip() for line in done.stdout.splitlines() if line.count("│") >= 6]
    assert names == ["labels (label trie)", "linear"], done.stdout[-3000:]
