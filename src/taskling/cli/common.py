"""Shared CLI plumbing: the Typer app, consoles, error handling, progress and report cards.

Text that comes from users or files (messages, labels, paths, error messages) is printed as
rich `Text`, never parsed as console markup: a message holding `[/bold]` prints as itself.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from taskling.errors import TasklingError
from taskling.extras import missing_extra

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
    # torchao (the nf4 backend) is imported by transformers whenever it is installed, and on a
    # CPU-only box it warns about CUDA kernels it cannot load; torch's pytree warns on its enums.
    for noisy in ("transformers", "peft", "httpx", "urllib3", "torchao", "torch.utils._pytree"):
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
        except (TasklingError, ModuleNotFoundError) as caught:
            # A lazily imported optional package that is missing names its extra (taskling.extras).
            err = caught if isinstance(caught, TasklingError) else missing_extra(caught)
            if err is None:
                raise
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
    """Training's `(step, total, info)` callback: a rich bar with loss and tokens/s on a
    terminal, plain periodic lines (`PlainProgress`) otherwise."""
    if not err_console.is_terminal:
        plain = PlainProgress("train", "steps")

        def log_line(step: int, total: int, info: dict[str, float]) -> None:
            plain.suffix = f", loss {info['loss']:.4f}, {info['tokens_per_s']:.0f} tok/s"
            plain(step, total)

        yield log_line
        return
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


ProgressCallback = Callable[[int, int], None]


class PlainProgress:
    """`(done, total)` as plain lines for logs (CI, a pipe): one every `every_percent` of the
    total or every `every_seconds`, whichever comes first, and one at the end."""

    def __init__(
        self,
        label: str,
        unit: str,
        *,
        every_percent: float = 10.0,
        every_seconds: float = 10.0,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.unit = label, unit
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self.write = write or (lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True))
        self.clock = clock
        self.started = self.last_time = clock()
        self.last_done, self.last_bucket = 0, 0
        self.suffix = ""  # appended to the next line written: the training loss, say

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        bucket = int(done * 100 / total // self.every_percent) if total else 0
        due = done >= total or bucket > self.last_bucket or now - self.last_time >= self.every_seconds
        if not due or done == self.last_done:
            return
        self.last_done, self.last_bucket, self.last_time = done, bucket, now
        self.write(self.line(done, total, now - self.started))

    def line(self, done: int, total: int, elapsed: float) -> str:
        text = f"{self.label}: {done}/{total} {self.unit}"
        if total:
            text += f" ({done / total:.0%}), {elapsed:.1f} s"
            if 0 < done < total:
                text += f", about {elapsed * (total - done) / done:.0f} s left"
        return text + self.suffix


@contextmanager
def progress_bar(label: str, unit: str = "rows", *, every_percent: float = 10.0) -> Iterator[ProgressCallback]:
    """A `(done, total)` callback for library functions' `progress=`: a rich bar with counts
    and ETA on a terminal, plain periodic lines (`PlainProgress`) otherwise. Both go to stderr,
    so stdout stays clean for --json output."""
    if not err_console.is_terminal:
        yield PlainProgress(label, unit, every_percent=every_percent)
        return
    columns = (
        TextColumn(f"[bold]{escape(label)}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(escape(unit)),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        task_id = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

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
