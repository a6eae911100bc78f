"""The task: a fixed label set and the instruction that frames it.

A `Task` is the contract the specialist keeps: every answer is exactly one of `labels`.
It also decides the chat messages a text becomes, so training and inference build the
prompt in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    # How a label is written in the answer the model learns and is scored on: "as_written",
    # or "readable" (underscores as spaces: `transfer_money` -> "transfer money"). Predictions,
    # metrics and exports always use the label as written.
    label_text: Literal["as_written", "readable"] = "as_written"
    # Optional one-line descriptions, rendered into the system prompt as "label: description".
    label_descriptions: dict[str, str] = Field(default_factory=dict)

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

    @model_validator(mode="after")
    def _check_label_text(self) -> Task:
        unknown = sorted(set(self.label_descriptions) - set(self.labels))
        if unknown:
            raise ConfigError(
                f"task.label_descriptions: {', '.join(unknown)} not in task.labels",
                fix="describe only labels of the task (check the spelling)",
            )
        seen: dict[str, str] = {}
        for label in self.labels:
            text = self.answer(label)
            if text in seen:
                raise ConfigError(
                    f"task.label_text={self.label_text}: labels {seen[text]!r} and {label!r} both read {text!r}",
                    fix="rename one of the labels, or set task.label_text: as_written",
                )
            seen[text] = label
        return self

    def answer(self, label: str) -> str:
        """The text the model writes (and is scored on) for `label`; `label_of` maps it back."""
        if self.label_text == "readable":
            return " ".join(label.replace("_", " ").split())
        return label

    def label_of(self, answer: str) -> str:
        """The label as written for an answer text (`answer` inverted); KeyError for other text."""
        return {self.answer(label): label for label in self.labels}[answer]

    @property
    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def system_prompt(self) -> str:
        prompt = self.instruction
        if self.list_labels_in_prompt:
            prompt += "\nCategories: " + ", ".join(self.answer(label) for label in self.labels)
        if self.label_descriptions:
            described = (f"{self.answer(k)}: {v}" for k, v in self.label_descriptions.items())
            prompt += "\n" + "\n".join(described)
        return prompt

    def messages(self, text: str, label: str | None = None) -> list[dict[str, str]]:
        """The chat messages for `text`; with `label`, the assistant's answer too."""
        messages = [
            {"role": "system", "content": self.system_prompt()},
        ]
        for shot_text, shot_label in self.examples:
            messages.append({"role": "user", "content": shot_text})
            messages.append({"role": "assistant", "content": self.answer(shot_label)})
        messages.append({"role": "user", "content": text})
        if label is not None:
            messages.append({"role": "assistant", "content": self.answer(label)})
        return messages
