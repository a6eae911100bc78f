"""The task: a fixed label set and the instruction that frames it.

A `Task` is the contract the specialist keeps: every answer is exactly one of `labels`.
It also decides the chat messages a text becomes, so training and inference build the
prompt in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from taskling.errors import ConfigError

DEFAULT_INSTRUCTION = "Classify the user's message. Answer with exactly one category name."


class Task(BaseModel):
    """A single-label classification task over a fixed label set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "task"
    labels: tuple[str, ...]
    instruction: str = DEFAULT_INSTRUCTION
    # Listing the labels in the system prompt helps zero-shot use but costs tokens on every
    # call; a fine-tuned adapter learns the set, so it is off by default.
    list_labels_in_prompt: bool = False
    # Few-shot prompting of a base model without an adapter: (text, label) pairs rendered
    # as earlier user/assistant turns. Empty by default, so prompts are unchanged.
    examples: tuple[tuple[str, str], ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _labels_from_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and "labels_file" in data:
            data = dict(data)
            path = Path(data.pop("labels_file"))
            if "labels" in data:
                raise ConfigError("task: give either `labels` or `labels_file`, not both")
            if not path.is_file():
                raise ConfigError(
                    f"task.labels_file: {path} does not exist",
                    fix="point labels_file at a text file with one label a line",
                )
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as err:
                line = err.object[: err.start].count(b"\n") + 1
                raise ConfigError(
                    f"task.labels_file: {path}:{line} is not UTF-8 text", fix="re-save the labels file as UTF-8"
                ) from None
            data["labels"] = [line.strip() for line in lines if line.strip()]
        return data

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(label.strip() for label in labels)
        if len(cleaned) < 2:
            raise ValueError("a classification task needs at least 2 labels")
        if any(not label for label in cleaned):
            raise ValueError("labels must be non-empty strings")
        dupes = sorted({label for label in cleaned if cleaned.count(label) > 1})
        if dupes:
            raise ValueError(f"labels must be unique; repeated: {', '.join(dupes)}")
        return cleaned

    @property
    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def system_prompt(self) -> str:
        if not self.list_labels_in_prompt:
            return self.instruction
        return self.instruction + "\nCategories: " + ", ".join(self.labels)

    def messages(self, text: str, label: str | None = None) -> list[dict[str, str]]:
        """The chat messages for `text`; with `label`, the assistant's answer too."""
        messages = [
            {"role": "system", "content": self.system_prompt()},
        ]
        for shot_text, shot_label in self.examples:
            messages.append({"role": "user", "content": shot_text})
            messages.append({"role": "assistant", "content": shot_label})
        messages.append({"role": "user", "content": text})
        if label is not None:
            messages.append({"role": "assistant", "content": label})
        return messages
