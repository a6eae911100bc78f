"""GPU speed: stock transformers + peft vs taskling, side by side, on real model shapes.

Speed does not depend on weight values, so the models are randomly initialised from the
real architectures' configs (nothing is downloaded). Shape of the work, as in issue 6:
LoRA r=16 on all linear layers, bf16, a classification batch of 32 sequences of a 96-token
prompt + a 4-token label.

    python bench/gpu.py                      # all shapes, on CUDA
    python bench/gpu.py --shapes qwen3-0.6b  # one shape
    python bench/gpu.py --smoke              # tiny shapes on the CPU: checks the script runs

Columns: training tokens/s and peak memory for stock (full-vocabulary logits at every
position, `model(labels=...)`) and taskling (`taskling.train.sft.answer_loss`: LM head at
answer positions only); classification latency for one message and for 64 messages with
stock `generate` (greedy, 4 new tokens) and with `taskling.serve.classifier.Classifier` (label trie,
one forward pass, LM-head rows of the allowed tokens only).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from common import bench_parser
from taskling.serve.classifier import Classifier
from taskling.task import Task
from taskling.train.sft import answer_loss

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


def train_speed(model: Any, vocab: int, device: str, repeats: int, stock: bool) -> tuple[float, float]:
    """(tokens/s, peak GiB) for a LoRA step on one classification batch."""
    peft_model = with_lora(model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (BATCH, PROMPT + ANSWER), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, PROMPT:] = ids[:, PROMPT:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    base = peft_model.get_base_model()

    def step() -> None:
        loss = peft_model(**batch).loss if stock else answer_loss(base, batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, device, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    peft_model.unload()  # give the base back without LoRA layers
    return BATCH * (PROMPT + ANSWER) / statistics.median(times), peak


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


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--shapes", default="gemma3-270m,qwen3-0.6b,qwen3-4b")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = ["tiny-llama"] if args.smoke else args.shapes.split(",")
    repeats = 1 if args.smoke else args.repeats
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}, dtype {dtype}, batch {BATCH} x ({PROMPT} prompt + {ANSWER} answer) tokens, LoRA r=16")
    header = (
        "| shape | path | train tok/s | train peak GiB | classify 1 msg ms | classify 64 msgs ms |\n"
        "|---|---|---|---|---|---|"
    )
    print(header)
    for shape in shapes:
        torch.manual_seed(0)
        model = build(shape, device, dtype)
        vocab = model.config.vocab_size
        rows = {}
        for path, stock in (("stock", True), ("taskling", False)):
            tps, peak = train_speed(model, vocab, device, repeats, stock)
            one = classify_speed(model, vocab, device, repeats, stock, 1)
            many = classify_speed(model, vocab, device, repeats, stock, 64)
            rows[path] = (tps, peak, one, many)
            print(f"| {shape} | {path} | {tps:,.0f} | {peak:.1f} | {one * 1e3:.1f} | {many * 1e3:.1f} |")
        s, t = rows["stock"], rows["taskling"]
        print(
            f"| {shape} | ratio | {t[0] / s[0]:.2f}x | {t[1] / s[1]:.2f}x | {s[2] / t[2]:.2f}x faster "
            f"| {s[3] / t[3]:.2f}x faster |"
        )
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
