"""Keep it honest after it ships: a drift simulation on CLINC150, end to end.

    python bench/drift.py [--data ../shared/data/clinc150] [--intents 20] [--window 200]
    python bench/drift.py --smoke     # 8 fixture intents, hashing embeddings, small stream: seconds

The "specialist" here is a cheap stand-in: logistic regression on all-MiniLM-L6-v2
embeddings. The point is the monitor, the loop and the gate, not the model; every number
printed comes from that stand-in, never from a LoRA run. Embeddings are cached under
~/.cache/taskling/bench-drift/ so a second run takes seconds.

1. Stream (20 intents). Production is trained on CLINC train rows of 20 intents, with one
   of them (the "growing" intent) nearly absent (5 rows). Phase 1 streams test rows in the
   training label mix. Phase 2 shifts: the growing intent takes 30% of traffic, 40% of
   messages arrive in a new phrasing (SMS style: "pls", "u", dropped vowels), and 10% are
   out-of-scope queries from oos.jsonl. The monitor runs on sliding windows of --window
   requests (step 50) over the prediction log (SQLite, via `taskling.monitor.drift.monitor`).
2. One loop: `sample` 300 rows from the first 1,000 shifted requests (active learning,
   gold excluded) -> oracle relabel (CLINC's labels; out-of-scope rows are skipped) ->
   new training version through the cleaning path -> retrain -> gate vs production on
   gold v2 (gold v1 plus shifted held-out rows, added with `add_gold`). A deliberately bad
   candidate (40% of its training labels shuffled) goes through the same gate.
3. Abstention on all 150 intents: LR on 30 train rows per intent, the `unknown` threshold
   calibrated on 5 validation rows per intent + oos.jsonl's 100 validation queries, then
   in-scope accuracy and OOS recall on the full test split + oos.jsonl's 1,000 test queries.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import bench_parser, clinc_dir
from taskling.data.gold import add_gold, load_version
from taskling.data.load import Example, stratified_split, write_examples
from taskling.io import write_jsonl
from taskling.monitor.drift import MonitorConfig, calibrate, hashing_embedder, load_reference, monitor
from taskling.monitor.retrain import (
    SampleConfig,
    new_training_version,
    read_registry,
    retrain,
    sample_rows,
    score_on_gold,
)
from taskling.rundir import RunDir
from taskling.serve.abstain import AbstainingClassifier, calibrate_threshold, oos_report
from taskling.serve.classifier import Prediction
from taskling.serve.predlog import LogRow, PredictionLog, default_url

CACHE = Path(os.environ.get("TASKLING_CACHE", Path.home() / ".cache" / "taskling")) / "bench-drift"


# ---------------------------------------------------------------- cached embeddings


@dataclass(frozen=True)
class Sizes:
    """How much traffic, gold and relabeling budget the simulation uses."""

    before: int = 1000  # in-distribution requests
    after: int = 2000  # shifted requests
    gold_per_label: int = 15
    sample_from: int = 1000  # shifted requests the loop samples from
    budget: int = 300  # rows sent for relabeling
    held: int = 1000  # held-out shifted requests for the accuracy table


SMOKE = Sizes(before=150, after=300, gold_per_label=5, sample_from=150, budget=40, held=150)


def minilm(texts: Sequence[str]) -> np.ndarray:
    from taskling.model.embed import embed

    return embed(list(texts), batch_size=128)


class Embeddings:
    """Vectors by text (MiniLM by default), cached on disk across runs when `cache` is set."""

    def __init__(self, fn: Callable[[Sequence[str]], np.ndarray] = minilm, cache: Path | None = CACHE) -> None:
        self.fn, self.path = fn, cache / "embeddings.pkl" if cache else None
        self.vectors: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.is_file():
            self.vectors = pickle.loads(self.path.read_bytes())
        self.computed = 0

    def __call__(self, texts: list[str] | Any) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self.vectors})
        if missing:
            for t, v in zip(missing, self.fn(missing), strict=True):
                self.vectors[t] = v
            self.computed += len(missing)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_bytes(pickle.dumps(self.vectors))
        return np.stack([self.vectors[t] for t in texts]) if len(texts) else np.zeros((0, 384), np.float32)


class EmbeddingLR:
    """The stand-in specialist: LR on MiniLM embeddings, answering like a `Classifier`."""

    def __init__(self, labels: list[str], model: Any, embed: Embeddings) -> None:
        self.labels, self.model, self.embed = labels, model, embed

    def predict(self, texts: list[str], *, batch_size: int = 32) -> list[Prediction]:
        probs = np.zeros((len(texts), len(self.labels)))
        probs[:, [self.labels.index(c) for c in self.model.classes_]] = self.model.predict_proba(self.embed(texts))
        out = []
        for text, row in zip(texts, probs, strict=True):
            k = int(row.argmax())
            out.append(
                Prediction(text, self.labels[k], float(row[k]), dict(zip(self.labels, row.tolist(), strict=True)))
            )
        return out


def fit(rows: list[Example], embed: Embeddings, seed: int = 0) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=10, max_iter=2000, random_state=seed).fit(
        embed([ex.text for ex in rows]), [ex.label for ex in rows]
    )


def trainer(labels: list[str], embed: Embeddings, noise: float = 0.0) -> Any:
    """A `loop.Trainer`: writes a run dir the monitor and the loop can read."""

    def train(train_file: Path, run_dir: Path) -> None:
        rows = [Example(**json.loads(line)) for line in train_file.read_text().splitlines()]
        if noise:  # the deliberately bad candidate
            rng = random.Random(0)
            rows = [Example(ex.text, rng.choice(labels)) if rng.random() < noise else ex for ex in rows]
        train, validation = stratified_split(rows, 0.1, seed=0)
        write_examples(RunDir(run_dir).train_data, train)
        write_examples(RunDir(run_dir).validation_data, validation)
        (run_dir / "model.pkl").write_bytes(pickle.dumps(fit(rows, embed)))
        RunDir(run_dir).manifest.write_text(json.dumps({"task": {"labels": labels}}))

    return train


def loader(embed: Embeddings) -> Any:
    def load(run_dir: Path) -> EmbeddingLR:
        labels = json.loads(RunDir(run_dir).manifest.read_text())["task"]["labels"]
        return EmbeddingLR(labels, pickle.loads((run_dir / "model.pkl").read_bytes()), embed)

    return load


# ---------------------------------------------------------------- the simulated stream

SMS = {"you": "u", "your": "ur", "please": "pls", "are": "r", "to": "2", "for": "4", "what": "wat", "the": "da"}
SMS |= {"my": "mi", "tomorrow": "tmrw", "thanks": "thx", "because": "bc", "with": "w/", "is": "iz", "can": "cn"}


def sms_style(text: str) -> str:
    """A new phrasing channel: SMS abbreviations and dropped vowels, deterministic per text."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    words = []
    for word in text.lower().split():
        if word in SMS:
            word = SMS[word]
        elif len(word) > 4 and rng.random() < 0.5:
            word = word[0] + re.sub(r"[aeiou]", "", word[1:])
        words.append(word)
    return " ".join(words) + rng.choice(["", " pls", " asap", " thx", "??"])


def read(data: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data / name).read_text().splitlines()]


def build(data: Path, n_intents: int, seed: int, sizes: Sizes) -> dict[str, Any]:
    rng = random.Random(seed)
    all_labels = (data / "LABELS.txt").read_text().split()
    labels = sorted(rng.sample(all_labels, n_intents))
    growing = labels[0]
    by = {
        name: [r for r in read(data, f"{name}.jsonl") if r["label"] in labels]
        for name in ("train", "validation", "test")
    }
    train = [Example(r["text"], r["label"]) for r in by["train"]]
    g_train = [ex for ex in train if ex.label == growing]
    prod_train = [ex for ex in train if ex.label != growing] + g_train[:5]
    test = [Example(r["text"], r["label"]) for r in by["test"]]
    gold_pool, stream_pool = [], []
    for label in labels:
        rows = [ex for ex in test if ex.label == label]
        gold_pool += rows[: sizes.gold_per_label]
        stream_pool += rows[sizes.gold_per_label :]
    oos = read(data, "oos.jsonl")
    oos_test = [r["text"] for r in oos if r["split"] == "test"]
    return {
        "labels": labels,
        "growing": growing,
        "prod_train": prod_train,
        "validation": [Example(r["text"], r["label"]) for r in by["validation"]],
        "gold_pool": gold_pool,
        "stream_pool": stream_pool,
        "growing_pool": g_train[5:],  # unseen rows of the growing intent, for the shifted stream
        "oos_stream": oos_test[: len(oos_test) // 2],
        "oos_eval": oos_test[len(oos_test) // 2 :],
    }


def stream(sim: dict[str, Any], n: int, shifted: bool, rng: random.Random, pool: str = "stream_pool") -> list[Example]:
    """Requests with their true label (`oos` for out-of-scope)."""
    rows: list[Example] = []
    shares = {label: 0 for label in sim["labels"]}
    for ex in sim["prod_train"]:
        shares[ex.label] += 1
    by_label = {label: [ex for ex in sim[pool] if ex.label == label] for label in sim["labels"]}
    weights = [shares[label] for label in sim["labels"]]
    for _ in range(n):
        if shifted and rng.random() < 0.10:
            rows.append(Example(rng.choice(sim["oos_stream" if pool == "stream_pool" else "oos_eval"]), "oos"))
            continue
        if shifted and rng.random() < 0.30:
            source = sim["growing_pool"] if pool == "stream_pool" else by_label[sim["growing"]]
            ex = rng.choice(source)
        else:
            ex = rng.choice(by_label[rng.choices(sim["labels"], weights)[0]])
        if shifted and rng.random() < 0.40:
            ex = Example(sms_style(ex.text), ex.label)
        rows.append(ex)
    return rows


# ---------------------------------------------------------------- the three parts


def part_stream(
    sim: dict[str, Any], embed: Embeddings, work: Path, window: int, seed: int, sizes: Sizes, config: MonitorConfig
) -> dict[str, Any]:
    labels = sim["labels"]
    prod = work / "runs" / "prod"
    train_file = work / "prod_train.jsonl"
    write_examples(train_file, sim["prod_train"])
    trainer(labels, embed)(train_file, prod)
    model = loader(embed)(prod)
    val = sim["validation"]
    calibrate(prod, [p.probabilities for p in model.predict([ex.text for ex in val])], MonitorConfig())
    rng = random.Random(seed)
    before, after = stream(sim, sizes.before, False, rng), stream(sim, sizes.after, True, rng)
    requests = before + after
    t0 = time.time() - len(requests) - 10
    preds = model.predict([ex.text for ex in requests])
    plog = PredictionLog(default_url(prod))
    plog.write(
        [
            LogRow(f"r{i}", "default", "v1", p.text, p.label, p.probability, p.probabilities, 1.0, time=t0 + i)
            for i, p in enumerate(preds)
        ]
    )
    plog.close()
    windows = []
    for end in range(window, len(requests) + 1, 50):
        report = monitor(prod, since=t0 + end - window - 0.5, now=t0 + end - 0.5, config=config, embedder=embed)
        windows.append((end, report.alarm, [s.name for s in report.moved]))
    quiet = [w for w in windows if w[0] <= len(before)]
    loud = [w for w in windows if w[0] > len(before)]
    first = next((w for w in loud if w[1]), None)
    per_check: dict[str, int] = {}
    for end, _, moved in loud:
        for name in moved:
            per_check.setdefault(name, end - len(before))
    in_scope = [(ex, p) for ex, p in zip(requests, preds, strict=True) if ex.label != "oos"]
    n_before = sum(ex.label != "oos" for ex in before)
    acc_before = np.mean([p.label == ex.label for ex, p in in_scope[:n_before]])
    acc_after = np.mean([p.label == ex.label for ex, p in in_scope[n_before:]])
    return {
        "prod": prod,
        "model": model,
        "after": after,
        "preds_after": preds[len(before) :],
        "t0": t0,
        "n_before": len(before),
        "quiet_windows": len(quiet),
        "false_alarms": sum(w[1] for w in quiet),
        "first_alarm_after": None if first is None else first[0] - len(before),
        "first_alarm_checks": [] if first is None else first[2],
        "per_check": per_check,
        "acc_before": float(acc_before),
        "acc_after": float(acc_after),
    }


def part_loop(
    sim: dict[str, Any], embed: Embeddings, work: Path, s: dict[str, Any], seed: int, sizes: Sizes
) -> dict[str, Any]:
    labels, prod = sim["labels"], s["prod"]
    gold_root = work / "gold"
    write_examples(work / "gold_v1.jsonl", sim["gold_pool"])
    add_gold(gold_root, [work / "gold_v1.jsonl"], labels)
    shifted_gold = [Example(sms_style(ex.text), ex.label) for ex in sim["gold_pool"]]
    write_examples(work / "gold_new.jsonl", shifted_gold)
    add_gold(gold_root, [work / "gold_new.jsonl"], labels, train=sim["prod_train"])
    ref = load_reference(prod, MonitorConfig(), embed)
    rows = [
        {
            "id": i,
            "time": s["t0"] + s["n_before"] + i,
            "text": p.text,
            "label": p.label,
            "probability": p.probability,
            "probabilities": p.probabilities,
        }
        for i, p in enumerate(s["preds_after"][: sizes.sample_from])
    ]
    truth = {ex.text: ex.label for ex in s["after"]}
    gold_rows = [*load_version(gold_root).rows]
    picked = sample_rows(rows, ref, embed, gold_rows, SampleConfig(budget=sizes.budget, seed=seed))
    write_jsonl(work / "relabeled.jsonl", ({"text": r["text"], "label": truth[r["text"]]} for r in picked.rows))
    version = new_training_version(
        work / "versions",
        [work / "relabeled.jsonl"],
        labels,
        base_train=RunDir(prod).train_data,
        gold_roots=[gold_root],
    )
    registry = work / "runs" / "registry.json"
    gold = load_version(gold_root, "v2")
    common = {"production": prod, "gold": gold, "labels": labels, "registry": registry, "loader": loader(embed)}
    bad = retrain(version.train_file, work / "runs" / "bad", trainer=trainer(labels, embed, noise=0.4), **common)
    good = retrain(version.train_file, work / "runs" / "good", trainer=trainer(labels, embed), **common)
    held = [ex for ex in stream(sim, sizes.held, True, random.Random(seed + 7), pool="gold_pool") if ex.label != "oos"]
    accuracy = {}
    for name, run in (("production", prod), ("candidate", good.candidate), ("bad", bad.candidate)):
        predictor = loader(embed)(run)
        accuracy[name] = {
            "shifted": float(
                np.mean(
                    [
                        p.label == ex.label
                        for ex, p in zip(held, predictor.predict([ex.text for ex in held]), strict=True)
                    ]
                )
            ),
            **{
                v: score_on_gold(predictor, load_version(gold_root, v), labels, run / "evals" / f"gold-{v}")["metrics"][
                    "accuracy"
                ]
                for v in ("v1", "v2")
            },
        }
    return {
        "sampled": len(picked.rows),
        "sample_oos": sum(truth[r["text"]] == "oos" for r in picked.rows),
        "sample_growing": sum(truth[r["text"]] == sim["growing"] for r in picked.rows),
        "excluded": picked.excluded,
        "version": version.counts,
        "gold": {"v1": load_version(gold_root, "v1").tag, "v2": gold.tag},
        "bad": bad,
        "good": good,
        "accuracy": accuracy,
        "registry": read_registry(registry),
    }


def part_abstain(data: Path, embed: Embeddings, per_intent: int) -> dict[str, Any]:
    labels = (data / "LABELS.txt").read_text().split()
    train, val = [], []
    for name, k, out in (("train.jsonl", per_intent, train), ("validation.jsonl", 5, val)):
        seen: dict[str, int] = {}
        for r in read(data, name):
            if seen.get(r["label"], 0) < k:
                seen[r["label"]] = seen.get(r["label"], 0) + 1
                out.append(Example(r["text"], r["label"]))
    oos = read(data, "oos.jsonl")
    val += [Example(r["text"], "oos") for r in oos if r["split"] == "val"]
    test = [Example(r["text"], r["label"]) for r in read(data, "test.jsonl")]
    test += [Example(r["text"], "oos") for r in oos if r["split"] == "test"]
    model = EmbeddingLR(labels, fit(train, embed), embed)
    results = {}
    plain = model.predict([ex.text for ex in test])
    results["no abstention"] = oos_report(plain, [ex.label for ex in test], labels)
    val_preds = model.predict([ex.text for ex in val])
    in_scope = [(p, ex) for p, ex in zip(val_preds, val, strict=True) if ex.label != "oos"]
    cover = calibrate_threshold([p for p, _ in in_scope], [ex.label for _, ex in in_scope], labels)
    preds = AbstainingClassifier(model, cover).predict([ex.text for ex in test])
    results[f"probability >= {cover.value:.3f} (95% in-scope coverage, no OOS used)"] = oos_report(
        preds, [ex.label for ex in test], labels
    )
    for metric in ("probability", "margin"):
        threshold = calibrate_threshold(val_preds, [ex.label for ex in val], labels, metric=metric)  # type: ignore[arg-type]
        preds = AbstainingClassifier(model, threshold).predict([ex.text for ex in test])
        results[f"{metric} >= {threshold.value:.3f} (max mean of accuracy and OOS recall)"] = oos_report(
            preds, [ex.label for ex in test], labels
        )
    return {
        "results": results,
        "labels": len(labels),
        "train_rows": len(train),
        "val_rows": len(val),
        "val_oos": sum(ex.label == "oos" for ex in val),
        "test_rows": len(test),
        "test_oos": sum(ex.label == "oos" for ex in test),
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--data", type=Path, default=None, help="CLINC150 folder (default: as demo finds it)")
    parser.add_argument("--intents", type=int, default=20)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--per-intent", type=int, default=30, help="training rows per intent for the abstention part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.sizes = SMOKE if args.smoke else Sizes()
    if args.smoke:  # hashing embeddings: no model to load, nothing cached
        args.intents, args.window, args.per_intent = 8, 100, 5
        embed, config = Embeddings(hashing_embedder, cache=None), MonitorConfig(embedder="hashing")
    else:
        embed, config = Embeddings(), MonitorConfig(embedder="minilm")
    data = clinc_dir(args.data, args.smoke)
    sim = build(data, args.intents, args.seed, args.sizes)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        s = part_stream(sim, embed, work, args.window, args.seed, args.sizes, config)
        loop = part_loop(sim, embed, work, s, args.seed, args.sizes)
    abstain = part_abstain(data, embed, args.per_intent)
    report(args, sim, s, loop, abstain)
    print(f"\n{time.perf_counter() - started:.0f} s; {embed.computed} texts embedded this run (the rest cached)")


def row(name: str, value: Any) -> None:
    print(f"| {name} | {value} |")


def report(args: Any, sim: dict[str, Any], s: dict[str, Any], loop: dict[str, Any], abstain: dict[str, Any]) -> None:
    vectors = "hashing (--smoke)" if args.smoke else "all-MiniLM-L6-v2"
    print(f"\nstand-in specialist: logistic regression on {vectors} embeddings (not a LoRA run)")
    print(f"{args.intents} CLINC150 intents, growing intent `{sim['growing']}` (5 training rows), seed {args.seed}")
    print(f"monitor window {args.window} requests, step 50, default MonitorConfig thresholds\n")
    print("| stream | value |\n|---|---|")
    row("in-distribution requests, then shifted requests", f"{s['n_before']}, {args.sizes.after}")
    row("windows before the shift that alarmed", f"{s['false_alarms']} of {s['quiet_windows']}")
    first = f"{s['first_alarm_after']} ({', '.join(s['first_alarm_checks'])})"
    row("first alarm, requests after the shift began (window end)", first)
    for name, n in sorted(s["per_check"].items(), key=lambda kv: kv[1]):
        row(f"first alarm of `{name}`", f"{n} requests after the shift")
    row("production in-scope accuracy before / after the shift", f"{s['acc_before']:.1%} / {s['acc_after']:.1%}")
    print("\n| one loop | value |\n|---|---|")
    picked = f"{loop['sampled']}: {loop['sample_oos']} out-of-scope, {loop['sample_growing']} growing intent"
    row(f"sampled for relabeling (budget {args.sizes.budget})", f"{picked}; excluded {loop['excluded']}")
    row("new training version", loop["version"])
    row("gold versions", f"v1 {loop['gold']['v1']}, v2 {loop['gold']['v2']}")
    for name in ("good", "bad"):
        r = loop[name]
        verdict = "PROMOTED" if r.promoted else "BLOCKED: " + "; ".join(r.verdict["failed"])[:160]
        score = f"{r.candidate_accuracy:.1%} vs {r.production_accuracy:.1%}"
        row(f"{name} candidate vs production on gold {r.gold}", f"{score}: {verdict}")
    events = [e["event"] for e in loop["registry"]["events"]]
    row("registry: production after the loop", f"{Path(loop['registry']['production'] or '-').name}; events {events}")
    print("\n| accuracy | shifted traffic (held out, in-scope) | gold v1 | gold v2 |\n|---|---|---|---|")
    for name, acc in loop["accuracy"].items():
        print(f"| {name} | {acc['shifted']:.1%} | {acc['v1']:.1%} | {acc['v2']:.1%} |")
    print(
        f"\nabstention, all {abstain['labels']} intents: {abstain['train_rows']} train rows; threshold calibrated "
        f"on {abstain['val_rows']} validation rows ({abstain['val_oos']} oos); scored on {abstain['test_rows']} "
        f"(test + {abstain['test_oos']:,} oos)\n"
    )
    print("| rule | in-scope accuracy | in-scope coverage | OOS recall |\n|---|---|---|---|")
    for name, r in abstain["results"].items():
        print(f"| {name} | {r['in_scope_accuracy']:.1%} | {r['in_scope_coverage']:.1%} | {r['oos_recall']:.1%} |")


if __name__ == "__main__":
    main()
