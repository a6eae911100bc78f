"""Optional features and the packages they need.

`pip install taskling` is the core: train, classify and eval with torch, transformers and
peft. The rest comes with extras (`serve`, `data`, `monitor`, `batch`, `export`, `ray`;
`all` for every one). Code that needs an extra's package imports it lazily under
`needs(extra)` (or with `require`), so a missing package is a `MissingExtraError` that names
it and the one command that installs it, never a bare `ModuleNotFoundError`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

from taskling.errors import TasklingError


@dataclass(frozen=True)
class OptionalPackage:
    """A package outside the core install: its PyPI name and the extra that brings it."""

    distribution: str
    extra: str


# Import name -> where it comes from. A package in several extras names the one that needs it most.
OPTIONAL: dict[str, OptionalPackage] = {
    "fastapi": OptionalPackage("fastapi", "serve"),
    "starlette": OptionalPackage("fastapi", "serve"),
    "uvicorn": OptionalPackage("uvicorn", "serve"),
    "sqlalchemy": OptionalPackage("SQLAlchemy", "serve"),
    "prometheus_client": OptionalPackage("prometheus-client", "serve"),
    "sklearn": OptionalPackage("scikit-learn", "data"),
    "scipy": OptionalPackage("scipy", "data"),
    "datasketch": OptionalPackage("datasketch", "data"),
    "cleanlab": OptionalPackage("cleanlab", "data"),
    "sentence_transformers": OptionalPackage("sentence-transformers", "data"),
    "httpx": OptionalPackage("httpx", "data"),
    "datasets": OptionalPackage("datasets", "data"),
    "pyarrow": OptionalPackage("pyarrow", "batch"),
    "pandas": OptionalPackage("pandas", "batch"),
    "ray": OptionalPackage("ray[data]", "ray"),
    "gguf": OptionalPackage("gguf", "export"),
}


class MissingExtraError(TasklingError):
    """An optional feature's package is not installed; the fix is one `pip install`."""

    def __init__(self, module: str, extra: str) -> None:
        known = OPTIONAL.get(module)
        self.module = module
        self.distribution = known.distribution if known else module
        self.extra = extra
        super().__init__(
            f"this needs the package {self.distribution}, which is not installed "
            f"(it comes with the {extra!r} extra of taskling)",
            fix=f"pip install 'taskling[{extra}]'   (or 'taskling[all]' for every feature)",
        )


def missing_extra(err: ModuleNotFoundError, extra: str | None = None) -> MissingExtraError | None:
    """The `MissingExtraError` that `err` means, or None when `err` is not about an optional package."""
    top = (err.name or "").partition(".")[0]
    if top not in OPTIONAL:
        return None
    return MissingExtraError(top, extra or OPTIONAL[top].extra)


@contextmanager
def needs(extra: str) -> Iterator[None]:
    """Imports in this block belong to `extra`: a missing optional package raises `MissingExtraError`.

    with needs("data"):
        from sklearn.feature_extraction.text import TfidfVectorizer
    """
    try:
        yield
    except ModuleNotFoundError as err:
        missing = missing_extra(err, extra)
        if missing is None:
            raise
        raise missing from err


def require(module: str, *, extra: str | None = None) -> ModuleType:
    """Import `module`, or raise `MissingExtraError` naming the extra that installs it."""
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = missing_extra(err, extra) or (MissingExtraError(top, extra) if extra else None)
        if missing is None:
            raise
        raise missing from err
