"""The `taskling` command: a thin Typer layer over the library.

Each command parses its arguments, calls one library function and renders the result.
User mistakes (`TasklingError`) print as a message and a fix, never a traceback.
"""

# Importing the command modules registers their commands on `app`, in the order `--help` lists them.
# isort: off
from taskling.cli import train, bar, cascade, serve, monitor, extract, generate, data, models, review

# isort: on
from taskling.cli.bar import render_ladder
from taskling.cli.common import app, console, err_console, friendly_errors, render_metrics, setup_logging
from taskling.cli.data import render_data_report

__all__ = [
    "app",
    "bar",
    "cascade",
    "console",
    "data",
    "err_console",
    "extract",
    "friendly_errors",
    "generate",
    "models",
    "monitor",
    "render_data_report",
    "render_ladder",
    "render_metrics",
    "review",
    "serve",
    "setup_logging",
    "train",
]
