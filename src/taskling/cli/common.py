"""Shared CLI plumbing: the Typer app, consoles, error handling, progress and report cards.

Text that comes from users or files (messages, labels, paths, error messages) is printed as
rich `Text`, never parsed as console markup: a message holding `[/bold]` prints as itself.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from taskling.errors import TasklingError

app = typer.Typer(help="Fine-tune small specialist models for narrow, high-volume tasks.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


# Control characters (ESC starts a terminal escape sequence) are shown, never sent to the terminal.
_VISIBLE = {c: f"\\x{c:02x}" for c in (*range(32), 127) if c not in (9, 10)}


def shown(value: Any) -> str:
    """A user-derived value, safe in rich output: markup escaped, control characters and
    unpaired surrogates made visible, so a label like `[/bold]` prints as itself."""
    text = str(value).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return escape(text.translate(_VISIBLE))


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )
    logging.getLogger("taskling").setLevel(logging.INFO)
    for noisy in ("transformers", "peft", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # transformers' own per-load progress bars and deprecation chatter drown the report.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def friendly_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TasklingError as err:
            err_console.print(Text.assemble(("error:", "bold red"), " ", err.message), soft_wrap=True)
            if err.fix:
                err_console.print(Text.assemble(("fix:", "yellow"), " ", err.fix), soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")] = False) -> None:
    setup_logging(verbose)


@contextmanager
def training_progress() -> Iterator[Callable[[int, int, dict[str, float]], None]]:
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        task_id = bar.add_task("train", total=None, loss=float("nan"), rate=0.0)

        def update(step: int, total: int, info: dict[str, float]) -> None:
            bar.update(task_id, completed=step, total=total, loss=info["loss"], rate=info["tokens_per_s"])

        yield update


def render_train_summary(result: Any) -> None:
    """The training summary table: rows used, steps, best validation loss, speed."""
    table = Table(title="training", show_header=False)
    table.add_row("run directory", Text(str(result.run_dir)))
    table.add_row(
        "rows (train / validation / skipped)", f"{result.train_rows} / {result.validation_rows} / {result.skipped_rows}"
    )
    table.add_row("optimizer steps", str(result.steps))
    best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f} at step {result.best_step}"
    table.add_row("best validation loss", best)
    table.add_row("stopped early", "yes" if result.stopped_early else "no")
    table.add_row("training tokens/s", f"{result.tokens_per_second:.0f}")
    console.print(table)


def render_metrics(metrics: Any, title: str = "evaluation", top: int = 10) -> None:
    """The report card: headline numbers, then the weakest categories."""
    head = Table(title=Text(title), show_header=False)
    head.add_row("rows", str(metrics.n))
    head.add_row("accuracy", f"{metrics.accuracy:.2%}")
    head.add_row("macro-F1", f"{metrics.macro_f1:.4f}")
    head.add_row("worst category", Text(f"{metrics.worst_category} ({metrics.worst_category_accuracy:.0%})"))
    head.add_row("outside the label set", f"{metrics.out_of_label_set_rate:.2%}")
    console.print(head)
    cats = Table(title=f"weakest {min(top, len(metrics.per_category))} categories")
    for col in ("category", "accuracy", "precision", "F1", "support", "most confused with"):
        cats.add_column(col)
    labels = metrics.confusion_labels
    ranked = sorted(metrics.per_category.items(), key=lambda kv: (kv[1]["accuracy"], kv[0]))
    for label, row in ranked[:top]:
        i = labels.index(label)
        counts = [(c, labels[j]) for j, c in enumerate(metrics.confusion[i]) if j != i and c]
        confused = f"{max(counts)[1]} ({max(counts)[0]})" if counts else "-"
        cats.add_row(
            Text(label),
            f"{row['accuracy']:.0%}",
            f"{row['precision']:.0%}",
            f"{row['f1']:.3f}",
            str(int(row["support"])),
            Text(confused),
        )
    console.print(cats)
