"""CPU benchmark: training tokens/s, classify latency and throughput, and the stock generate path.

    python bench/cpu.py                  # runs/demo if trained, else a short training run first
    python bench/cpu.py --levers         # also: dtype, attention kernel, prefix cache, batch size, int8, compile
    python bench/cpu.py --run RUN_DIR --threads 2 --repeats 50
    python bench/cpu.py --heads          # label trie vs linear label head, all 150 CLINC150 intents
    python bench/cpu.py --smoke          # a fresh tiny random run, 3 repeats: checks the script runs

Everything runs on the bundled SmolLM2-135M with `torch.set_num_threads(--threads)`, after
warm-up, repeated; latency is for one ~30-word message at batch 1, throughput for CLINC150
test messages at batch 32. The stock path is transformers + peft as a user would write it:
the unmerged adapter, `generate` greedy with max_new_tokens = the longest label answer.
The load average is printed: other processes on the machine slow every number here.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as taskling.serve.classifier does; see there why

import torch
from rich.console import Console
from rich.table import Table

from common import bench_parser, clinc_dir, clinc_texts, read_rows, tiny_model, tiny_run, work_dir
from taskling.config import build_config
from taskling.data.demo import INSTRUCTION, find_clinc, pick_intents
from taskling.model.loader import base_path, load_model, pick_dtype
from taskling.rundir import RunDir, read_manifest
from taskling.serve.classifier import Classifier, run_format

MESSAGE = (
    "hey so I was looking at my checking account this morning and I want to know what the current "
    "balance is before I pay the rent and the phone bill"
)  # 30 words
console = Console(width=120)


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds of each repeat, after warm-up.

    CPU time barely depends on what else runs on the machine (OpenMP waiters sleep), so it
    bounds what an idle box would do: wall >= CPU / threads.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return wall, cpu


def pct(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def find_or_train_run(explicit: str | None) -> tuple[Path, float | None]:
    """The run to measure and its training tokens/s (None when unknown)."""
    candidates = [Path(explicit)] if explicit else [Path("runs/demo"), Path("runs/bench-cpu")]
    for run in candidates:
        if RunDir(run).is_finished():
            summary = RunDir(run).summary
            rate = json.loads(summary.read_text()).get("tokens_per_second") if summary.is_file() else None
            return run, rate
    if explicit:
        raise SystemExit(f"{explicit} is not a finished run")
    from taskling.train.sft import train

    console.print("[yellow]no trained run found: training a short adapter into runs/bench-cpu[/]")
    clinc = find_clinc()
    labels = pick_intents(clinc, 20)
    rows = [json.loads(line) for line in (clinc / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["label"] in labels]
    picked: list[dict[str, str]] = []
    for label in labels:
        picked += [r for r in rows if r["label"] == label][:12]
    src = Path("runs/bench-cpu/source")
    src.mkdir(parents=True, exist_ok=True)
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    config = build_config(
        {
            "task": {"name": "clinc20", "labels": labels, "instruction": INSTRUCTION},
            "data": {"train": [str(src / "train.jsonl")], "validation_fraction": 0.1},
            "model": {"base": "bundled:smollm2-135m", "max_length": 96},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "train": {"epochs": 1, "max_steps": 20, "batch_size": 8, "learning_rate": 3e-4, "threads": 2},
            "run_dir": "runs/bench-cpu",
        }
    )
    result = train(config)
    return result.run_dir, result.tokens_per_second


def gold_texts(run: Path, n: int, smoke: bool = False) -> list[str]:
    return clinc_texts(clinc_dir(None, smoke), n, read_manifest(run)["task"]["labels"])


def measure_classifier(clf: Classifier, texts: list[str], repeats: int, batch: int = 32) -> dict[str, float]:
    return summarize(
        timed(lambda: clf.predict([MESSAGE]), warmup=5, repeats=repeats),
        timed(lambda: clf.predict(texts, batch_size=batch), warmup=1, repeats=2),
        len(texts),
    )


def summarize(lat: tuple[list[float], list[float]], thr: tuple[list[float], list[float]], n: int) -> dict[str, float]:
    return {
        "p50": pct(lat[0], 0.5) * 1000,
        "p95": pct(lat[0], 0.95) * 1000,
        "mps": n / min(thr[0]),
        "cpu_ms": pct(lat[1], 0.5) * 1000,
        "cpu_mps": n / min(thr[1]),
    }


def stock_generate(run: Path, dtype: torch.dtype) -> tuple[Callable[[list[str]], list[str]], Any]:
    """transformers + peft as commonly written: unmerged adapter, greedy generate."""
    from peft import PeftModel

    manifest = read_manifest(run)
    fmt = run_format(run, manifest)
    model = PeftModel.from_pretrained(load_model(base_path(manifest), dtype), str(RunDir(run).adapter)).eval()
    tok = fmt.tokenizer
    new_tokens = fmt.max_answer_length

    @torch.inference_mode()
    def generate(texts: list[str]) -> list[str]:
        prompts = [fmt.prompt_ids(t) for t in texts]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        return list(tok.batch_decode(out[:, width:], skip_special_tokens=True))

    return generate, fmt


def measure_stock(run: Path, dtype: torch.dtype, texts: list[str], repeats: int) -> dict[str, float]:
    generate, _ = stock_generate(run, dtype)
    lat = timed(lambda: generate([MESSAGE]), warmup=2, repeats=max(repeats // 3, 5))
    batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]
    thr = timed(lambda: [generate(b) for b in batches], warmup=0, repeats=1)
    return summarize(lat, thr, len(texts))


def classifier(run: Path, dtype: str, attn: str = "sdpa", prefix: bool = True) -> Classifier:
    clf = Classifier.from_run(run, dtype=dtype, device="cpu", prefix_cache=prefix)
    if attn != "sdpa":
        clf.model.set_attn_implementation(attn)
    return clf


def levers(run: Path, texts: list[str], repeats: int, with_compile: bool) -> None:
    table = Table(title="levers (classify; batch 1 latency on the 30-word message, throughput on the gold texts)")
    for col in ("setting", "p50 ms", "p95 ms", "messages/s", "CPU ms, batch 1", "messages/CPU-s"):
        table.add_column(col, justify="right")

    def add(name: str, r: dict[str, float]) -> None:
        table.add_row(
            name, f"{r['p50']:.1f}", f"{r['p95']:.1f}", f"{r['mps']:.1f}", f"{r['cpu_ms']:.1f}", f"{r['cpu_mps']:.1f}"
        )
        console.print(f"  {name}: p50 {r['p50']:.1f} ms, {r['mps']:.1f} msg/s")

    # Levers vary one thing from the default: the dtype `auto` picks on this CPU (bf16 only with native support).
    base = str(pick_dtype("auto")).removeprefix("torch.")
    for dtype in (base, "float32" if base == "bfloat16" else "bfloat16"):
        add(f"{dtype}, sdpa, prefix cache, batch 32", measure_classifier(classifier(run, dtype), texts, repeats))
    add(f"{base}, eager attention", measure_classifier(classifier(run, base, "eager"), texts, repeats))
    add(f"{base}, no prefix cache", measure_classifier(classifier(run, base, prefix=False), texts, repeats))
    clf = classifier(run, base)
    threads = torch.get_num_threads()
    for n in sorted({1, 2} - {threads}):
        torch.set_num_threads(n)
        add(f"{base}, {n} torch thread(s)", measure_classifier(clf, texts, repeats))
    torch.set_num_threads(threads)
    for batch in (8, 16, 64):
        add(f"{base}, batch {batch}", measure_classifier(clf, texts, max(repeats // 3, 5), batch=batch))
    # Opt-in int8 (from float32 weights) changes probabilities: also say how often the label changes.
    reference = clf.predict(texts)
    for mode, name in (("int8", "torch.ao quantize_dynamic"), ("int8-torchao", "torchao quantize_")):
        int8 = Classifier.from_run(run, device="cpu", quantize=mode)
        add(f"{mode}: {name} (opt-in --quantize {mode})", measure_classifier(int8, texts, repeats))
        preds = int8.predict(texts)
        same = sum(a.label == b.label for a, b in zip(reference, preds, strict=True))
        moved = max(abs(a.probability - b.probabilities[a.label]) for a, b in zip(reference, preds, strict=True))
        console.print(
            f"  {mode} agrees with {base} on {same}/{len(texts)} labels; top probability moved by at most "
            f"{moved:.3f} (taskling eval --quantize {mode})"
        )
        del int8
    if with_compile:
        clf._decoder = torch.compile(clf._decoder, dynamic=True)
        add(f"{base}, torch.compile(dynamic)", measure_classifier(clf, texts, repeats))
    table.caption = f"CPU capability {torch.backends.cpu.get_cpu_capability()}; default dtype here: {base}"
    console.print(table)


def heads(base: str, texts: list[str], labels: list[str], repeats: int) -> None:
    """Scoring cost of `model.head: labels` (the label trie) vs `linear` on one base, side by side.

    Speed does not depend on weight values, so both score with the untrained base (and a
    head initialised from the LM head, as training starts it); the label set is what differs
    in cost: the trie's nodes ride along behind every prompt, the head reads one position.
    """
    from taskling.model.head import attach_head
    from taskling.model.loader import ChatFormat, load_tokenizer, resolve_base
    from taskling.task import Task

    path = resolve_base(base)
    fmt = ChatFormat(load_tokenizer(path), Task(labels=tuple(labels), instruction=INSTRUCTION), 96)
    model = load_model(path, pick_dtype("auto"), "cpu")
    trie = Classifier(model, fmt, device="cpu")
    attach_head(model, len(labels), [seq[0] for seq in fmt.label_sequences])
    head = Classifier(model, fmt, device="cpu")
    prompt = statistics.median(len(fmt.prompt_ids(t)) - trie.prefix_length for t in texts)
    table = Table(title=f"specialist scoring cost, {len(labels)} labels, {base}, {torch.get_num_threads()} threads")
    for col in ("model.head", "tokens per row (uncached prompt + trie nodes)", "p50 ms", "p95 ms", "messages/s"):
        table.add_column(col, justify="right")
    results = {}
    for name, clf in (("labels (label trie)", trie), ("linear", head)):
        r = results[name] = measure_classifier(clf, texts, repeats)
        tokens = f"{prompt:.0f} + {len(clf.trie.inputs)}"
        table.add_row(name, tokens, f"{r['p50']:.1f}", f"{r['p95']:.1f}", f"{r['mps']:.1f}")
    ratio = results["linear"]["mps"] / results["labels (label trie)"]["mps"]
    table.caption = f"linear / labels, batched messages/s: {ratio:.2f}x; load average {os.getloadavg()[0]:.1f}"
    console.print(table)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--run", help="a trained run (default: runs/demo, else a short training run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--texts", type=int, default=128, help="messages for the throughput runs")
    parser.add_argument("--levers", action="store_true", help="also measure dtype, attention, cache, batch")
    parser.add_argument("--compile", action="store_true", help="with --levers: also torch.compile")
    parser.add_argument("--heads", action="store_true", help="only: label trie vs linear head, 150 intents")
    parser.add_argument("--base", default="bundled:smollm2-135m", help="the base model for --heads")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.texts = 3, 16
    torch.set_num_threads(args.threads)
    if args.heads:
        data = clinc_dir(None, args.smoke)
        labels = sorted({r["label"] for r in read_rows(data / "train.jsonl")})
        base = str(tiny_model(work_dir("cpu-heads") / "tiny-llama")) if args.smoke else args.base
        heads(base, clinc_texts(data, args.texts), labels, args.repeats)
        return

    if args.smoke and not args.run:
        run = tiny_run(work_dir("cpu"), max_steps=4)
        train_rate = json.loads(RunDir(run).summary.read_text()).get("tokens_per_second")
    else:
        run, train_rate = find_or_train_run(args.run)
    texts = gold_texts(run, args.texts, args.smoke)
    console.print(f"run {run}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()}")

    clf = Classifier.from_run(run, device="cpu")
    dtype = str(next(clf.model.parameters()).dtype).replace("torch.", "")
    words = len(MESSAGE.split())
    ours = measure_classifier(clf, texts, args.repeats)
    n_tokens = len(clf.fmt.prompt_ids(MESSAGE))
    del clf
    stock = measure_stock(run, pick_dtype("auto"), texts, args.repeats)

    metrics = RunDir(run).metrics
    demo_metrics = RunDir("runs/demo").metrics
    accuracy = "run make demo"
    for path in (demo_metrics, metrics):
        if path.is_file():
            accuracy = f"{json.loads(path.read_text())['accuracy']:.2%} ({path})"
            break

    model_name = "tiny random Llama" if args.smoke else read_manifest(run)["base_model"]
    table = Table(title=f"bench/cpu.py: {model_name}, {dtype}, {args.threads} threads")
    for col in ("measure", "value", "target"):
        table.add_column(col)
    table.add_row("training tokens/s", "unknown" if train_rate is None else f"{train_rate:.0f}", "")
    table.add_row(
        f"classify p50 / p95, batch 1 ({words} words, {n_tokens} prompt tokens)",
        f"{ours['p50']:.1f} / {ours['p95']:.1f} ms",
        "p50 < 25 ms " + ("[green]met[/]" if ours["p50"] < 25 else "[red]missed[/]"),
    )
    table.add_row(
        "classify throughput, batch 32",
        f"{ours['mps']:.1f} messages/s",
        ">= 100/s " + ("[green]met[/]" if ours["mps"] >= 100 else "[red]missed[/]"),
    )
    threads = args.threads
    table.add_row(
        f"idle-box bound, batch 1: process CPU ms / {threads} threads",
        f"{ours['cpu_ms'] / threads:.1f} ms (CPU {ours['cpu_ms']:.1f} ms)",
        "a lower bound on wall time",
    )
    table.add_row(
        f"idle-box bound, batch 32: messages per CPU-second x {threads}",
        f"{ours['cpu_mps'] * threads:.1f} messages/s",
        "an upper bound on throughput",
    )
    table.add_row("stock peft generate p50 / p95, batch 1", f"{stock['p50']:.1f} / {stock['p95']:.1f} ms", "")
    table.add_row("stock peft generate throughput, batch 32", f"{stock['mps']:.1f} messages/s", "")
    table.add_row("speed ratio, batch 1 latency (stock / taskling)", f"{stock['p50'] / ours['p50']:.1f}x", "")
    table.add_row("speed ratio, batched throughput (taskling / stock)", f"{ours['mps'] / stock['mps']:.1f}x", "")
    table.add_row(
        "speed ratio in CPU time, batch 1 / batched",
        f"{stock['cpu_ms'] / ours['cpu_ms']:.1f}x / {ours['cpu_mps'] / stock['cpu_mps']:.1f}x",
        "",
    )
    table.add_row("demo accuracy", accuracy, "")
    table.add_row("load average at the end (1, 5, 15 min)", " ".join(f"{x:.1f}" for x in os.getloadavg()), "")
    console.print(table)
    if args.levers:
        levers(run, texts[:64], args.repeats, args.compile)


if __name__ == "__main__":
    main()
