"""Fixed-format generation on two tasks: the untrained base, a few-shot prompt, a trained LoRA.

Tasks (bench/generate_tasks.py, a seeded generator shipped in the repo):

- transactions: a bank-transaction row -> one sentence in the house style (a regex the
  constrained decoder keeps); trained on teacher logs where a quarter of the answers are
  paraphrases that drift from the house style (dropped as bad rows), scored on house-style
  references;
- sql: questions about a 4-table shop -> one SQLite query, executed read-only with a timeout
  on bench/data/shop.sql built into a SQLite file.

Each system answers the same gold rows with the output constraint on and off: format
validity, exact and normalised match, ROUGE-L, chrF, MiniLM similarity and (SQL) execution
accuracy: the same result rows as the gold query. The last line counts the SQL queries that
wrote to the database (its sha256 before and after) and the ones that hung (ran past their
timeout without being stopped): both must be 0.

    python bench/generate.py                    # SmolLM2-135M on CPU, ~3 min of training per task
    python bench/generate.py --train-minutes 1 --gold-rows 30
    python bench/generate.py --smoke            # the tiny random model, seconds
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import common
import generate_tasks
from taskling.evaluate.generation import evaluate_generation
from taskling.generate.generator import Generator, generate_base
from taskling.generate.spec import GenerationConfig, load_generation_config
from taskling.generate.sql import SqlDatabase
from taskling.train.generation import train_generation

log = logging.getLogger("bench.generate")
COLUMNS = ("task", "system", "constr.", "valid", "exact", "norm.", "ROUGE-L", "chrF", "sim.", "exec.", "ms/row")
SHOTS = 3


def parse_args() -> Any:
    p = common.bench_parser(__doc__)
    p.add_argument("--tasks", nargs="+", default=list(generate_tasks.TASKS), choices=generate_tasks.TASKS)
    p.add_argument("--train-minutes", type=float, default=3.0, help="training budget per task (default 3)")
    p.add_argument("--gold-rows", type=int, default=60, help="gold rows per task (default 60)")
    p.add_argument("--no-similarity", action="store_true", help="skip the MiniLM similarity (faster)")
    p.add_argument("--out", type=Path, help="where the task files and runs go (default: a new temporary folder)")
    return p.parse_args()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def overrides(args: Any, model: str | None) -> list[str]:
    if model is None:  # the bundled SmolLM2-135M
        return ["model.max_length=320", "train.batch_size=8", "train.learning_rate=5e-4", "train.eval_every=25"]
    return [f"model.base={model}", "model.dtype=float32", "model.max_length=448", "lora.r=4", "lora.alpha=8",
            "train.batch_size=8", "train.learning_rate=5e-3", "train.threads=1"]  # fmt: skip


def few_shot(config: GenerationConfig) -> list[tuple[str, str]]:
    """The first validation row of each of `SHOTS` slices: house-style references, not teacher text."""
    shots: dict[str, tuple[str, str]] = {}
    for line in config.data.validation[0].read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        shots.setdefault(row["slice"], (row["instruction"], row["response"]))
    return list(shots.values())[:SHOTS]


def seconds_per_step(config: GenerationConfig, root: Path) -> float:
    """A 4-step probe run, timed from its first step to its last (model loading not counted)."""
    marks: list[float] = []
    probe = config.model_copy(
        update={"run_dir": root / "probe", "train": config.train.model_copy(update={"max_steps": 4, "eval_every": 0})}
    )
    train_generation(probe, progress=lambda step, total, info: marks.append(time.perf_counter()))
    return (marks[-1] - marks[0]) / max(len(marks) - 1, 1)


def train_within(config: GenerationConfig, minutes: float, root: Path, smoke: bool) -> tuple[GenerationConfig, int]:
    steps = 8 if smoke else max(10, int(minutes * 60 / seconds_per_step(config, root)))
    trained = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": steps})})
    train_generation(trained)
    return trained, steps


def score(gen: Generator, gold: Path, out: Path, args: Any) -> dict[str, Any]:
    result = evaluate_generation(out, gold, out_dir=out, generator=gen, embed=not args.no_similarity, batch_size=8)
    return result.metrics


def table_row(task: str, system: str, constrained: bool, metrics: dict[str, Any]) -> list[str]:
    means = metrics["means"]

    def pct(key: str) -> str:
        return f"{100 * means[key]:.1f}%" if key in means else "-"

    sim = f"{means['similarity']:.3f}" if "similarity" in means else "-"
    ms = 1000 / metrics["messages_per_second"]
    return [task, system, "on" if constrained else "off", pct("valid"), pct("exact"), pct("normalised"),
            f"{means['rouge_l']:.3f}", f"{means['chrf']:.3f}", sim, pct("execution"), f"{ms:.0f}"]  # fmt: skip


def run_task(
    task: str, args: Any, root: Path, model: str | None, sql_totals: dict[str, int], captions: list[str]
) -> list[list[str]]:
    gold_rows = 6 if args.smoke else args.gold_rows
    path = generate_tasks.write_task(task, root / task, n=60 if args.smoke else 600, n_gold=gold_rows)
    config = load_generation_config(path, overrides(args, model))
    gold = root / task / "gold.jsonl"
    database = config.task.sql.database if config.task.sql else None
    before = sha256(database) if database else ""
    shots = few_shot(config)
    trained, steps = train_within(config, args.train_minutes, root / task, args.smoke)
    log.info("%s: trained %d steps", task, steps)
    captions.append(f"{task}: LoRA trained {steps} steps")
    systems: list[tuple[str, Generator]] = [
        ("base", generate_base(config)),
        (f"{len(shots)}-shot", generate_base(config, examples=shots)),
        ("LoRA", Generator.from_run(trained.run_dir)),
    ]
    rows = []
    for name, gen in systems:
        for constrained in (True, False):
            gen.constrained = constrained
            out = root / task / "eval" / f"{name}-{'on' if constrained else 'off'}"
            rows.append(table_row(task, name, constrained, score(gen, gold, out, args)))
        if isinstance(gen.database, SqlDatabase):
            stats = gen.database.stats
            sql_totals["queries"] += stats.queries
            sql_totals["refused"] += stats.refused
            sql_totals["timed out"] += stats.timed_out
            sql_totals["hung"] += stats.hung
    if database:
        sql_totals["wrote"] += int(sha256(database) != before)
    return rows


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.out or common.work_dir("generate")
    model = str(common.tiny_model(root / "tiny")) if args.smoke else None
    if args.smoke:
        args.no_similarity = True  # the MiniLM load is most of a smoke run's time
    sql_totals = {"queries": 0, "refused": 0, "timed out": 0, "hung": 0, "wrote": 0}
    started = time.perf_counter()
    captions: list[str] = []
    rows = [row for task in args.tasks for row in run_task(task, args, root, model, sql_totals, captions)]
    common.print_table(
        f"fixed-format generation on {'the tiny random model' if args.smoke else 'SmolLM2-135M, CPU'}",
        COLUMNS,
        rows,
        caption=f"{6 if args.smoke else args.gold_rows} gold rows per task; {'; '.join(captions)}; "
        f"{time.perf_counter() - started:.0f} s in all; files in {root}",
    )
    print(
        f"SQL: {sql_totals['queries']} queries run, {sql_totals['refused']} refused (a write, DDL, ATTACH or PRAGMA), "
        f"{sql_totals['timed out']} stopped at the timeout"
    )
    print(f"queries that wrote: {sql_totals['wrote']}, hung: {sql_totals['hung']}")


if __name__ == "__main__":
    main()
