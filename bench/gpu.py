"""GPU speed: stock transformers + peft vs taskling, side by side, on real model shapes.

Speed does not depend on weight values, so the models are randomly initialised from the
real architectures' configs (nothing is downloaded). Shape of the work, as in issue 16:
LoRA r=16 on all linear layers, bf16, a classification batch of 32 sequences of a 96-token
prompt + a 4-token label.

    python bench/gpu.py                      # all three shapes, on CUDA (<= 8 minutes on an H100/H200)
    python bench/gpu.py --quick              # fewer steps and repeats (<= 3 minutes)
    python bench/gpu.py --shapes qwen3-0.6b  # one shape
    python bench/gpu.py --smoke              # tiny shapes on the CPU: checks the script runs

Both paths train the same LoRA (same seed) on the same batches for `--steps` steps. Stock:
`model(labels=...)` (full-vocabulary logits at every position), `generate` for 4 tokens.
taskling: what `taskling train` does with CUDA present (`train.speed.Levers`: padding-free
packing, the LM head at answer positions only, SDPA) and `taskling.serve.classifier.Classifier`
(label trie, one forward pass, prefix cache, static shapes on CUDA). QLoRA: the taskling step
on an NF4 base (`taskling.model.quantize`, needs torchao). Columns: train tokens/s, peak GiB,
the largest gap between the two loss curves, classify p50 ms for one message, messages/s at a
large batch, QLoRA peak GiB. Writes everything to `--json` too.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from common import bench_parser, work_dir
from taskling.serve.classifier import Classifier
from taskling.task import Task
from taskling.train.loss import collate, pack
from taskling.train.objective import ObjectiveLoss

SHAPES: dict[str, dict[str, Any]] = {
    "gemma3-270m": dict(
        model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
    "qwen3-4b": dict(
        model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
    ),
}  # fmt: skip
PROMPT, ANSWER, BATCH, N_LABELS, SHARED = 96, 4, 32, 20, 40


def build(shape: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), tie_word_embeddings=True, **spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def with_lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> list[float]:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def batches(vocab: int, device: str, steps: int) -> list[list[tuple[list[int], list[int]]]]:
    """`steps` batches of BATCH rows (prompt + answer), the same for both paths."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (BATCH, PROMPT + ANSWER), generator=g).tolist()
        out.append([(row, [-100] * PROMPT + row[PROMPT:]) for row in ids])
    return out


def train_run(model: Any, data: list[Any], device: str, path: str) -> dict[str, Any]:
    """Train a fresh LoRA (seed 0) on `data`: tokens/s (steps after the first), peak GiB, the loss curve."""
    torch.manual_seed(0)
    peft_model = with_lora(model)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    objective = ObjectiveLoss(peft_model)
    packing = device == "cuda"  # what Levers.resolve picks with CUDA present

    def step(rows: list[Any]) -> float:
        if path == "stock":
            loss = peft_model(**collate(rows, 0, device)).loss
        else:
            batch = pack(rows, 0, device) if packing else collate(rows, 0, device)
            total, count = objective(**batch)
            loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = [step(data[0])]
    sync(device)
    start = time.perf_counter()
    losses += [step(rows) for rows in data[1:]]
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    peft_model.unload()  # give the base back without LoRA layers
    tokens = BATCH * (PROMPT + ANSWER) * max(len(data) - 1, 1)
    return {"tokens_per_s": tokens / max(seconds, 1e-9), "peak_gib": peak, "losses": losses}


def qlora_run(shape: str, data: list[Any], device: str, dtype: torch.dtype) -> dict[str, Any] | None:
    """The taskling step on an NF4 base: peak GiB and tokens/s; None without torchao."""
    from taskling.errors import ConfigError
    from taskling.model.quantize import quantize_nf4

    if device == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = build(shape, device, dtype)
    try:
        quantize_nf4(model)
    except ConfigError as err:
        print(f"QLoRA skipped: {err}")
        return None
    result = train_run(model, data, device, "taskling")
    del model
    return result


def classify_speed(model: Any, vocab: int, device: str, repeats: int, stock: bool, n: int) -> float:
    """Median seconds to classify `n` messages."""
    g = torch.Generator().manual_seed(0)
    # Real prompts share the system turn: 40 common tokens, then the message.
    prompts = torch.randint(0, vocab, (n, PROMPT), generator=g)
    prompts[:, :SHARED] = torch.randint(0, vocab, (SHARED,), generator=g)
    prompts = prompts.to(device)
    if stock:

        def run() -> None:
            model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=ANSWER,
                min_new_tokens=ANSWER, do_sample=False, pad_token_id=0,
            )  # fmt: skip

        return statistics.median(timed(run, device, repeats))
    labels = tuple(f"label{i}" for i in range(N_LABELS))
    sequences = [[int(t) for t in torch.randint(0, vocab, (ANSWER,), generator=g)] for _ in labels]
    prompt_list = [row.tolist() for row in prompts.cpu()]
    by_text = {f"m{i}": p for i, p in enumerate(prompt_list)}
    # A stand-in for ChatFormat: the benchmark feeds token ids, not text.
    fmt = SimpleNamespace(
        task=Task(labels=labels),
        label_sequences=sequences,
        tokenizer=SimpleNamespace(pad_token_id=0),
        prompt_ids=lambda text: by_text.get(text) or prompt_list[0][:SHARED] + [hash(text) % vocab] * 8,
        max_answer_length=ANSWER,
    )
    clf = Classifier(model, fmt, device=device)  # type: ignore[arg-type]
    texts = list(by_text)
    return statistics.median(timed(lambda: clf.predict(texts, batch_size=n), device, repeats))


def measure(shape: str, device: str, dtype: torch.dtype, steps: int, repeats: int, big: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build(shape, device, dtype)
    vocab = model.config.vocab_size
    data = batches(vocab, device, steps)
    out: dict[str, Any] = {}
    for path in ("stock", "taskling"):
        row = train_run(model, data, device, path)
        model.eval()
        row["classify_1_ms"] = classify_speed(model, vocab, device, repeats, path == "stock", 1) * 1e3
        row["messages_per_s"] = big / classify_speed(model, vocab, device, max(repeats // 3, 1), path == "stock", big)
        out[path] = row
    del model
    qlora = qlora_run(shape, data, device, dtype)
    out["qlora"] = None if qlora is None else {k: v for k, v in qlora.items() if k != "losses"}
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def print_rows(shape: str, r: dict[str, Any]) -> None:
    s, t, q = r["stock"], r["taskling"], r["qlora"]
    gap = max(abs(a - b) for a, b in zip(s["losses"], t["losses"], strict=True))
    qpeak = "n/a" if q is None else f"{q['peak_gib']:.1f}"
    for path, row in (("stock", s), ("taskling", t)):
        print(
            f"| {shape} | {path} | {row['tokens_per_s']:,.0f} | {row['peak_gib']:.1f} | {row['losses'][-1]:.4f} "
            f"| {row['classify_1_ms']:.1f} | {row['messages_per_s']:,.0f} | {qpeak if path == 'taskling' else ''} |"
        )
    qratio = "n/a" if q is None else f"{q['peak_gib'] / s['peak_gib']:.2f}x"
    print(
        f"| {shape} | ratio | {t['tokens_per_s'] / s['tokens_per_s']:.2f}x | {t['peak_gib'] / s['peak_gib']:.2f}x "
        f"| max gap {gap:.4f} | {s['classify_1_ms'] / t['classify_1_ms']:.2f}x faster "
        f"| {t['messages_per_s'] / s['messages_per_s']:.2f}x | {qratio} of stock |"
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--shapes", default="gemma3-270m,qwen3-0.6b,qwen3-4b")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (<= 3 minutes on an H200)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per path (default 20; quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="classify repeats (default 30; quick 10)")
    parser.add_argument(
        "--json", type=Path, default=None, help="results file (default gpu_bench.json; --smoke: a temp folder)"
    )
    args = parser.parse_args()
    if args.json is None:  # a smoke run (CI) must not overwrite a real GPU measurement in the working tree
        args.json = work_dir("gpu") / "gpu_bench.json" if args.smoke else Path("gpu_bench.json")
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = ["tiny-llama"] if args.smoke else args.shapes.split(",")
    steps = args.steps or (3 if args.smoke else 8 if args.quick else 20)
    repeats = args.repeats or (1 if args.smoke else 10 if args.quick else 30)
    big = 16 if args.smoke else 512
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}, dtype {dtype}, batch {BATCH} x ({PROMPT} prompt + {ANSWER} answer) tokens, LoRA r=16")
    print(f"{steps} training steps per path; classify p50 over {repeats}; messages/s at batch {big}")
    print(
        "| shape | path | train tok/s | train peak GiB | last loss | classify 1 msg p50 ms "
        f"| msgs/s at batch {big} | QLoRA peak GiB |\n|---|---|---|---|---|---|---|---|"
    )
    results: dict[str, Any] = {"device": name, "dtype": str(dtype), "steps": steps, "versions": versions()}
    started = time.perf_counter()
    for shape in shapes:
        results[shape] = measure(shape, device, dtype, steps, repeats, big)
        print_rows(shape, results[shape])
    results["seconds"] = time.perf_counter() - started
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.json} ({results['seconds']:.0f} s)")


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    main()
