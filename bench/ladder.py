"""The right-size ladder on a CLINC150 subset, in one command.

    python bench/ladder.py                      # 10 intents, 40 train rows each, 30 gold rows each
    python bench/ladder.py --intents 20 --run-dir runs/demo   # reuse `taskling demo`'s finished run
    python bench/ladder.py --smoke              # tiny random model, 8 fixture intents, no MiniLM rung

Writes the subset (the demo's recipe: intents spread over the alphabet, gold from the
official test split) into RUN_DIR/source/, trains the LoRA rung there unless RUN_DIR already
holds a finished run, runs every rung on the same gold rows into RUN_DIR/ladder/, prints the
table and writes RUN_DIR/report.html with the ladder in it. On a shared 2-core CPU the LoRA
training (SmolLM2-135M, 2 epochs over 400 rows) dominates; everything else takes minutes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from common import bench_parser, clinc_dir, tiny_model, work_dir
from taskling.rundir import RunDir


def markdown_table(result: Any) -> str:
    """The ladder as a Markdown table, for notes and issues."""
    lines = [
        f"{result.gold_rows} gold rows, {result.train_rows} training rows; bar: {result.bar}",
        "",
        "| rung | accuracy | macro-F1 | worst category | latency ms | msg/s | memory MB | train s | clears |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rungs:
        clears = "-" if r.clears is None else ("yes" if r.clears else f"no ({r.why})")
        lines.append(
            f"| {r.name} | {r.accuracy:.2%} | {r.macro_f1:.3f} | {r.worst_category} ({r.worst_category_accuracy:.0%}) "
            f"| {r.latency_ms:.1f} | {r.messages_per_second:.1f} | {r.memory_mb:.1f} | {r.train_seconds:.0f} "
            f"| {clears} |"
        )
    lines.append(f"\nsmallest that clears the bar: {result.smallest}")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/ladder-clinc10"))
    parser.add_argument("--data-dir", type=Path, default=None, help="CLINC150 folder (default: ../shared/...)")
    parser.add_argument("--intents", type=int, default=10)
    parser.add_argument("--train-per-intent", type=int, default=40)
    parser.add_argument("--gold-per-intent", type=int, default=30)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--rungs", default="tfidf,minilm,zero-shot,few-shot,lora")
    parser.add_argument("--min-accuracy", type=float, default=0.90)
    parser.add_argument("--min-category-accuracy", type=float, default=0.70)
    args = parser.parse_args()
    base = "bundled:smollm2-135m"
    if args.smoke:
        work = work_dir("ladder")
        args.run_dir, args.data_dir, base = work / "run", clinc_dir(None, smoke=True), str(tiny_model(work / "tiny"))
        args.intents, args.train_per_intent, args.gold_per_intent, args.epochs = 8, 20, 10, 1.0
        args.rungs = "tfidf,zero-shot,few-shot,lora"
        torch.set_num_threads(1)  # tiny model: a second thread only adds overhead

    from taskling.cli import render_ladder
    from taskling.data.demo import prepare_demo
    from taskling.evaluate.ladder import Bar, run_ladder
    from taskling.evaluate.metrics import evaluate
    from taskling.evaluate.report import write_report

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    config, gold = prepare_demo(
        args.run_dir,
        data_dir=args.data_dir,
        intents=args.intents,
        train_per_intent=args.train_per_intent,
        gold_per_intent=args.gold_per_intent,
        epochs=args.epochs,
        base=base,
    )
    bar = Bar(min_accuracy=args.min_accuracy, min_category_accuracy=args.min_category_accuracy)
    result = run_ladder(
        config,
        gold,
        args.run_dir / "ladder",
        rungs=[r for r in args.rungs.split(",") if r],
        lora_run=args.run_dir,
        shots=args.shots,
        bar=bar,
        latency_samples=3 if args.smoke else 20,
    )
    render_ladder(result)
    print(markdown_table(result))
    run = RunDir(args.run_dir)
    if run.adapter.is_dir():
        lora = RunDir(args.run_dir / "ladder" / "lora")
        if not run.predictions.is_file():
            if lora.predictions.is_file():  # the lora rung already scored this run on gold
                shutil.copyfile(lora.predictions, run.predictions)
                shutil.copyfile(lora.metrics, run.metrics)
            else:
                evaluate(args.run_dir, gold)
        # No teacher labels for CLINC150 here: the cheapest rung stands in as the baseline bars.
        cheapest = RunDir(args.run_dir / "ladder" / "tfidf")
        report = write_report(
            args.run_dir,
            ladder=args.run_dir / "ladder" / "ladder.json",
            baseline=cheapest.root if cheapest.predictions.is_file() else None,
        )
        print(f"report: {report}")


if __name__ == "__main__":
    main()
