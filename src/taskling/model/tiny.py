"""A tiny random chat model for tests and benchmarks, built from a config in seconds.

`build_tiny_model(out)` writes a 2-layer Llama (hidden size 64) and a byte-level BPE
tokenizer trained on a few texts, with a ChatML chat template like SmolLM2's. It knows
nothing, which is the point: whatever runs on it checks machinery, never quality. Any
text can be encoded (the tokenizer's alphabet holds every byte).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Used when no texts are given: enough to learn merges for common English words and labels.
DEFAULT_TEXTS = (
    "Classify the user's message. Answer with exactly one category name.",
    "what is the balance of my checking account",
    "set a timer for ten minutes and wake me at seven tomorrow",
    "pay the electric bill before friday",
    "will it rain in boston this weekend",
    "transfer fifty dollars from savings to checking",
    "book a flight to london for monday",
    "what is the exchange rate between dollars and euros",
    "balance timer pay_bill weather transfer book_flight exchange_rate alarm calendar_update oos",
)


def build_tiny_model(
    out: str | Path,
    *,
    texts: Sequence[str] | None = None,
    seed: int = 0,
    vocab_size: int = 600,
    hidden_size: int = 64,
    layers: int = 2,
) -> Path:
    """Write a tiny random Llama and a BPE tokenizer trained on `texts` to `out`; return `out`.

    The same arguments give the same weights and the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts or DEFAULT_TEXTS), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
