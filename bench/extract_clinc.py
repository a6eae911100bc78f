"""The extraction proof: a record data set from CLINC150, a short CPU run, per-field scores.

Every query of 8 intents becomes a record
`{"intent", "domain", "amount", "number", "day", "city"}`: the intent is CLINC150's label,
the domain follows CLINC150's own grouping of intents into domains, and the entities are
derived deterministically from the text (regular expressions and a fixed city list), so
the gold records need no teacher and every field can be checked by eye.

    python bench/extract_clinc.py build OUT_DIR [--per-intent 40 --test-per-intent 10]
    python bench/extract_clinc.py run OUT_DIR [--model bundled:smollm2-135m --steps 60 --limit 80 --set train.threads=1]
    python bench/extract_clinc.py run --smoke   # tiny random model, the extract8 fixture texts, 3 steps

`build` writes OUT_DIR/{train,test}.jsonl, OUT_DIR/schema.json and OUT_DIR/extract.yaml;
`run` builds, trains (`taskling extract-train`), evaluates (`taskling extract-eval`) and
prints a per-field table with the invalid-output rate.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

from common import FIXTURES, bench_parser, read_rows, tiny_model, work_dir, write_rows

CLINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"
if not CLINC.is_dir():
    CLINC = Path("/work/shared/data/clinc150")

# CLINC150 groups its 150 intents into 10 domains; these are the groupings of the intents used.
DOMAINS = {
    "transfer": "banking",
    "pay_bill": "banking",
    "exchange_rate": "travel",
    "book_flight": "travel",
    "weather": "utility",
    "timer": "utility",
    "alarm": "utility",
    "calendar_update": "home",
}
CITIES = [
    "new york", "los angeles", "chicago", "boston", "miami", "seattle", "denver", "dallas", "houston",
    "atlanta", "portland", "san francisco", "las vegas", "phoenix", "detroit", "london", "paris", "tokyo",
    "berlin", "rome", "madrid", "toronto", "sydney", "dubai", "beijing", "orlando", "austin", "nashville",
]  # fmt: skip
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "today", "tomorrow", "tonight"]
_MONEY = re.compile(
    r"\$\s?(\d+(?:,\d{3})*(?:\.\d+)?)|\b(\d+(?:,\d{3})*(?:\.\d+)?)\s*(?:dollars?|bucks|usd|euros?|pounds|yen)\b"
)
_NUMBER = re.compile(r"(?<![\w$.,])(\d+)(?![\w.,]*\d)")


def _number(text: str) -> float | int:
    value = float(text.replace(",", ""))
    return int(value) if value.is_integer() else value


def derive_record(text: str, intent: str) -> dict[str, Any]:
    """The gold record for one CLINC150 query: deterministic, so anyone can re-derive it."""
    lower = text.lower()
    money = _MONEY.search(lower)
    amount = _number(money.group(1) or money.group(2)) if money else None
    rest = lower[: money.start()] + " " + lower[money.end() :] if money else lower
    numbers = [m.group(1) for m in _NUMBER.finditer(rest)]
    day = next((d for d in DAYS if re.search(rf"\b{d}\b", lower)), None)
    hits = [(m.start(), c) for c in CITIES for m in [re.search(rf"\b{c}\b", lower)] if m]
    city = min(hits)[1].title() if hits else None
    return {
        "intent": intent,
        "domain": DOMAINS[intent],
        "amount": amount,
        "number": int(numbers[0]) if numbers else None,
        "day": day,
        "city": city,
    }


def schema() -> dict[str, Any]:
    """The task's JSON Schema (fields in answer order)."""
    return {
        "type": "object",
        "properties": {
            "intent": {"enum": sorted(DOMAINS)},
            "domain": {"enum": sorted(set(DOMAINS.values()))},
            "amount": {"type": ["number", "null"]},
            "number": {"type": ["integer", "null"]},
            "day": {"anyOf": [{"enum": DAYS}, {"type": "null"}]},
            "city": {"type": ["string", "null"], "maxLength": 24},
        },
        "required": ["intent", "domain"],
    }


def _rows(split: str, per_intent: int, seed: int, clinc: Path = CLINC) -> list[dict[str, Any]]:
    by_intent: dict[str, list[str]] = {k: [] for k in DOMAINS}
    for row in read_rows(clinc / f"{split}.jsonl"):
        if row["label"] in by_intent:
            by_intent[row["label"]].append(row["text"])
    rng = random.Random(seed)
    out = []
    for intent, texts in by_intent.items():
        # Queries with an entity first, so the entity fields are not almost always null.
        texts = sorted(texts, key=lambda t: (derive_record(t, intent) == derive_record("", intent), rng.random()))
        out += [{"text": t, "record": derive_record(t, intent)} for t in texts[:per_intent]]
    rng.shuffle(out)
    return out


def build(
    out: Path, per_intent: int = 40, test_per_intent: int = 10, seed: int = 0, clinc: Path = CLINC
) -> dict[str, Path]:
    """Write train.jsonl, test.jsonl, schema.json and extract.yaml into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl", "schema": out / "schema.json"}
    for split, source, n in (("train", "train", per_intent), ("test", "test", test_per_intent)):
        write_rows(paths[split], _rows(source, n, seed, clinc))
    paths["schema"].write_text(json.dumps(schema(), indent=2))
    config = out / "extract.yaml"
    config.write_text(
        "task:\n  name: clinc-extract\n  json_schema: schema.json\n"
        "data:\n  train: [train.jsonl]\n  validation_fraction: 0.1\n"
        "model:\n  base: bundled:smollm2-135m\n  max_length: 160\n"
        "lora:\n  r: 16\n  alpha: 32\n  dropout: 0.0\n"
        "train:\n  epochs: 1\n  batch_size: 8\n  learning_rate: 0.001\n  threads: 2\n"
        "run_dir: runs/clinc-extract\n"
    )
    paths["config"] = config
    return paths


def smoke_source(out: Path) -> Path:
    """A CLINC150-shaped train/test pair from the extract8 fixtures' texts (their intents are DOMAINS')."""
    for split in ("train", "test"):
        rows = read_rows(FIXTURES / f"extract8_{split}.jsonl")
        write_rows(out / f"{split}.jsonl", ({"text": r["text"], "label": r["record"]["intent"]} for r in rows))
    return out


def run(
    out: Path, model: str, steps: int, limit: int, per_intent: int, overrides: list[str], clinc: Path = CLINC
) -> None:
    import logging

    from taskling.evaluate.extraction import evaluate_extraction
    from taskling.extract.schema import load_extraction_config
    from taskling.train.extraction import train_extraction

    logging.basicConfig(level=logging.INFO)
    paths = build(out, per_intent=per_intent, test_per_intent=max(2, limit // len(DOMAINS)), clinc=clinc)
    config = load_extraction_config(
        paths["config"], [f"model.base={model}", f"train.max_steps={steps}", f"run_dir={out / 'run'}", *overrides]
    )
    started = time.perf_counter()
    result = train_extraction(config)
    train_s = time.perf_counter() - started
    ev = evaluate_extraction(result.run_dir, paths["test"], limit=limit)
    m = ev.metrics
    print(f"\nmodel {model}, {result.train_rows} train rows, {result.steps} steps in {train_s:.0f} s; "
          f"{m['n']} test rows in {ev.seconds:.0f} s")  # fmt: skip
    print(f"{'field':<8} {'type':<8} {'exact':>6} {'acc':>6} {'normEM':>7} {'charF1':>7}")
    for name, f in m["fields"].items():
        acc = f.get("accuracy", f["exact_match"])
        present = f.get("char_f1_non_null")
        extra = (
            f"{f['normalised_match']:7.2%} {f['char_f1']:7.3f} (non-null {present})" if f["type"] == "string" else ""
        )
        print(f"{name:<8} {f['type']:<8} {f['exact_match']:6.1%} {acc:6.1%} {extra}")
    print(f"record exact match {m['record_exact_match']:.1%}; worst field {m['worst_field']} "
          f"({m['worst_field_accuracy']:.1%}); invalid outputs {m['invalid_output_rate']:.1%}")  # fmt: skip


def main(argv: list[str]) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("command", choices=["build", "run"])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--per-intent", type=int, default=40)
    parser.add_argument("--test-per-intent", type=int, default=10)
    parser.add_argument("--model", default="bundled:smollm2-135m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--limit", type=int, default=80)
    parser.add_argument("--set", action="append", default=[], help="config override key.path=value (repeatable)")
    args = parser.parse_args(argv)
    clinc = CLINC
    if args.smoke:
        work = work_dir("extract")
        args.out, clinc = args.out or work / "out", smoke_source(work / "clinc")
        args.model, args.steps, args.limit, args.per_intent = str(tiny_model(work / "tiny")), 3, 8, 10
        args.set = [*args.set, "train.threads=1", "model.max_length=256"]
    elif args.out is None:
        parser.error("OUT_DIR is required (or pass --smoke)")
    if args.command == "build":
        for name, path in build(args.out, args.per_intent, args.test_per_intent, clinc=clinc).items():
            print(f"{name}: {path}")
    else:
        run(args.out, args.model, args.steps, args.limit, args.per_intent, args.set, clinc)


if __name__ == "__main__":
    main(sys.argv[1:])
