"""Preference refinement after SFT: build chosen/rejected pairs, run DPO, let the gate decide.

`build_pairs` runs a trained run (classification or extraction) over its own training rows
and writes a pair for every mistake: the gold answer chosen, the model's answer rejected.
A teacher file (rows with the teacher's answer) adds a pair wherever the model disagrees
with the teacher. For classification, `margin_below` also pairs right-but-unsure answers
with their runner-up label. Pairs are JSONL: `{"text", "chosen", "rejected", "source"}`,
where an answer is a label, or for extraction the record's JSON text.

A generation run's pairs come from `taskling review --apply` (`review/pairs.jsonl`: the
fixed text chosen, the model's text rejected); its answers are free text, tokenized as its
training did (`GenerationFormat.answer_ids`: at most `max_tokens` tokens, then the end-of-turn
marker).

`dpo` refines the run's LoRA adapter with the DPO loss (sigmoid, `beta`) and writes a new
run directory. The reference policy is the SFT model itself: the same adapter as loaded,
before any DPO step; since it never changes, its log-probabilities are computed once up
front, which costs one forward pass per answer and no second copy of the model. (Running the
reference with the adapter disabled, peft's `disable_adapter()`, would make the reference the
pre-SFT base model, not the SFT policy DPO is meant to stay close to.) Answers are scored
on exactly the token ids that training and the
constrained decoders use (`ChatFormat.answer_ids`, `RecordFormat.answer_ids`), end-of-turn
included. This is a plain loop rather than trl's DPOTrainer on purpose: trl 1.16 installs
cleanly beside transformers 5.23 and peft 0.21, but DPOTrainer tokenizes prompt and
completion itself (and pulls in `datasets`), so its answers would not be the token
sequences our constrained scorer ranks; the loss itself is a few lines.

Whether it helped is for `taskling.evaluate.refine.compare` to say: it scores both runs on
a gold file and lets the gate decide.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from taskling.data.load import load_file
from taskling.errors import DataError, RunError
from taskling.io import iter_jsonl, read_json, write_json, write_jsonl
from taskling.model.head import is_head_run
from taskling.rundir import CLASSIFICATION, GENERATION, RunDir, read_manifest
from taskling.train.checkpoint import save_adapter
from taskling.train.loop import TrainingInterrupted, apply_gradients, set_seed, stop_signals
from taskling.train.loss import answer_logits, collate

log = logging.getLogger(__name__)

Pair = tuple[list[int], list[int], list[int]]  # prompt, chosen answer, rejected answer token ids


def run_kind(run_dir: str | Path) -> str:
    """`classification`, `extraction` or `generation`: the kind its run.json records."""
    kind = RunDir(run_dir).kind()
    if kind is None:
        raise RunError(f"{run_dir} is not a finished run (no run.json)", fix="train first")
    return kind


# ---------------------------------------------------------------- pairs


def _teacher_rows(path: Path, run_dir: Path, kind: str, task: Any) -> list[tuple[str, str]]:
    if kind == CLASSIFICATION:
        return [(ex.text, ex.label) for ex in load_file(path, task).examples]
    from taskling.extract.schema import load_records

    return [(ex.text, task.render(ex.record)) for ex in load_records([path], task).examples]


def build_pairs(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    data: str | Path | None = None,
    teacher: str | Path | None = None,
    margin_below: float = 0.0,
    limit: int | None = None,
) -> tuple[Path, dict[str, int]]:
    """Write chosen/rejected pairs from the run's mistakes on `data` (default: its training rows)."""
    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    data = Path(data) if data else RunDir(run_dir).train_data
    if kind == GENERATION:
        raise RunError(
            f"{run_dir} is a generation run: its pairs come from a person's review, not from its own mistakes",
            fix=f"taskling review {run_dir} --apply MARKED.jsonl, then taskling dpo {run_dir} "
            f"{RunDir(run_dir).reviewed_pairs}",
        )
    pairs: list[dict[str, Any]] = []
    task: Any  # a Task or an ExtractionTask
    if kind == CLASSIFICATION:
        from taskling.serve.classifier import Classifier

        clf = Classifier.from_run(run_dir)
        task = clf.task
        rows = [(ex.text, ex.label) for ex in load_file(data, task).examples][:limit]

        def answers(texts: list[str]) -> list[tuple[str, str | None]]:
            out = []
            for p in clf.predict(texts):
                runner = sorted(p.probabilities, key=lambda k: -p.probabilities[k])[1:2]
                out.append((p.label, runner[0] if runner and p.margin < margin_below else None))
            return out
    else:
        from taskling.extract.extractor import Extractor
        from taskling.extract.schema import load_records

        ext = Extractor.from_run(run_dir)
        task = ext.task
        rows = [(ex.text, task.render(ex.record)) for ex in load_records([data], task).examples][:limit]

        def answers(texts: list[str]) -> list[tuple[str, str | None]]:
            return [(task.render(e.record), None) for e in ext.extract(texts)]

    for (text, gold), (said, runner) in zip(rows, answers([t for t, _ in rows]), strict=True):
        if said != gold:
            pairs.append({"text": text, "chosen": gold, "rejected": said, "source": "sft_mistake"})
        elif runner is not None:
            pairs.append({"text": text, "chosen": gold, "rejected": runner, "source": "low_margin"})
    if teacher is not None:
        taught = _teacher_rows(Path(teacher), run_dir, kind, task)[:limit]
        for (text, theirs), (said, _) in zip(taught, answers([t for t, _ in taught]), strict=True):
            if said != theirs:
                pairs.append({"text": text, "chosen": theirs, "rejected": said, "source": "teacher_disagreement"})
    out_path = Path(out) if out else RunDir(run_dir).pairs
    write_jsonl(out_path, pairs)
    counts = {"rows": len(rows), "pairs": len(pairs)}
    for pair in pairs:
        counts[pair["source"]] = counts.get(pair["source"], 0) + 1
    return out_path, counts


# ---------------------------------------------------------------- DPO


def sequence_logps(base_model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of answer-token log-probabilities per row (labels -100 elsewhere)."""
    logits, targets, keep = answer_logits(base_model, batch)
    token_lp = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(keep.shape[0], device=token_lp.device, dtype=token_lp.dtype).index_add(0, rows, token_lp)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmoid DPO loss (Rafailov et al. 2023) and the implicit reward margins."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach()


@dataclass
class DPOResult:
    run_dir: Path
    pairs: int
    steps: int
    first_loss: float
    last_loss: float
    reward_accuracy: float  # share of pairs whose implicit reward prefers the chosen answer, after training


def _read_pairs(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path} does not exist", path=path, fix="build pairs first: taskling pairs RUN_DIR")
    pairs = []
    for number, row in iter_jsonl(path):
        try:
            pairs.append({k: str(row[k]) for k in ("text", "chosen", "rejected")})
        except (KeyError, TypeError) as err:
            raise DataError(
                f"not a pair ({err})", path=path, line=number, fix='each line: {"text", "chosen", "rejected"}'
            ) from None
    if not pairs:
        raise DataError(f"{path} holds no pairs", path=path, fix="the SFT run made no mistakes to learn from")
    return pairs


def _tokenize_pairs(run_dir: Path, kind: str, pairs: list[dict[str, str]], path: Path) -> list[Pair]:
    from taskling.serve.classifier import run_format

    answer: Callable[[str], list[int]]
    if kind == CLASSIFICATION:
        fmt: Any = run_format(run_dir, read_manifest(run_dir))

        def answer(text: str) -> list[int]:
            if text not in fmt.task.labels:
                raise ValueError(f"{text!r} is not a label of the task")
            return list(fmt.answer_ids(text))
    elif kind != GENERATION:
        from taskling.extract.extractor import read_extraction_manifest, run_record_format

        fmt = run_record_format(run_dir, read_extraction_manifest(run_dir))

        def answer(text: str) -> list[int]:
            return fmt.answer_ids(fmt.task.parse(text))

    out = []
    if kind == GENERATION:  # free text: any answer, cut to max_tokens, ends with the end-of-turn marker
        fmt = generation_format(run_dir)
        answer = fmt.answer_ids
    for number, pair in enumerate(pairs, start=1):
        try:
            out.append((fmt.prompt_ids(pair["text"]), answer(pair["chosen"]), answer(pair["rejected"])))
        except ValueError as err:
            raise DataError(f"pair answer does not fit the task: {err}", path=path, line=number) from None
    return out


def generation_format(run_dir: Path) -> Any:
    """The prompt and answer tokens a generation run trained on (`generate.decode.GenerationFormat`)."""
    from taskling.generate.decode import GenerationFormat
    from taskling.generate.spec import GenerationTask
    from taskling.model.loader import load_tokenizer

    manifest = read_manifest(run_dir, kind=GENERATION)
    tokenizer = load_tokenizer(str(RunDir(run_dir).tokenizer), manifest.get("chat_template"))
    task = GenerationTask.model_validate(manifest["task"])
    return GenerationFormat(tokenizer, task, int(manifest["max_length"]))


def _pair_batch(rows: list[Pair], idx: Sequence[int], which: int, pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    """Prompt + answer (`which`: 1 chosen, 2 rejected) for the pairs `idx`, loss on the answer."""
    return collate([(rows[i][0] + rows[i][which], [-100] * len(rows[i][0]) + rows[i][which]) for i in idx],
                   pad_id, device)  # fmt: skip


def _load_policy(run_dir: Path, manifest: dict[str, Any]) -> tuple[Any, Any]:
    """The SFT run's model with its adapter trainable, and the device it is on."""
    from peft import PeftModel

    from taskling.model.loader import base_path, default_device, load_model

    device = default_device()
    base = load_model(base_path(manifest), torch.float32, device)
    return PeftModel.from_pretrained(base, str(RunDir(run_dir).adapter), is_trainable=True), device


def _dpo_steps(
    model: Any,
    logps: Any,
    ref: list[tuple[float, float]],
    total: int,
    batch_size: int,
    beta: float,
    lr: float,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """`total` optimizer steps of DPO; the history of loss and reward accuracy per step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    device = next(iter(trainable)).device
    history: list[dict[str, Any]] = []
    with stop_signals() as request:
        while len(history) < total:
            order = list(range(len(ref)))
            random.Random(seed * 7919 + len(history)).shuffle(order)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ref_c = torch.tensor([ref[i][0] for i in idx], device=device)
                ref_r = torch.tensor([ref[i][1] for i in idx], device=device)
                loss, margin = dpo_loss(logps(idx, 1), logps(idx, 2), ref_c, ref_r, beta)
                loss.backward()
                apply_gradients(trainable, optimizer, None, 1.0)
                history.append(
                    {
                        "step": len(history) + 1,
                        "loss": loss.item(),
                        "reward_accuracy": float((margin > 0).float().mean()),
                    }
                )
                log.info("dpo step %d/%d: loss %.4f", len(history), total, history[-1]["loss"])
                if progress is not None:
                    progress(len(history), total)
                if request.requested:
                    raise TrainingInterrupted(
                        f"DPO stopped by {request.signal_name} at step {len(history)} of {total}; "
                        "nothing was written and the SFT run is untouched",
                        fix="run the same command again (DPO starts over)",
                    )
                if len(history) >= total:
                    break
    return history


def dpo(
    run_dir: str | Path,
    pairs_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    beta: float = 0.1,
    learning_rate: float = 5e-5,
    epochs: float = 1.0,
    batch_size: int = 4,
    max_steps: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> DPOResult:
    """Refine the run's adapter on preference pairs; writes a new run directory (default RUN_DIR-dpo).

    `progress(step, total)` is called after each optimizer step."""
    run_dir, pairs_path = Path(run_dir), Path(pairs_path)
    kind = run_kind(run_dir)
    manifest = read_json(RunDir(run_dir).manifest)
    if is_head_run(manifest):
        raise RunError(
            f"{run_dir} classifies with a linear label head (model.head: linear); DPO refines the answer "
            "tokens' probabilities, which that head does not use",
            fix="add the corrected rows to the training data and train again",
        )
    pairs = _read_pairs(pairs_path)
    rows = _tokenize_pairs(run_dir, kind, pairs, pairs_path)
    out = Path(out_dir) if out_dir else run_dir.with_name(run_dir.name + "-dpo")
    if out.resolve() == run_dir.resolve():
        raise RunError("the DPO run directory must differ from the SFT run", fix="pass --out NEW_DIR")

    set_seed(seed)
    model, device = _load_policy(run_dir, manifest)
    base_model = model.get_base_model()
    pad_id: int = getattr(base_model.config, "pad_token_id", None) or 0

    def logps(idx: Sequence[int], which: int) -> torch.Tensor:
        return sequence_logps(base_model, _pair_batch(rows, idx, which, pad_id, device))

    # The reference policy is the SFT model: this very adapter before any DPO step. It never
    # changes, so its log-probabilities are computed once. (The adapter disabled would be the
    # pre-SFT base, and DPO would then be pulled back towards a model that never saw the task.)
    model.eval()  # no dropout, so policy and reference agree exactly before the first step
    with torch.no_grad():
        ref = [(float(logps([i], 1)[0]), float(logps([i], 2)[0])) for i in range(len(rows))]
    total = max_steps or max(1, math.ceil(math.ceil(len(rows) / batch_size) * epochs))
    history = _dpo_steps(model, logps, ref, total, batch_size, beta, learning_rate, seed, progress)
    with torch.no_grad():
        after = [float(logps([i], 1)[0] - logps([i], 2)[0]) - (ref[i][0] - ref[i][1]) for i in range(len(rows))]
    _write_run(run_dir, out, model, manifest, pairs_path, len(rows), history, beta, learning_rate)
    result = DPOResult(
        run_dir=out,
        pairs=len(rows),
        steps=len(history),
        first_loss=history[0]["loss"],
        last_loss=history[-1]["loss"],
        reward_accuracy=sum(a > 0 for a in after) / len(after),
    )
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    write_json(
        RunDir(out).dpo_summary, {**summary, "beta": beta, "learning_rate": learning_rate, "parent": str(run_dir)}
    )
    return result


def _write_run(
    parent: Path,
    out: Path,
    model: Any,
    manifest: dict[str, Any],
    pairs_path: Path,
    n_pairs: int,
    history: list[dict[str, Any]],
    beta: float,
    learning_rate: float,
) -> None:
    src, dst = RunDir(parent), RunDir(out)
    dst.root.mkdir(parents=True, exist_ok=True)
    for folder in ("tokenizer", "data"):
        if getattr(src, folder).is_dir():
            shutil.copytree(getattr(src, folder), getattr(dst, folder), dirs_exist_ok=True)
    if src.config.is_file():
        shutil.copy2(src.config, dst.config)
    if pairs_path.resolve() != dst.pairs.resolve():
        shutil.copy2(pairs_path, dst.pairs)
    save_adapter(out, model)
    manifest = {**manifest, "dpo": {"parent": str(parent), "pairs": n_pairs, "beta": beta, "lr": learning_rate}}
    write_json(dst.manifest, manifest)
    write_jsonl(dst.history, history)
