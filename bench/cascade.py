"""Each single stage vs the cascade, side by side, in one run (issue 15).

    python bench/cascade.py --run runs/clinc150          # a finished CLINC150 150-way specialist
    python bench/cascade.py --run runs/clinc150 --quantize int8   # the lora stage in dynamic int8 (CPU)
    python bench/cascade.py --run runs/clinc150 --calibrate ../shared/data/clinc150/validation.jsonl
    python bench/cascade.py --smoke                      # tiny random model, 8 fixture intents, seconds

Copies the run (without checkpoints) into a work folder, builds `tfidf,minilm,lora` there
(`taskling.evaluate.cascade.build_cascade`, calibrated on the run's validation rows), then on
the CLINC150 test set (the gold set) scores tfidf, minilm, lora and the cascade: accuracy,
macro-F1, the worst category, p50/p99 ms at batch 1, messages/s batched, the share of
messages reaching the LLM, and the gate's verdict (non-inferiority) of the cascade against
the specialist alone on the same gold rows. Then a second cascade ending in `unknown`,
calibrated with the `val` rows of oos.jsonl, on test + the `test` rows of oos.jsonl:
in-scope accuracy of the answered, in-scope coverage and OOS recall.

With `--quantize int8` the cascade's lora stage is the int8 classifier, calibrated as such;
the table adds it as a single stage (`lora int8`), and the gate still compares the cascade
with the specialist as trained (`lora`, unquantized).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from common import bench_parser, clinc_dir, print_table, read_rows, tiny_run, work_dir, write_rows
from taskling.evaluate.baseline import Scored
from taskling.evaluate.cascade import build_cascade
from taskling.evaluate.gate import gate
from taskling.evaluate.metrics import score
from taskling.serve.abstain import oos_report
from taskling.serve.cascade import Cascade
from taskling.serve.classifier import Classifier
from taskling.serve.prediction import UNKNOWN
from taskling.serve.rungs import Rung

LLM_STAGES = {"lora", "teacher", UNKNOWN}


def copy_run(run: Path, out: Path) -> Path:
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoint", "tracking", "exports", "evals", "cascade*"))
    return out


def measure(
    name: str, model: Any, texts: list[str], gold: list[str], labels: list[str], samples: int
) -> dict[str, Any]:
    """Accuracy and speed of one system on the gold rows."""
    model.predict(texts[:4])  # warm-up
    started = time.perf_counter()
    preds = model.predict(texts, batch_size=32)
    rate = len(texts) / (time.perf_counter() - started)
    single = []
    for text in texts[:: max(1, len(texts) // samples)][:samples]:
        t0 = time.perf_counter()
        model.predict([text], batch_size=1)
        single.append((time.perf_counter() - t0) * 1000)
    m = score(gold, [p.label for p in preds], labels)
    reached = sum(p.stage in LLM_STAGES for p in preds) / len(preds) if name == "cascade" else float("lora" in name)
    return {
        "name": name,
        "preds": preds,
        "accuracy": m.accuracy,
        "macro_f1": m.macro_f1,
        "worst": f"{m.worst_category} ({m.worst_category_accuracy:.0%})",
        "p50": statistics.median(single),
        "p99": sorted(single)[min(len(single) - 1, int(0.99 * len(single)))],
        "rate": rate,
        "llm_share": reached,
    }


def speed(r: dict[str, Any]) -> list[str]:
    return [f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['rate']:.1f}"]


def single_stages(run: Path, stages: list[str], quantize: str | None) -> dict[str, Any]:
    models: dict[str, Any] = {s: Rung.load(run / "cascade" / f"{s}.joblib") for s in stages if s != "lora"}
    models["lora"] = Classifier.from_run(run, cascade=False)
    if quantize:
        models[f"lora {quantize}"] = Classifier.from_run(run, cascade=False, quantize=quantize)
    return models


def side_by_side(
    run: Path,
    data: Path,
    stages: list[str],
    max_loss: float,
    samples: int,
    quantize: str | None,
    calibrate: Path | None,
) -> None:
    stage = Classifier.from_run(run, cascade=False, quantize=quantize) if quantize else None
    spec = build_cascade(
        run, stages, max_loss=max_loss, latency_samples=samples, lora=stage, calibration_file=calibrate
    )
    models = single_stages(run, stages, quantize)
    cascade = Cascade.from_run(run, lora=models[f"lora {quantize}" if quantize else "lora"])
    test = read_rows(data / "test.jsonl")
    texts, gold = [r["text"] for r in test], [r["label"] for r in test]
    labels = list(cascade.task.labels)
    singles = [*stages, f"lora {quantize}"] if quantize else stages
    results = [measure(name, models[name], texts, gold, labels, samples) for name in singles]
    results.append(measure("cascade", cascade, texts, gold, labels, samples))
    verdict = gate(
        Scored("cascade", labels, texts, gold, [p.label for p in results[-1]["preds"]]),
        Scored("lora", labels, texts, gold, [p.label for p in results[stages.index("lora")]["preds"]]),
    )
    rows = [
        [r["name"], f"{r['accuracy']:.2%}", f"{r['macro_f1']:.3f}", r["worst"], *speed(r), f"{r['llm_share']:.1%}"]
        for r in results
    ]
    shares = {s: sum(p.stage == s for p in results[-1]["preds"]) / len(texts) for s in cascade.stage_names}
    print_table(
        f"cascade vs single stages on {len(texts)} gold rows ({len(labels)} labels)",
        ["system", "accuracy", "macro-F1", "worst category", "p50 ms", "p99 ms", "msg/s batched", "reach LLM"],
        rows,
        caption=f"chosen thresholds {spec.curve[spec.chosen or 0]['thresholds']}; answered per stage "
        + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()),
    )
    print(f"gate (cascade vs lora, same gold rows): {'passed' if verdict.passed else 'failed'}")
    for check in verdict.checks:
        print(f"  {check.name}: {'ok' if check.passed else 'FAILED'} {check.detail}")


def with_unknown(
    run: Path,
    data: Path,
    stages: list[str],
    max_loss: float,
    samples: int,
    work: Path,
    quantize: str | None,
    calibrate: Path | None,
) -> None:
    oos = read_rows(data / "oos.jsonl")
    val_oos = write_rows(work / "oos_val.jsonl", [r for r in oos if r.get("split") == "val"])
    stage = Classifier.from_run(run, cascade=False, quantize=quantize) if quantize else None
    spec = build_cascade(
        run,
        [*stages, UNKNOWN],
        max_loss=max_loss,
        oos_file=val_oos,
        latency_samples=samples,
        lora=stage,
        calibration_file=calibrate,
    )
    cascade = Classifier.from_run(run, quantize=quantize)
    rows = read_rows(data / "test.jsonl") + [r for r in oos if r.get("split") == "test"]
    preds = cascade.predict([r["text"] for r in rows], batch_size=32)
    report = oos_report(preds, [r["label"] for r in rows], spec.labels)
    answered = [(p, r) for p, r in zip(preds, rows, strict=True) if p.label != UNKNOWN and r["label"] in spec.labels]
    answered_acc = sum(p.label == r["label"] for p, r in answered) / max(len(answered), 1)
    print_table(
        f"cascade {' -> '.join(cascade.stage_names)} on test + oos ({report['in_scope_rows']} in scope, "
        f"{report['oos_rows']} out of scope)",
        ["in-scope accuracy of answered", "in-scope coverage", "in-scope accuracy (abstain = wrong)", "OOS recall"],
        [
            [
                f"{answered_acc:.2%}",
                f"{report['in_scope_coverage']:.2%}",
                f"{report['in_scope_accuracy']:.2%}",
                f"{report['oos_recall']:.2%}",
            ]
        ],
    )


def held_out(path: Path, run: Path, work: Path) -> Path:
    """`path`'s rows minus the run's training rows (CLINC150's splits share a few texts), counted."""
    trained = {r["text"] for r in read_rows(run / "data" / "train.jsonl")}
    rows = read_rows(path)
    kept = [r for r in rows if r["text"] not in trained]
    print(f"calibration rows from {path}: {len(kept)} of {len(rows)} ({len(rows) - len(kept)} training rows left out)")
    return write_rows(work / "calibrate.jsonl", kept)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--run", type=Path, help="a finished CLINC150 150-way run")
    parser.add_argument("--data-dir", type=Path, default=None, help="CLINC150 folder (default: ../shared/...)")
    parser.add_argument("--stages", default="tfidf,minilm,lora")
    parser.add_argument("--max-loss", type=float, default=0.005)
    parser.add_argument("--samples", type=int, default=100, help="batch-1 latency samples per system")
    parser.add_argument("--quantize", choices=["int8", "int8-torchao"], help="the lora stage in int8 (CPU)")
    parser.add_argument("--calibrate", type=Path, help="more labelled rows to calibrate on (never trained on)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = work_dir("cascade")
    if args.smoke:
        source, stages, samples = tiny_run(), ["tfidf", "lora"], 5
    elif args.run is None:
        parser.error("--run RUN_DIR (a finished CLINC150 150-way run) or --smoke")
    else:
        source, stages, samples = args.run, args.stages.split(","), args.samples
    data = clinc_dir(args.data_dir, args.smoke)
    calibrate = held_out(args.calibrate, source, work) if args.calibrate else None
    side_by_side(copy_run(source, work / "run"), data, stages, args.max_loss, samples, args.quantize, calibrate)
    unknown_run = copy_run(source, work / "run-unknown")
    with_unknown(unknown_run, data, stages, args.max_loss, samples, work, args.quantize, calibrate)


if __name__ == "__main__":
    main()
