"""The docs say what the code does: the CLI reference, README's Python API and claims, the module map."""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SRC = ROOT / "src" / "taskling"
REGENERATE = "make docs  (or: python -m taskling.cli.reference > docs/cli.md)"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


def imported_names(code: str) -> list[tuple[str, str | None]]:
    """(module, name) for each `from X import Y`, (module, None) for each `import X`, in import lines only."""
    lines = [line for line in code.splitlines() if re.match(r"(from\s+\S+\s+)?import\s", line)]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
    return found


def test_cli_reference_is_up_to_date() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    done = subprocess.run(
        [sys.executable, "-m", "taskling.cli.reference"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    if done.stdout != current:
        diff = "".join(
            difflib.unified_diff(
                current.splitlines(keepends=True), done.stdout.splitlines(keepends=True), "docs/cli.md", "--help now"
            )
        )
        pytest.fail(f"docs/cli.md is out of date with the CLI; regenerate it: {REGENERATE}\n{diff[:6000]}")


def test_imported_names_finds_from_and_plain_imports() -> None:
    code = "from taskling import Classifier, load_config\nimport json\nclf = Classifier.from_run('x')\n"
    assert imported_names(code) == [("taskling", "Classifier"), ("taskling", "load_config"), ("json", None)]


@pytest.mark.parametrize(
    "module,name", [pair for block in python_blocks(README.read_text()) for pair in imported_names(block)]
)
def test_readme_python_imports_exist(module: str, name: str | None) -> None:
    if not module.startswith("taskling"):
        pytest.skip(f"{module} is not taskling's")
    imported = importlib.import_module(module)
    if name is not None:
        assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), (
            f"README imports {name} from {module}, which has no such name"
        )


def test_readme_has_python_examples() -> None:
    blocks = python_blocks(README.read_text())
    assert any("from taskling" in block for block in blocks)


def test_readme_required_settings_are_the_only_ones(tmp_path: Path) -> None:
    """README: `task.labels` and `data.train` are required; every other setting has a default."""
    from taskling.config import build_config
    from taskling.errors import ConfigError

    assert "`task.labels`" in README.read_text() and "`data.train`" in README.read_text()
    minimal = {"task": {"labels": ["a", "b"]}, "data": {"train": [str(tmp_path / "train.jsonl")]}}
    build_config(minimal)
    for missing in ("task", "data"):
        with pytest.raises(ConfigError):
            build_config({k: v for k, v in minimal.items() if k != missing})


def test_python_version_is_stated_once_everywhere() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = re.fullmatch(r">=(\d+\.\d+)", pyproject["project"]["requires-python"])
    assert floor, pyproject["project"]["requires-python"]
    assert pyproject["tool"]["mypy"]["python_version"] == floor.group(1)
    assert f"Python {floor.group(1)} or newer" in README.read_text()


def test_constraints_pin_versions_every_index_serves() -> None:
    """A local version label (torch==2.13.0+cpu) exists only on the PyTorch index: `make setup` fails on PyPI."""
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line]
    assert pins
    local = [line for line in pins if "+" in line.split("==", 1)[1]]
    assert not local, f"drop the local version labels (pip matches `==X` to `X+cpu` too): {local}"


def test_architecture_doc_maps_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(
        "taskling." + ".".join(p.relative_to(SRC).with_suffix("").parts)
        for p in SRC.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md's module map lacks {missing}"
