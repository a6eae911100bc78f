"""Clean a labeled set: normalise, drop duplicates, surface conflicts and likely label errors.

`clean_examples` decides, for every row, exactly one destination:

- `train`: a training candidate;
- `review`: a human should look first (conflicting labels for the same or near-same text,
  a label the cross-validated model finds unlikely);
- `rejected`: not used, with the reason (an exact or near duplicate of a kept row, a row
  that copies the frozen gold set).

Duplicates and gold copies are found by `taskling.data.dedupe`. Likely label errors come
from confident learning (cleanlab) over out-of-fold probabilities of a cheap softmax
regression on TF-IDF or MiniLM features.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from taskling.data.dedupe import DedupeConfig, duplicate_clusters, find_leaks, normalize
from taskling.data.load import Example

log = logging.getLogger(__name__)


class CleanConfig(DedupeConfig):
    """Thresholds for dedupe (see `DedupeConfig`) and label-error detection (unknown keys are errors)."""

    label_errors: bool = True
    label_model: Literal["tfidf", "minilm"] = "tfidf"
    cv_folds: int = Field(5, ge=2, le=20)
    # cleanlab's filter: "both" (flag only rows both rules agree on) measured the most precise
    # at equal recall on CLINC150 with 10% flipped labels (75% vs 64% for the default rule).
    filter_by: Literal["both", "prune_by_noise_rate", "prune_by_class", "confident_learning"] = "both"
    # Flagged rows go to the review queue ("review") or are only listed in the report ("report").
    label_error_action: Literal["review", "report"] = "review"
    # Torch threads for the label-error model: its steps are small, and extra threads spin
    # (10-30x slower) when the cores are shared.
    threads: int = Field(1, ge=1)
    seed: int = 0


# ---------------------------------------------------------------- label errors


def _features(texts: Sequence[str], config: CleanConfig) -> Any:
    if config.label_model == "minilm":
        from taskling.model.embed import embed

        return embed(texts)
    from sklearn.feature_extraction.text import TfidfVectorizer

    # Small sets: character n-grams, since short messages share few whole words. Large sets:
    # word uni- and bigrams, about 6x fewer non-zeros per row, and there is data enough.
    if len(texts) < 20_000:
        vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True, dtype=np.float32)
    else:
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, dtype=np.float32)
    return vec.fit_transform([normalize(t) for t in texts]).tocsr()


def fit_predict(x_train: Any, y_train: np.ndarray, x_test: Any, n_classes: int, seed: int) -> np.ndarray:
    """Softmax regression in torch. sklearn's one-vs-rest and lbfgs solvers take minutes at
    100k rows x 150 classes; an EmbeddingBag over the sparse TF-IDF rows with large
    minibatches and Adam takes seconds."""
    import torch

    torch.manual_seed(seed)
    sparse = hasattr(x_train, "indptr")
    if sparse:
        bag = torch.nn.EmbeddingBag(x_train.shape[1], n_classes, mode="sum")
        torch.nn.init.zeros_(bag.weight)
        layer: torch.nn.Module = bag
        optims = [torch.optim.Adam(layer.parameters(), lr=0.05)]
    else:
        layer = torch.nn.Linear(x_train.shape[1], n_classes, bias=False)
        optims = [torch.optim.Adam(layer.parameters(), lr=0.02, weight_decay=1e-5)]
    bias = torch.zeros(n_classes, requires_grad=True)
    optims.append(torch.optim.Adam([bias], lr=0.05))

    def logits(x: Any) -> torch.Tensor:
        if sparse:
            return (
                layer(
                    torch.from_numpy(x.indices.astype(np.int64)),
                    torch.from_numpy(x.indptr[:-1].astype(np.int64)),
                    per_sample_weights=torch.from_numpy(x.data.astype(np.float32)),
                )
                + bias
            )
        return layer(torch.from_numpy(np.asarray(x, dtype=np.float32))) + bias

    gen = np.random.default_rng(seed)
    targets = torch.from_numpy(y_train.astype(np.int64))
    n = x_train.shape[0]
    # Small sets need more (smaller) steps; large sets converge in a few passes of big batches.
    batch = 32 if n < 2_000 else 256 if n < 20_000 else 4096
    for _ in range(8 if n < 20_000 else 4):
        order = gen.permutation(n)
        for start in range(0, n, batch):
            rows = np.sort(order[start : start + batch])
            loss = torch.nn.functional.cross_entropy(logits(x_train[rows]), targets[rows])
            for optim in optims:
                optim.zero_grad()
            loss.backward()
            for optim in optims:
                optim.step()
    with torch.no_grad():
        probs = [torch.softmax(logits(x_test[s : s + 4096]), dim=1) for s in range(0, x_test.shape[0], 4096)]
    return torch.cat(probs).numpy()


def _folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Stratified fold ids; a label with fewer rows than folds simply spans fewer folds."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    offset = 0
    for label in np.unique(y):
        rows = rng.permutation(np.nonzero(y == label)[0])
        fold[rows] = (np.arange(len(rows)) + offset) % k
        offset += len(rows)  # rotate so small labels do not all start in fold 0
    return fold


def out_of_fold_probabilities(texts: Sequence[str], y: np.ndarray, n_classes: int, config: CleanConfig) -> np.ndarray:
    """Each row's class probabilities from a model that never saw that row."""
    import torch

    x = _features(texts, config)
    probs = np.zeros((len(texts), n_classes), dtype=np.float32)
    fold = _folds(y, config.cv_folds, config.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        for k in range(config.cv_folds):
            test = np.nonzero(fold == k)[0]
            train = np.nonzero(fold != k)[0]
            if len(test) and len(train):
                probs[test] = fit_predict(x[train], y[train], x[test], n_classes, config.seed + k)
    finally:
        torch.set_num_threads(threads)
    return probs


@dataclass(frozen=True)
class LabelIssue:
    index: int
    given: str
    suggested: str
    given_probability: float
    suggested_probability: float
    rank: int


def find_label_issues(examples: Sequence[Example], labels: Sequence[str], config: CleanConfig) -> list[LabelIssue]:
    """Rows whose label looks wrong, most suspicious first (confident learning)."""
    from cleanlab.filter import find_label_issues as cl_find

    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[ex.label] for ex in examples], dtype=np.int64)
    if len(examples) < 2 * config.cv_folds or len(set(y.tolist())) < 2:
        log.info("too few rows (%d) to look for label errors", len(examples))
        return []
    probs = out_of_fold_probabilities([ex.text for ex in examples], y, len(labels), config)
    # cleanlab wants every class column to have at least one given label; restrict to the
    # labels present and map back.
    present = np.unique(y)
    remap = {int(c): i for i, c in enumerate(present)}
    sub = probs[:, present]
    sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    ranked = cl_find(
        labels=np.array([remap[int(c)] for c in y]),
        pred_probs=sub,
        filter_by=config.filter_by,
        return_indices_ranked_by="self_confidence",
    )
    issues = []
    for rank, i in enumerate(ranked, start=1):
        best = int(np.argmax(probs[i]))
        issues.append(
            LabelIssue(
                index=int(i),
                given=examples[i].label,
                suggested=labels[best],
                given_probability=float(probs[i, y[i]]),
                suggested_probability=float(probs[i, best]),
                rank=rank,
            )
        )
    return issues


# ---------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class Decision:
    """Where one row went and why."""

    destination: Literal["train", "review", "rejected"]
    reason: str = ""
    detail: str = ""


@dataclass
class CleanResult:
    decisions: list[Decision]
    duplicate_groups: list[list[int]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    label_issues: list[LabelIssue] = field(default_factory=list)
    leaks: list[dict[str, Any]] = field(default_factory=list)

    def indices(self, destination: str) -> list[int]:
        return [i for i, d in enumerate(self.decisions) if d.destination == destination]

    def reasons(self, destination: str) -> dict[str, int]:
        return dict(Counter(d.reason for d in self.decisions if d.destination == destination))


def _where(ex: Example) -> str:
    return f"{ex.source}:{ex.line}" if ex.source else f"row {ex.line}"


def clean_examples(
    examples: Sequence[Example],
    labels: Sequence[str],
    config: CleanConfig | None = None,
    *,
    gold: Sequence[Example] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CleanResult:
    """Decide train / review / rejected for every row (labels must already be in the set).

    `progress(done, 3)` after each stage: gold leaks, duplicates and conflicts, label errors."""
    config = config or CleanConfig()
    step = progress or (lambda done, total: None)
    decisions: list[Decision | None] = [None] * len(examples)
    result = CleanResult(decisions=[])

    if gold:
        for leak in find_leaks(examples, gold, config):
            decisions[leak["index"]] = Decision("rejected", "gold_leak", leak["detail"])
            result.leaks.append(leak)

    step(1, 3)
    live = [i for i, d in enumerate(decisions) if d is None]
    groups = duplicate_clusters([examples[i].text for i in live], config)
    for group in groups:
        rows = [live[g] for g in group]
        result.duplicate_groups.append(rows)
        given = Counter(examples[i].label for i in rows)
        if len(given) > 1:
            # Reported, never resolved by vote: a person decides which label is right.
            detail = "labels " + ", ".join(f"{label} x{n}" for label, n in given.most_common())
            result.conflicts.append(
                {
                    "rows": [_where(examples[i]) for i in rows],
                    "texts": [examples[i].text for i in rows],
                    "labels": dict(given),
                }
            )
            for i in rows:
                decisions[i] = Decision("review", "conflicting_labels", detail)
            continue
        keep = rows[0]
        for i in rows[1:]:
            exact = normalize(examples[i].text) == normalize(examples[keep].text)
            reason = "exact_duplicate" if exact else "near_duplicate"
            decisions[i] = Decision("rejected", reason, f"of {_where(examples[keep])}: {examples[keep].text!r}")

    step(2, 3)
    candidates = [i for i, d in enumerate(decisions) if d is None]
    if config.label_errors and candidates:
        issues = find_label_issues([examples[i] for i in candidates], labels, config)
        for issue in issues:
            i = candidates[issue.index]
            result.label_issues.append(
                LabelIssue(
                    i, issue.given, issue.suggested, issue.given_probability, issue.suggested_probability, issue.rank
                )
            )
            if config.label_error_action == "review":
                detail = (
                    f"rank {issue.rank}: given {issue.given} (p={issue.given_probability:.2f}), "
                    f"model says {issue.suggested} (p={issue.suggested_probability:.2f})"
                )
                decisions[i] = Decision("review", "likely_label_error", detail)
    result.decisions = [d or Decision("train") for d in decisions]
    step(3, 3)
    return result


# ---------------------------------------------------------------- the report

GUIDE = (100, 300)
WARN_BELOW = 50
GUIDE_NOTE = (
    "aim for 100-300 checked examples per category; below 50-100 examples you are doing "
    "few-shot prompting disguised as fine-tuning"
)


def category_status(count: int) -> str:
    if count == 0:
        return "missing"
    if count < WARN_BELOW:
        return "too few"
    if count < GUIDE[0]:
        return "thin"
    return "ok" if count <= GUIDE[1] else "plenty"


def build_report(
    examples: Sequence[Example],
    result: CleanResult,
    labels: Sequence[str],
    *,
    rows_read: int | None = None,
    extra_review: dict[str, int] | None = None,
    extra_rejected: dict[str, int] | None = None,
    invented_labels: dict[str, int] | None = None,
    top: int = 20,
) -> dict[str, Any]:
    """The data report as a JSON-ready dict: counts per category against the guide, and
    what was removed or queued and why. `extra_*` add rows decided before cleaning."""
    review = Counter(result.reasons("review")) + Counter(extra_review or {})
    rejected = Counter(result.reasons("rejected")) + Counter(extra_rejected or {})
    train = Counter(examples[i].label for i in result.indices("train"))
    categories = [
        {"label": label, "count": train.get(label, 0), "status": category_status(train.get(label, 0))}
        for label in labels
    ]
    warnings = [
        f"{c['label']}: {c['count']} rows ({c['status']})" for c in categories if c["status"] in ("missing", "too few")
    ]
    n_train, n_review, n_rejected = sum(train.values()), sum(review.values()), sum(rejected.values())
    return {
        "rows_read": rows_read if rows_read is not None else len(examples),
        "train": n_train,
        "review_queue": n_review,
        "rejected": n_rejected,
        "review_reasons": dict(review),
        "rejected_reasons": dict(rejected),
        "invented_labels": dict(sorted((invented_labels or {}).items(), key=lambda kv: -kv[1])),
        "duplicates_removed": {"exact": rejected.get("exact_duplicate", 0), "near": rejected.get("near_duplicate", 0)},
        "conflicts": len(result.conflicts),
        "conflict_examples": result.conflicts[:top],
        "label_error_candidates": len(result.label_issues),
        "label_error_examples": [
            {
                "rank": issue.rank,
                "text": examples[issue.index].text,
                "where": _where(examples[issue.index]),
                "given": issue.given,
                "suggested": issue.suggested,
                "given_probability": round(issue.given_probability, 3),
            }
            for issue in sorted(result.label_issues, key=lambda x: x.rank)[:top]
        ],
        "gold_leaks": len(result.leaks),
        "guide": GUIDE_NOTE,
        "categories": categories,
        "warnings": warnings,
    }
