"""Constrained classification: the answer is always exactly one label of the set.

No text is generated. The labels' answer token sequences (label text plus the template's
end-of-turn marker) form a token trie. A label's probability is the probability that
decoding restricted to the trie produces it: the product, over the trie's branching points
on its path, of the softmax over the allowed next tokens only. Where labels share no first
token this needs one forward pass over the prompt and the LM-head rows of the labels' first
tokens; where they share a prefix, the shared prefix tokens ride along in the same forward
pass behind the prompt, each attending to the prompt and its own ancestors (a 4D mask).
The probabilities over the label set sum to one by construction.

Speed, without changing a single probability:

- **Prefix caching.** The chat template renders the system prompt and the user-turn header
  identically for every message. Their keys and values are computed once per classifier
  and reused by every request and batch row. A batch row is laid out as
  `[cached prefix][padding][text + generation prompt][trie nodes]`: the padding sits between
  prefix and text, is masked out, and takes no position, so every real token keeps exactly
  the position it has in the uncached prompt. A text whose tokens would merge with the end
  of the prefix (e.g. one starting with a blank line) is scored without the cache.
- **Length bucketing.** `predict` sorts texts by length before batching, so little padding
  is computed; results come back in input order.
- **Merged adapters.** `from_run` merges the LoRA weights into the base (`merge=True`).
- Only the LM-head rows of the tokens allowed at a branching point are ever multiplied.
- **Static shapes** (on by default on CUDA): a batch is padded to a bucket of rows and of
  width (powers of two), so a handful of shapes recur and kernels, allocator blocks and
  compiled graphs are reused; the padding is masked, so the probabilities do not change.

Long texts keep their first tokens so the prompt fits `max_length` (`ChatFormat.prompt_ids`).

A run trained with `model.head: linear` (`model/head.py`) scores with its label head instead:
one branch at the prompt's last position whose rows are the head's, no trie inputs at all.

One lever that *does* change probabilities, so it is opt-in and its effect is measured:
`quantize="int8"` (CPU) runs the decoder's linear layers with dynamic int8 (see
`quantize_int8`); put such a classifier through the gate before shipping it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# OpenMP threads spin while they wait for each other. On a CPU shared with other processes a
# spinning thread holds a core its peer needs, and batch-1 latency got ~8x worse with 2
# threads than with 1 (bench/cpu.py). Sleeping waiters avoid that; it only takes effect
# when this module is the first to import torch (the CLI's classify and serve commands).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from taskling.errors import RunError
from taskling.model.head import attach_head, has_head, head_weight, is_head_run
from taskling.model.loader import (
    ChatFormat,
    base_path,
    default_device,
    load_model,
    load_tokenizer,
    pick_dtype,
)
from taskling.model.quantize import QUANTIZE_MODES, quantize_int8
from taskling.rundir import RunDir, adapter_version, read_manifest
from taskling.serve.prediction import Prediction

if TYPE_CHECKING:
    from taskling.serve.cascade import Cascade
from taskling.task import Task

__all__ = ["Classifier", "LabelTrie", "Prediction", "load_adapters", "run_format"]

log = logging.getLogger(__name__)

_PREFIX_PROBES = ("alpha", "Zulu 42")


@dataclass
class LabelTrie:
    """The labels' token sequences as a trie, reduced to what scoring needs.

    `inputs` are the trie nodes fed to the model after the prompt (token, parent input
    index or -1 for the prompt's last position, depth). `branches` are the positions where
    more than one token is allowed: (input index or -1, allowed tokens). `paths[label]`
    lists, per branch on the label's way, (branch index, choice index).
    """

    inputs: list[tuple[int, int, int]] = field(default_factory=list)
    branches: list[tuple[int, list[int]]] = field(default_factory=list)
    paths: list[list[tuple[int, int]]] = field(default_factory=list)

    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]]) -> LabelTrie:
        children: dict[tuple[int, ...], list[int]] = {}
        for seq in sequences:
            for k in range(len(seq)):
                kids = children.setdefault(tuple(seq[:k]), [])
                if seq[k] not in kids:
                    kids.append(seq[k])
        branching = {prefix for prefix, kids in children.items() if len(kids) > 1}
        # A node is fed to the model only if some branching point lies at or below it.
        needed = {p[:k] for p in branching for k in range(1, len(p) + 1)}
        trie = cls()
        index: dict[tuple[int, ...], int] = {(): -1}
        for prefix in sorted(needed, key=len):
            index[prefix] = len(trie.inputs)
            trie.inputs.append((prefix[-1], index[prefix[:-1]], len(prefix)))
        branch_of: dict[tuple[int, ...], int] = {}
        for prefix in sorted(branching, key=len):
            branch_of[prefix] = len(trie.branches)
            trie.branches.append((index[prefix], list(children[prefix])))
        for seq in sequences:
            path = []
            for k in range(len(seq)):
                prefix = tuple(seq[:k])
                if prefix in branch_of:
                    path.append((branch_of[prefix], children[prefix].index(seq[k])))
            trie.paths.append(path)
        return trie


def shape_bucket(n: int) -> int:
    """The static size for `n` rows or tokens: the next power of two, at least 8."""
    return max(8, 1 << (n - 1).bit_length())


def common_prefix(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return list(a[:n])


def _check_quantize(quantize: str | None, device: str, dtype: str, merge: bool) -> None:
    if quantize is None:
        return
    if quantize not in QUANTIZE_MODES:
        raise RunError(f"unknown quantize mode {quantize!r}", fix=f"use one of: {', '.join(QUANTIZE_MODES)}")
    if device != "cpu":
        raise RunError("int8 dynamic quantization runs on the CPU only", fix="drop --quantize on a GPU")
    if dtype not in ("auto", "float32"):
        raise RunError(f"int8 quantization starts from float32 weights, not {dtype}", fix="leave dtype at auto")
    if not merge:
        raise RunError("int8 quantization needs the adapter merged into the base", fix="serve one run per process")


class Classifier:
    """Scores every label for each text and returns the most probable one.

    `adapter` names the peft adapter to activate before scoring when several adapters share
    one unmerged base (the server's multi-adapter mode); a merged model needs none.
    """

    def __init__(
        self,
        model: Any,
        fmt: ChatFormat,
        *,
        device: str | None = None,
        prefix_cache: bool = True,
        adapter: str | None = None,
        version: str = "unversioned",
        static_shapes: bool | None = None,
    ) -> None:
        self.model = model
        self.fmt = fmt
        self.task: Task = fmt.task
        self.device = device or default_device()
        self.adapter = adapter
        self.version = version
        self.static_shapes = torch.device(self.device).type == "cuda" if static_shapes is None else static_shapes
        self.head = "linear" if has_head(model) else "labels"
        self._decoder = model.get_decoder()
        self._dtype = next(model.parameters()).dtype
        self._cap = getattr(model.config, "final_logit_softcapping", None)
        # Sliding-window layers (Gemma 3) see only the last `window` keys; they get their own mask.
        layer_types = getattr(model.config, "layer_types", None) or ()
        self._window: int | None = model.config.sliding_window if "sliding_attention" in layer_types else None
        if self.head == "linear":  # one branch at the prompt's last position: the label head's rows
            n = len(self.task.labels)
            self.trie = LabelTrie(branches=[(-1, list(range(n)))], paths=[[(0, i)] for i in range(n)])
            self._cap = None
            self._prepare_branches(head_weight(model, adapter).to(self._dtype))
        else:
            self.trie = LabelTrie.build(fmt.label_sequences)
            self._prepare_branches(model.get_output_embeddings().weight)
        self.model.eval()
        self._prefix: list[int] = []
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if prefix_cache:
            self._build_prefix_cache()

    def _prepare_branches(self, head: torch.Tensor) -> None:
        # Only the LM-head rows of the tokens allowed at a branch are ever needed.
        self._branch_rows = [head[tokens].detach().clone() for _, tokens in self.trie.branches]
        flat: list[int] = []
        offsets = []
        for _, tokens in self.trie.branches:
            offsets.append(len(flat))
            flat.extend(range(len(flat), len(flat) + len(tokens)))
        select = torch.zeros(len(flat), len(self.task.labels))
        for label_idx, path in enumerate(self.trie.paths):
            for branch, choice in path:
                select[offsets[branch] + choice, label_idx] = 1.0
        self._select = select

    def _activate(self) -> None:
        if self.adapter is not None and getattr(self.model, "active_adapter", None) != self.adapter:
            self.model.set_adapter(self.adapter)

    @torch.inference_mode()
    def _build_prefix_cache(self) -> None:
        """Run the shared instruction prefix once and keep its keys and values per layer."""
        a, b = (self.fmt.prompt_ids(p) for p in _PREFIX_PROBES)
        prefix = common_prefix(a, b)
        if not prefix:
            return
        from transformers import DynamicCache

        self._activate()
        ids = torch.tensor([prefix], device=self.device)
        # A cache without the model's config keeps every key in every layer: a sliding-window
        # layer's own cache would drop the prefix's older keys, which later rows' masks still index.
        out = self._decoder(input_ids=ids, use_cache=True, past_key_values=DynamicCache())
        cache = out.past_key_values
        self._prefix_kv = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]
        self._prefix = prefix
        log.info("prefix cache: %d shared prompt tokens computed once", len(prefix))

    @property
    def prefix_length(self) -> int:
        return len(self._prefix) if self._prefix_kv is not None else 0

    # ------------------------------------------------------------ scoring

    def _batch_inputs(self, suffixes: Sequence[list[int]], offset: int, width: int = 0) -> dict[str, Any]:
        """Left-padded suffixes then the trie inputs, with positions and a 4D mask.

        `offset` is the length of the cached prefix in front of every row (0 without it):
        keys are `[prefix][padding + suffix][trie inputs]`, queries are the last two parts.
        """
        width = max(width, *(len(s) for s in suffixes))
        nodes = self.trie.inputs
        total = width + len(nodes)
        pad = self.fmt.tokenizer.pad_token_id
        ids = torch.full((len(suffixes), total), pad, dtype=torch.long)
        positions = torch.zeros((len(suffixes), total), dtype=torch.long)
        keep = torch.zeros((len(suffixes), total), dtype=torch.bool)  # key is a real token
        for row, suffix in enumerate(suffixes):
            start = width - len(suffix)
            ids[row, start:width] = torch.tensor(suffix)
            positions[row, start:width] = torch.arange(offset, offset + len(suffix))
            keep[row, start:] = True  # the text and the trie inputs; not the padding
            for j, (token, _, depth) in enumerate(nodes):
                ids[row, width + j] = token
                positions[row, width + j] = offset + len(suffix) - 1 + depth
        allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))
        if nodes:
            # Trie inputs see the prompt and their own ancestors, never their siblings.
            allowed[width:, width:] = False
            for j, (_, parent, _) in enumerate(nodes):
                allowed[width + j, width + j] = True
                while parent >= 0:
                    allowed[width + j, width + parent] = True
                    parent = nodes[parent][1]
        mask = allowed.unsqueeze(0) & keep.unsqueeze(1)
        mask |= torch.eye(total, dtype=torch.bool).unsqueeze(0)  # padding rows attend to themselves
        if offset:  # every query sees the whole cached prefix
            seen = torch.ones((len(suffixes), total, offset), dtype=torch.bool)
            mask = torch.cat([seen, mask], dim=-1)
        attention: Any = self._additive(mask)
        if self._window:  # a key is seen by a sliding layer only within `window` positions of the query
            keys = torch.cat([torch.arange(offset).expand(len(suffixes), -1), positions], dim=1)
            near = keys.unsqueeze(1) > positions.unsqueeze(2) - self._window
            attention = {"full_attention": attention, "sliding_attention": self._additive(mask & near)}
        return {
            "input_ids": ids.to(self.device),
            "position_ids": positions.to(self.device),
            "attention_mask": attention,
            "width": width,
        }

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        """A [rows, 1, queries, keys] additive mask on the device from a boolean "may attend" mask."""
        additive = torch.zeros(mask.shape, dtype=self._dtype).masked_fill(~mask, torch.finfo(self._dtype).min)
        return additive.unsqueeze(1).to(self.device)

    def _cache_for(self, rows: int) -> Any:
        from transformers import DynamicCache

        assert self._prefix_kv is not None
        data = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self._prefix_kv]
        return DynamicCache(ddp_cache_data=data)

    def _score(self, prompts: Sequence[list[int]], cached: bool) -> torch.Tensor:
        offset = len(self._prefix) if cached else 0
        suffixes = [p[offset:] for p in prompts]
        width = 0
        if self.static_shapes:  # extra rows repeat the first; extra width is masked left padding
            suffixes += [suffixes[0]] * (shape_bucket(len(suffixes)) - len(suffixes))
            width = shape_bucket(max(len(s) for s in suffixes))
        batch = self._batch_inputs(suffixes, offset, width)
        width = batch.pop("width")
        if cached:
            batch["past_key_values"] = self._cache_for(len(suffixes))
        hidden = self._decoder(**batch, use_cache=cached).last_hidden_state
        logps = []
        for (node, _), rows in zip(self.trie.branches, self._branch_rows, strict=True):
            h = hidden[:, width - 1] if node < 0 else hidden[:, width + node]
            logits = (h @ rows.T).float()
            if self._cap:
                logits = torch.tanh(logits / self._cap) * self._cap
            logps.append(torch.log_softmax(logits, dim=-1))
        return torch.cat(logps, dim=-1)[: len(prompts)].cpu() @ self._select

    def _uses_prefix(self, prompt: list[int]) -> bool:
        n = len(self._prefix)
        return self._prefix_kv is not None and len(prompt) > n and prompt[:n] == self._prefix

    @torch.inference_mode()
    def label_log_probs(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), n_labels] log-probabilities of each label (rows sum to 1 in prob space)."""
        if not self.trie.branches:  # a single label: always that one
            return torch.zeros(len(texts), len(self.task.labels))
        self._activate()
        prompts = [self.fmt.prompt_ids(t) for t in texts]
        out = torch.empty(len(texts), len(self.task.labels))
        with_cache = [i for i, p in enumerate(prompts) if self._uses_prefix(p)]
        without = [i for i, p in enumerate(prompts) if not self._uses_prefix(p)]
        for rows, cached in ((with_cache, True), (without, False)):
            if rows:
                out[rows] = self._score([prompts[i] for i in rows], cached)
        return out

    def predict(
        self, texts: Sequence[str], *, batch_size: int = 32, progress: Callable[[int, int], None] | None = None
    ) -> list[Prediction]:
        """Classify `texts`; batches are length-bucketed and the input order is kept.

        `progress(done, total)` is called after each batch."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[Prediction | None] = [None] * len(texts)
        labels = self.task.labels
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            probs = self.label_log_probs([texts[i] for i in chunk]).exp()
            for i, row in zip(chunk, probs.tolist(), strict=True):
                best = max(range(len(labels)), key=row.__getitem__)
                results[i] = Prediction(texts[i], labels[best], row[best], dict(zip(labels, row, strict=True)))
            if progress is not None:
                progress(start + len(chunk), len(texts))
        return [r for r in results if r is not None]

    def __call__(self, text: str) -> Prediction:
        return self.predict([text])[0]

    # ------------------------------------------------------------ loading

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        merge: bool = True,
        device: str | None = None,
        dtype: str = "auto",
        prefix_cache: bool = True,
        threads: int | None = None,
        quantize: str | None = None,
        cascade: bool = True,
    ) -> Classifier | Cascade:
        """Load the base model and the run's best adapter (merged into the weights by default).

        `quantize="int8"` (CPU): dynamic int8 decoder, see `quantize_int8`; the version gets `+int8`.
        A run with `cascade.json` loads as its `Cascade` (this is its lora stage) unless `cascade=False`.
        """
        if cascade and RunDir(run_dir).cascade.is_file():
            from taskling.serve.cascade import Cascade

            kw: dict[str, Any] = {"merge": merge, "device": device, "dtype": dtype, "threads": threads}
            kw.update(prefix_cache=prefix_cache, quantize=quantize, cascade=False)
            return Cascade.from_run(run_dir, lora=lambda: cls.from_run(run_dir, **kw))
        one = load_adapters(
            {"default": run_dir},
            merge=merge,
            device=device,
            dtype=dtype,
            threads=threads,
            quantize=quantize,
            prefix_cache=prefix_cache,
        )
        return one["default"]


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (default: leave torch's choice, one per physical core).

    More threads than cores makes CPU inference slower, not faster, on a shared machine.
    """
    if threads:
        torch.set_num_threads(threads)


def run_format(run_dir: str | Path, manifest: dict[str, Any]) -> ChatFormat:
    """The run's ChatFormat, checked to render every label exactly as in training."""
    task = Task.model_validate(manifest["task"])
    tokenizer = load_tokenizer(str(RunDir(run_dir).tokenizer), manifest["chat_template"])
    fmt = ChatFormat(tokenizer, task, manifest["max_length"])
    for label, answer in manifest["label_answers"].items():
        if fmt.answer_text(label) != answer:
            raise RunError(f"the chat template renders label {label!r} differently than in training")
    return fmt


def load_adapters(
    runs: dict[str, str | Path],
    *,
    merge: bool | None = None,
    device: str | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    quantize: str | None = None,
    prefix_cache: bool = True,
) -> dict[str, Classifier]:
    """One classifier per named run, all sharing a single copy of their common base model.

    With one run the adapter is merged (fastest). With several, they are loaded as named
    peft adapters on one base and switched per batch; every run must use the same base.
    `quantize="int8"` runs on the CPU, so it is where the model goes unless `device` says otherwise.
    """
    from peft import PeftModel

    if not runs:
        raise RunError("no run to load", fix="give at least one run directory")
    set_threads(threads)
    device = device or ("cpu" if quantize else default_device())
    manifests = {name: read_manifest(path) for name, path in runs.items()}
    bases = {base_path(m) for m in manifests.values()}
    if len(bases) > 1:
        raise RunError(
            f"the runs use different base models ({', '.join(sorted(bases))})",
            fix="serve runs of one base model together; start another server for the others",
        )
    merge = len(runs) == 1 if merge is None else merge
    _check_quantize(quantize, device, dtype, merge)
    heads = [name for name, m in manifests.items() if is_head_run(m)]
    if heads and len(runs) > 1:
        raise RunError(
            f"run {heads[0]!r} classifies with a linear label head (model.head: linear), which one base "
            "cannot share with other adapters",
            fix="serve a linear-head run in a server of its own",
        )
    base = load_model(bases.pop(), torch.float32 if quantize else pick_dtype(dtype), device)
    if heads:  # the adapter's saved head is loaded into this module
        attach_head(base, len(manifests[heads[0]]["task"]["labels"]))
    names = list(runs)
    model: Any = PeftModel.from_pretrained(base, str(RunDir(runs[names[0]]).adapter), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(RunDir(runs[name]).adapter), adapter_name=name)
    if merge:
        if len(names) > 1:
            raise RunError("cannot merge several adapters into one base", fix="leave merge unset")
        model = model.merge_and_unload()
    if quantize:
        model = quantize_int8(model, backend=quantize)
    out = {}
    for name in names:
        fmt = run_format(runs[name], manifests[name])
        adapter = None if merge else name
        version = adapter_version(runs[name]) + (f"+{quantize}" if quantize else "")
        out[name] = Classifier(model, fmt, device=device, adapter=adapter, version=version, prefix_cache=prefix_cache)
    return out
