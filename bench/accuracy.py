"""Is the specialist the best rung? CLINC150 150-way, rung x rows-per-label, one table (issue 14).

    python bench/accuracy.py                                   # every rung, 20 rows per label and full
    python bench/accuracy.py --rungs lora --rows-per-label 20 --set train.objective=labels
    python bench/accuracy.py --rungs lora --rows-per-label full --max-train-minutes 50   # rerun to continue
    python bench/accuracy.py --table                           # re-print the table from the cache
    python bench/accuracy.py --throughput                      # training rows/s, each speed lever stacked, demo config
    python bench/accuracy.py --attention                       # eager vs SDPA training step by row length
    python bench/accuracy.py --smoke                           # tiny random model, 8 fixture intents, seconds

Data: the official splits (train 100 rows per label, in-scope test 4,500 rows), sampled per
label with a fixed seed for `--rows-per-label N`; validation is 5 rows per label of the
official validation split. Every (rung, rows, settings) result is cached as JSON under
`--out` (default runs/accuracy/results/), with the test probabilities beside it, so pieces run
separately, a finished piece is never recomputed, and `lora+minilm` combines cached
probabilities. LoRA runs live in `--out`/runs/; `--max-train-minutes` interrupts training
after that long (checkpointed): the next invocation resumes it. Columns: accuracy and
macro-F1 on the test rows, the worst category (name, accuracy), training minutes and the
median milliseconds per single message on this machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import bench_parser, clinc_dir, print_table, read_rows, tiny_model, work_dir, write_rows

BASE = "bundled:smollm2-135m"
LLM_RUNGS = ("lora",)
log = logging.getLogger("accuracy")


# ---------------------------------------------------------------- data


def subset(rows: list[dict[str, Any]], per_label: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """`per_label` rows of each label (seeded sample, file order kept); None: all rows."""
    if per_label is None:
        return rows
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_label.setdefault(r["label"], []).append(i)
    rng = random.Random(seed)
    keep = sorted(i for idx in by_label.values() for i in rng.sample(idx, min(per_label, len(idx))))
    return [rows[i] for i in keep]


def rows_arg(value: str) -> int | None:
    return None if value == "full" else int(value)


# ---------------------------------------------------------------- the cache


def settings_key(rung: str, rows: str, overrides: Sequence[str], base: str) -> str:
    """The cache file's name: rung, rows, and (for LLM rungs) the base and the overrides."""
    extra = sorted(overrides) if rung.split("+")[0] in LLM_RUNGS else []
    digest = hashlib.sha256(json.dumps([base if extra or rung in LLM_RUNGS else "", extra]).encode()).hexdigest()
    return f"{rung.replace('+', '_and_')}__{rows}__{digest[:10]}"


def cached(out: Path, key: str) -> dict[str, Any] | None:
    path = out / "results" / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save(out: Path, key: str, result: dict[str, Any], probs: list[list[float]]) -> None:
    import numpy as np

    (out / "results").mkdir(parents=True, exist_ok=True)
    np.save(out / "results" / f"{key}.npy", np.asarray(probs, dtype=np.float32))
    (out / "results" / f"{key}.json").write_text(json.dumps(result, indent=2))


def load_probs(out: Path, key: str) -> list[list[float]]:
    import numpy as np

    return np.load(out / "results" / f"{key}.npy").tolist()


# ---------------------------------------------------------------- rungs


def measure(predict: Callable[[Sequence[str]], list[list[float]]], texts: list[str], samples: int) -> tuple[Any, float]:
    """Probabilities for `texts` (batched) and the median ms of a single-message call."""
    probs = predict(texts)
    timings = []
    for text in texts[:: max(1, len(texts) // samples)][:samples]:
        t0 = time.perf_counter()
        predict([text])
        timings.append((time.perf_counter() - t0) * 1000)
    return probs, statistics.median(timings)


def lora_config(args: Any, data: Path, train_file: Path, run: Path, labels: list[str]) -> Any:
    from taskling.config import build_config, merge, parse_overrides

    raw: dict[str, Any] = {
        "task": {"name": "clinc150", "labels": labels},
        "data": {"train": [str(train_file)], "validation": [str(run.parent / "validation.jsonl")]},
        "model": {"base": args.base, "max_length": 96},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "train": {"patience": 2, "seed": 0},
        "run_dir": str(run),
    }
    if args.smoke:
        raw["model"] = {"base": args.base, "dtype": "float32", "max_length": 128}
        raw["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
        raw["train"] = {"max_steps": 3, "batch_size": 8, "learning_rate": 5e-3, "seed": 0, "threads": 1}
    return build_config(merge(raw, parse_overrides(args.set)), source="accuracy bench config")


def train_with_limit(config: Any, minutes: float | None) -> float:
    """Train (resuming a checkpoint); past `minutes`, stop as Ctrl-C would. Returns seconds spent."""
    from taskling.train.loop import TrainingInterrupted
    from taskling.train.sft import train

    started = time.perf_counter()

    def progress(step: int, total: int, info: dict[str, float]) -> None:
        if minutes is not None and time.perf_counter() - started > minutes * 60:
            os.kill(os.getpid(), signal.SIGINT)  # the loop checkpoints this step and stops

    try:
        train(config, resume=True, progress=progress)
    except TrainingInterrupted as err:
        log.warning("%s", err)
    return time.perf_counter() - started


def lora_rung(args: Any, data: Path, rows: str, labels: list[str], train_file: Path) -> tuple[Any, float, float]:
    from taskling.rundir import RunDir
    from taskling.serve.classifier import Classifier

    run = args.out / "runs" / settings_key("lora", rows, args.set, args.base) / "run"
    run.parent.mkdir(parents=True, exist_ok=True)
    write_rows(run.parent / "validation.jsonl", validation_rows(data))
    config = lora_config(args, data, train_file, run, labels)
    spent = run.parent / "train_seconds.json"  # summed over resumed invocations
    if RunDir(run).summary.is_file() and spent.is_file():  # finished: load it, never train it again
        total = json.loads(spent.read_text())
    else:
        seconds = train_with_limit(config, args.max_train_minutes)
        total = seconds + (json.loads(spent.read_text()) if spent.is_file() else 0.0)
        spent.write_text(json.dumps(total))
    if not RunDir(run).summary.is_file() or not RunDir(run).adapter.is_dir():
        raise SystemExit(f"lora ({rows} rows per label): training stopped at the time limit; rerun to continue")
    clf = Classifier.from_run(run, device=None)
    labels_order = list(clf.task.labels)

    def predict(texts: Sequence[str]) -> list[list[float]]:
        return [[p.probabilities[label] for label in labels_order] for p in clf.predict(list(texts))]

    return predict, total, 0.0


def sklearn_rung(kind: str, train_rows: list[dict[str, Any]], labels: list[str]) -> tuple[Any, float, float]:
    from taskling.data.load import Example
    from taskling.evaluate.ladder import minilm_rung, tfidf_rung

    examples = [Example(r["text"], r["label"]) for r in train_rows]
    predict, seconds, _ = (tfidf_rung if kind == "tfidf" else minilm_rung)(examples, labels)
    return predict, seconds, 0.0


def build_rung(args: Any, rung: str, rows: str, data: Path, labels: list[str]) -> tuple[Any, float]:
    """A single rung's predict function and training seconds (a finished LoRA run is loaded, not retrained)."""
    train_rows = subset(read_rows(data / "train.jsonl"), rows_arg(rows))
    train_file = write_rows(args.out / "data" / f"train-{rows}.jsonl", train_rows)
    log.info("%s: %d training rows", rung, len(train_rows))
    if rung == "lora":
        predict, seconds, _ = lora_rung(args, data, rows, labels, train_file)
    else:
        predict, seconds, _ = sklearn_rung(rung, train_rows, labels)
    return predict, seconds


def validation_rows(data: Path) -> list[dict[str, Any]]:
    """The held-out rows combined rungs fit their weights on (5 per label of the official validation split)."""
    return subset(read_rows(data / "validation.jsonl"), 5)


def validation_probs(args: Any, part: dict[str, Any], data: Path, labels: list[str]) -> Any:
    """A cached rung's probabilities on the validation rows, computed (and cached) when missing."""
    import numpy as np

    path = args.out / "results" / f"{part['key']}.val.npy"
    if not path.is_file():
        predict, _ = build_rung(args, part["rung"], part["rows_per_label"], data, labels)
        np.save(path, np.asarray(predict([r["text"] for r in validation_rows(data)]), dtype=np.float32))
    return np.load(path)


def combine_parts(args: Any, rung: str, rows: str, data: Path, labels: list[str]) -> tuple[Any, float, float]:
    """A combined rung's test probabilities: its parts pooled with weights fitted on the validation rows."""
    from taskling.evaluate.combine import fit_weights, pooled

    parts = [score_rung(args, part, rows, data, labels) for part in rung.split("+")]
    gold = [labels.index(r["label"]) for r in validation_rows(data)]
    weights = fit_weights([validation_probs(args, p, data, labels) for p in parts], gold)
    log.info("%s: weights %s fitted on %d validation rows", rung, weights, len(gold))
    probs = pooled([load_probs(args.out, p["key"]) for p in parts], weights).tolist()
    return probs, sum(p["train_seconds"] for p in parts), sum(p["ms_per_message"] for p in parts)


def score_rung(args: Any, rung: str, rows: str, data: Path, labels: list[str]) -> dict[str, Any]:
    """The rung's cached result, or train and score it now and cache it."""
    import numpy as np

    from taskling.evaluate.metrics import score

    key = settings_key(rung, rows, args.set, args.base)
    hit = cached(args.out, key)
    if hit is not None:
        return hit
    test = [r for r in read_rows(data / "test.jsonl") if r["label"] in set(labels)]
    texts = [r["text"] for r in test]
    if "+" in rung:
        probs, seconds, latency = combine_parts(args, rung, rows, data, labels)
    else:
        predict, seconds = build_rung(args, rung, rows, data, labels)
        probs, latency = measure(predict, texts, 3 if args.smoke else 20)
        (args.out / "results").mkdir(parents=True, exist_ok=True)
        val = predict([r["text"] for r in validation_rows(data)])
        np.save(args.out / "results" / f"{key}.val.npy", np.asarray(val, dtype=np.float32))
    predicted = [labels[max(range(len(labels)), key=row.__getitem__)] for row in probs]
    metrics = score([r["label"] for r in test], predicted, labels)
    result = {
        "key": key,
        "rung": rung,
        "rows_per_label": rows,
        "settings": sorted(args.set),
        "base": args.base,
        "test_rows": len(test),
        "accuracy": metrics.accuracy,
        "macro_f1": metrics.macro_f1,
        "worst_category": metrics.worst_category,
        "worst_category_accuracy": metrics.worst_category_accuracy,
        "train_seconds": seconds,
        "ms_per_message": latency,
    }
    save(args.out, key, result, probs)
    return result


def print_results(results: list[dict[str, Any]]) -> None:
    columns = ["rung", "rows/label", "settings", "accuracy", "macro-F1", "worst category", "train min", "ms/msg"]
    rows = [
        [
            r["rung"],
            r["rows_per_label"],
            " ".join(r["settings"]) or "-",
            f"{r['accuracy']:.2%}",
            f"{r['macro_f1']:.3f}",
            f"{r['worst_category']} ({r['worst_category_accuracy']:.0%})",
            f"{r['train_seconds'] / 60:.1f}",
            f"{r['ms_per_message']:.1f}",
        ]
        for r in results
    ]
    print_table("CLINC150 in-scope test: rung x rows per label", columns, rows)
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


# ---------------------------------------------------------------- prefix-once throughput


def throughput(args: Any) -> None:
    """Training rows/s and tokens/s of each speed lever, stacked one by one, side by side.

    The demo's config, model (its dtype) and rows. The first path is training as the issue
    found it (plain path, SDPA, LoRA dropout 0.05); each next one adds one lever: prefix-once,
    LoRA dropout 0, the null attention rule (eager here), bf16 autocast (`train.mixed_precision`
    null: on for a bf16 base; the defaults now, what `make demo` trains with), and
    `model.head: linear` (its own rows: the prompt only, no answer tokens).
    Each timed step is one micro-batch's forward and backward pass (the optimizer step, the
    same for all, is left out; no model changes between paths), and the paths alternate batch
    by batch (the same examples), so a busy machine slows all alike. The first round is warm-up.
    """

    from taskling.config import build_config, merge, parse_overrides
    from taskling.data.demo import prepare_demo
    from taskling.model.head import attach_head
    from taskling.model.loader import ChatFormat, load_tokenizer, resolve_base
    from taskling.train.loop import lora_model
    from taskling.train.loss import batches, collate
    from taskling.train.objective import Objective, ObjectiveLoss, with_mixed_precision
    from taskling.train.sft import prepare_data, tokenize
    from taskling.train.speed import load_training_base

    config, _ = prepare_demo(args.out / "throughput", data_dir=args.data_dir, base=args.base)
    config = build_config(merge(config.model_dump(mode="json"), parse_overrides(args.set)))  # e.g. train.batch_size=32
    path = resolve_base(config.model.base)
    fmt = ChatFormat(load_tokenizer(path), config.task, config.model.max_length)
    model_cfg = config.model.model_copy(update={"dtype": "float32"}) if args.smoke else config.model
    examples = prepare_data(config).train
    rows, head_rows = tokenize(examples, fmt), tokenize(examples, fmt, "linear")

    def build(head: bool = False, attention: str | None = None, dropout: float = 0.0) -> Any:
        base = load_training_base(model_cfg.model_copy(update={"attn_implementation": attention}), path, "cpu", rows)
        if head:
            attach_head(base, len(config.task.labels), [seq[0] for seq in fmt.label_sequences])
        return lora_model(base, config.lora.model_copy(update={"dropout": dropout}))

    size = config.train.batch_size or 8
    order = batches(rows, size, 0, 0)
    pad = fmt.tokenizer.pad_token_id
    picked = [collate([rows[i] for i in b], pad, "cpu") for b in order]
    picked_head = [collate([head_rows[i] for i in b], pad, "cpu") for b in order]
    filed, no_dropout, defaults = build(attention="sdpa", dropout=0.05), build(attention="sdpa"), build()
    kernel = defaults.get_base_model().config._attn_implementation
    mixed = with_mixed_precision(Objective(), config.train, defaults).mixed_precision  # null: on for a bf16 base
    now = {"shared_prefix": True, "mixed_precision": mixed}
    defaults_now, with_head = f"+ mixed precision {'bf16' if mixed else 'off'} (defaults now)", "+ model.head: linear"
    paths = {
        "plain (as filed: sdpa, lora.dropout 0.05)": (ObjectiveLoss(filed, Objective(shared_prefix=False)), picked),
        "+ prefix-once": (ObjectiveLoss(filed, Objective(shared_prefix=True)), picked),
        "+ lora.dropout 0": (ObjectiveLoss(no_dropout, Objective(shared_prefix=True)), picked),
        f"+ attention null -> {kernel}": (ObjectiveLoss(defaults, Objective(shared_prefix=True)), picked),
        defaults_now: (ObjectiveLoss(defaults, Objective(**now)), picked),
        with_head: (ObjectiveLoss(build(head=True), Objective("head", **now)), picked_head),
    }
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    losses: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, list[int]] = {name: [] for name in paths}
    steps = 3 if args.smoke else args.steps
    for step in range(steps + 1):
        for name, (objective, chosen) in paths.items():
            batch = chosen[step % len(chosen)]
            started = time.perf_counter()
            total, units = objective(**batch)
            (total / units).backward()
            losses[name].append(float(total.detach() / units))
            objective.model.zero_grad(set_to_none=True)  # no weight change: every path sees the same model
            if step:  # round 0 is warm-up
                seconds[name].append(time.perf_counter() - started)
                tokens[name].append(int(batch["attention_mask"].sum()))
    # Medians: on a shared machine a step now and then takes 5x longer, whichever path it hits.
    step_s = {name: statistics.median(times) for name, times in seconds.items()}
    first = next(iter(paths))
    table = [
        [
            name,
            steps,
            f"{size / step_s[name]:.2f}",
            f"{statistics.median(tokens[name]) / step_s[name]:.0f}",
            f"{step_s[first] / step_s[name]:.2f}x",
            f"{losses[name][-1]:.5f}",
        ]
        for name in paths
    ]
    columns = ["path", "steps", "rows/s (median step)", "tokens/s", "rows/s vs as filed", "last loss"]
    caption = f"{len(fmt.template.prefix_ids)} shared prompt tokens; each path adds one lever to the one above"
    title = f"training throughput, demo config, batch {size}, {next(filed.parameters()).dtype}"
    print_table(title, columns, table, caption=caption)
    print(f"defaults now vs as filed, training rows/s: {step_s[first] / step_s[defaults_now]:.2f}x")
    print(f"with the linear head vs as filed, training rows/s: {step_s[first] / step_s[with_head]:.2f}x")


def attention_by_length(args: Any) -> None:
    """Eager vs SDPA attention, LoRA forward + backward on the CPU, by row length (the null rule's threshold).

    Random token batches (right padding on all rows but the first), the demo's base in its
    dtype, LoRA dropout 0; the two kernels alternate step by step, the first step is warm-up.
    """
    import torch

    from taskling.config import LoraSettings, ModelConfig
    from taskling.model.loader import resolve_base
    from taskling.train.loop import lora_model
    from taskling.train.speed import EAGER_MAX_TOKENS, load_training_base

    path = resolve_base(args.base)
    model_cfg = ModelConfig(base=args.base, dtype="float32" if args.smoke else "auto")
    models = {
        kernel: lora_model(
            load_training_base(model_cfg.model_copy(update={"attn_implementation": kernel}), path, "cpu"),
            LoraSettings(dropout=0.0),
        )
        for kernel in ("sdpa", "eager")
    }
    shapes = [(16, 4), (32, 4)] if args.smoke else [(48, 8), (128, 8), (256, 8), (512, 4)]
    steps = 2 if args.smoke else 4
    table = []
    for width, rows in shapes:
        ids = torch.randint(3, min(1000, models["sdpa"].config.vocab_size), (rows, width))
        mask = torch.ones_like(ids)
        mask[1:, width * 3 // 4 :] = 0
        seconds: dict[str, list[float]] = {kernel: [] for kernel in models}
        for step in range(steps + 1):
            for kernel, model in models.items():
                started = time.perf_counter()
                out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
                out.logits.float().sum().backward()
                model.zero_grad(set_to_none=True)
                if step:
                    seconds[kernel].append(time.perf_counter() - started)
        sdpa, eager = (statistics.median(seconds[k]) for k in ("sdpa", "eager"))
        table.append([width, rows, f"{sdpa * 1000:.0f}", f"{eager * 1000:.0f}", f"{sdpa / eager:.2f}x"])
    columns = ["tokens per row", "rows", "sdpa ms/step", "eager ms/step", "eager speed-up"]
    caption = f"the null rule trains with eager on a CPU up to {EAGER_MAX_TOKENS} tokens per row"
    print_table("attention kernel by row length, LoRA forward + backward, CPU", columns, table, caption=caption)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--data-dir", type=Path, default=None, help="CLINC150 folder (default: ../shared/...)")
    parser.add_argument("--rungs", default="tfidf,minilm,lora,lora+minilm")
    parser.add_argument("--rows-per-label", default="20,full", help="comma-separated: numbers or 'full'")
    parser.add_argument("--set", action="append", default=[], help="a config override for the lora rung")
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--max-train-minutes", type=float, default=None)
    parser.add_argument("--table", action="store_true", help="print every cached result and stop")
    parser.add_argument("--throughput", action="store_true", help="training rows/s, each speed lever stacked")
    parser.add_argument("--steps", type=int, default=20, help="training steps per path for --throughput")
    parser.add_argument("--attention", action="store_true", help="eager vs SDPA training step time by row length")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    if args.smoke:
        import torch

        torch.set_num_threads(1)
        work = work_dir("accuracy")
        args.out, args.data_dir = work, clinc_dir(None, smoke=True)
        args.base, args.rungs, args.rows_per_label = str(tiny_model(work / "tiny")), "tfidf,lora,lora+tfidf", "5,full"
    if args.table:
        results = [json.loads(p.read_text()) for p in sorted((args.out / "results").glob("*.json"))]
        print_results(results)
        return
    if args.attention or args.smoke:
        attention_by_length(args)
        if not args.smoke:
            return
    if args.throughput or args.smoke:
        throughput(args)
        if not args.smoke:
            return
    data = clinc_dir(args.data_dir, smoke=False) if not args.smoke else args.data_dir
    labels = [x.strip() for x in (data / "LABELS.txt").read_text().splitlines() if x.strip()]
    results = [
        score_rung(args, rung, rows, data, labels)
        for rows in args.rows_per_label.split(",")
        for rung in args.rungs.split(",")
        if rung
    ]
    print_results(results)


if __name__ == "__main__":
    main()
