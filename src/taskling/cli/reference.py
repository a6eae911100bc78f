"""The CLI reference (docs/cli.md), generated from the commands' own `--help`.

    python -m taskling.cli.reference > docs/cli.md      # or: make docs

Every command and sub-command's help is rendered exactly as `taskling ... --help` prints
it, at a fixed width of 100 columns and without colour, so the file only changes when a
command, an option or a help text does. tests/test_docs.py fails when docs/cli.md drifts.
Run it as a fresh process: typer reads the width and colour settings when it first formats help.
"""

from __future__ import annotations

import os

# Read by typer's help formatter on first use: a fixed width and no terminal codes.
os.environ["TERMINAL_WIDTH"] = "100"
os.environ["_TYPER_FORCE_DISABLE_TERMINAL"] = "1"
os.environ["NO_COLOR"] = "1"
os.environ.pop("FORCE_COLOR", None)

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import typer

WIDTH = 100
HEADER = """# CLI reference

Generated from `taskling --help` by `python -m taskling.cli.reference > docs/cli.md` (or
`make docs`); do not edit by hand. Every command is a thin layer over a library function
(see [architecture.md](architecture.md)).
"""


def _contexts(command: Any, name: str, parent: Any) -> Iterator[Any]:
    """A click context for `command` and each of its sub-commands, depth first, in declaration order.

    Typed `Any`: typer builds its commands on its own copy of click's classes.
    """
    ctx = command.context_class(
        command, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH, color=False
    )
    yield ctx
    if hasattr(command, "list_commands"):
        for sub_name in command.list_commands(ctx):
            sub = command.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                yield from _contexts(sub, sub_name, ctx)


def _help(ctx: Any) -> str:
    """The command's `--help` text. Typer's rich formatter prints it instead of returning it."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        returned = ctx.command.get_help(ctx)
    text = printed.getvalue() + returned
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def render(app: typer.Typer) -> str:
    """The Markdown reference of every command of `app`: one section per command, its help verbatim."""
    root = typer.main.get_command(app)
    sections = [HEADER]
    for ctx in _contexts(root, "taskling", None):
        sections.append(f"## `{ctx.command_path}`\n\n```text\n{_help(ctx)}\n```\n")
    return "\n".join(sections)


def main() -> None:
    from taskling.cli import app

    print(render(app), end="")


if __name__ == "__main__":
    main()
