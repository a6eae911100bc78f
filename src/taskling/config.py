"""Typed configuration: one pydantic model per stage, composed into `ProjectConfig`.

A config is a YAML file plus `key.path=value` overrides from the command line. Unknown
keys are errors. Relative paths in the YAML are resolved against the YAML's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taskling.errors import ConfigError
from taskling.task import Task

BUNDLED_MODEL = "bundled:smollm2-135m"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where the examples come from and what to do with bad rows."""

    train: list[Path]
    validation: list[Path] = Field(default_factory=list)
    # Share of train held out for validation loss when no validation file is given.
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # The row shape, or the container: "parquet", "datasets" (a save_to_disk folder; `hf:ORG/NAME:SPLIT`
    # names a Hub dataset). "auto" detects it from the extension, folder layout and keys.
    format: Literal["auto", "text_label", "instruction", "alpaca", "chat", "csv", "parquet", "datasets"] = "auto"
    text_field: str = "text"
    label_field: str = "label"
    # "error" stops at the first bad row; "skip" drops bad rows, counts and reports them.
    on_bad_rows: Literal["error", "skip"] = "error"
    # A frozen gold set (`taskling split` writes gold.manifest.json): training refuses rows
    # that copy a gold row, exactly or as a near-duplicate.
    gold_manifest: Path | None = None


class ModelConfig(_Strict):
    """The base model: a Hugging Face id, a local directory, a .gguf file, or a bundled alias."""

    base: str = BUNDLED_MODEL
    gguf_file: str | None = None
    # Overrides the tokenizer's chat template (needed for GGUF files that carry none).
    chat_template: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(256, ge=16)
    # QLoRA: "nf4" freezes the base's decoder linear layers in 4-bit NormalFloat (torchao),
    # about a quarter of bf16's memory; LoRA trains on top in higher precision.
    quantize: Literal["nf4"] | None = None
    # Attention kernel for training: "sdpa" (PyTorch's fused attention) works everywhere;
    # "flash_attention_2" needs CUDA and the flash-attn package. null: "eager" when training on
    # a CPU on unpacked rows of at most 256 tokens (its backward is 1.24-1.30x faster there than
    # SDPA's, bench/NOTES.md), else "sdpa" (`train.speed.training_attention`).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = None
    # How a classifier scores its labels (model/head.py): "labels" scores each label's answer
    # tokens with the LM head; "linear" trains a [labels x hidden] head on the last prompt
    # position with cross-entropy over the labels (classification tasks only; exports as an
    # adapter, not as GGUF/Ollama/vLLM, whose runtimes have no such head).
    head: Literal["labels", "linear"] = "labels"


class LoraSettings(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    # 0 by default: on a CPU the dropout masks are 13% of a training step (bench/NOTES.md), and
    # without dropout prefix-once training is exactly the plain path.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "all-linear" targets every linear layer but the output head (the QLoRA recipe).
    target_modules: str | list[str] = "all-linear"


class TrainSettings(_Strict):
    # learning_rate, warmup_ratio, epochs and batch_size left unset (null) are chosen from the
    # number of training rows and labels (train/defaults.py, docs/training.md "Defaults by data size").
    learning_rate: float | None = Field(None, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    # Evaluate validation loss every N optimizer steps; 0 means once per epoch.
    eval_every: int = Field(0, ge=0)
    # Stop after this many evaluations without improvement; 0 disables early stopping.
    patience: int = Field(2, ge=0)
    min_delta: float = Field(0.0, ge=0.0)
    # Save a resumable checkpoint every N optimizer steps (and at every evaluation); 0: only at evaluations.
    checkpoint_every: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1)
    # Speed levers (docs/gpu.md). null means "on when CUDA is present".
    # Padding-free packing: a micro-batch's rows run as one sequence, attention kept within each row.
    packing: bool | None = None
    # Try the micro-batch on the longest rows first and split it in halves until it fits (CUDA, one process).
    auto_batch: bool | None = None
    # Recompute activations in the backward pass: less memory, about a third more compute.
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer (the first steps are slower while it compiles).
    compile: bool = False
    # What training minimises (train/objective.py): "lm" answer-token cross-entropy over the
    # vocabulary; "labels" cross-entropy over the label set's allowed tokens (what the classifier
    # scores); "mixed" the LM loss plus label_loss_weight times the label-set loss.
    objective: Literal["lm", "labels", "mixed"] = "lm"
    label_loss_weight: float = Field(1.0, gt=0)
    # Prefix-once training: the prompt head every row shares (system prompt, user-turn header)
    # computed once per micro-batch. null: on where it applies (not with packing, gradient
    # checkpointing or sliding-window layers); same loss and gradients as the plain path.
    shared_prefix: bool | None = None
    # Mixed precision: the forward pass under torch.autocast in the base's bfloat16, so the LoRA
    # matmuls run in bf16 against their float32 weights (which the optimizer keeps) instead of
    # casting every activation to float32. null: on when the base runs in bfloat16.
    mixed_precision: bool | None = None
    # Which evaluation's adapter is kept: the lowest validation loss, or (generation runs) the
    # best task metric on `metric_rows` validation rows generated at each evaluation.
    select_by: Literal["val_loss", "metric"] = "val_loss"
    metric_rows: int = Field(32, ge=1)
    # Experiment trackers that get the config, losses, learning rate, tokens/s and the final
    # numbers (docs/tracking.md); each needs its own package (pip install tensorboard, ...).
    report_to: list[Literal["tensorboard", "mlflow", "trackio", "wandb"]] = Field(default_factory=list)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def loss_selected(train: TrainSettings) -> TrainSettings:
    """Refuse `train.select_by: metric` where answers are labels or records (a generation-only setting)."""
    if train.select_by == "metric":
        raise ValueError(
            "select_by: metric picks the adapter by generated text (task.kind: generate); labels and records "
            "already pick by validation loss: remove train.select_by or set it to val_loss"
        )
    return train


def without_label_head(model: ModelConfig, kind: str) -> ModelConfig:
    """Refuse `model.head: linear` where answers are free text (extraction records, generated text)."""
    if model.head != "labels":
        raise ValueError(f"model.head: linear scores a label set; {kind} writes free text: remove model.head")
    return model


class ProjectConfig(_Strict):
    """Everything one run needs; saved resolved as `RUN_DIR/config.yaml`."""

    task: Task
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    run_dir: Path = Path("runs/default")

    @field_validator("train")
    @classmethod
    def _select_by_loss(cls, train: TrainSettings) -> TrainSettings:
        return loss_selected(train)

    @model_validator(mode="after")
    def _head_trains_its_own_loss(self) -> ProjectConfig:
        if self.model.head == "linear" and self.train.objective != "lm":
            raise ValueError(
                f"model.head: linear trains the head's cross-entropy over the labels; train.objective="
                f"{self.train.objective} scores the LM head's label tokens: remove train.objective or set "
                "model.head: labels"
            )
        return self


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["train.epochs=2", "task.name=x"]` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} has no '='", fix="write overrides as key.path=value, e.g. train.epochs=2"
            )
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, section by section (neither is changed)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_paths(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    """Config paths (data files, labels_file, run_dir, a local model.base) made absolute against `root`."""

    def fix(p: Any) -> Any:
        if str(p).startswith("hf:"):  # a Hub dataset id, not a path
            return str(p)
        path = Path(str(p)).expanduser()
        return str(path if path.is_absolute() else root / path)

    raw = dict(raw)
    data = dict(raw.get("data") or {})
    for key in ("train", "validation"):
        if key in data:
            value = data[key]
            data[key] = [fix(v) for v in value] if isinstance(value, list) else [fix(value)]
    if data.get("gold_manifest"):
        data["gold_manifest"] = fix(data["gold_manifest"])
    if data:
        raw["data"] = data
    task = raw.get("task")
    if isinstance(task, dict) and "labels_file" in task:
        raw["task"] = {**task, "labels_file": fix(task["labels_file"])}
    if "run_dir" in raw:
        raw["run_dir"] = fix(raw["run_dir"])
    model = raw.get("model")
    if isinstance(model, dict) and "base" in model:
        base = str(model["base"])
        candidate = root / base
        if not base.startswith("bundled:") and not Path(base).is_absolute() and candidate.exists():
            raw["model"] = {**model, "base": str(candidate)}
    return raw


def build_config(raw: dict[str, Any], *, source: str = "config") -> ProjectConfig:
    """Validate a config dict; errors name the offending key."""
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"  {where}: {msg}")
        raise ConfigError(
            f"{source} is invalid:\n" + "\n".join(problems),
            fix="correct or remove the keys above (see README, 'Configuration')",
        ) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ProjectConfig:
    """Read a YAML config, apply `key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})",
            fix="re-save the config as UTF-8",
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (task, data, ...)")
    raw = resolve_paths(raw, path.parent.resolve())
    # Paths given on the command line are relative to where the command runs.
    extra = resolve_paths(parse_overrides(overrides or []), Path.cwd())
    return build_config(merge(raw, extra), source=str(path))


def dump_config(config: ProjectConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
