"""The teacher as a serving stage: hard messages go to a bigger model behind an OpenAI-compatible API.

`TeacherStage` answers like a classifier (`predict(texts) -> list[Prediction]`, stage
`"teacher"`) through the teacher client of `taskling.data.teacher`: concurrent requests,
retries with backoff, answers in input order, the on-disk response cache. The teacher is
asked with the label set in its prompt (`label_messages`); an answer outside the set (an
invented label, a sentence) becomes `unknown`, never a label the task does not have. Its
probability is the teacher's token-logprob confidence when the endpoint gives logprobs,
else 1.0 for a label of the set.

`check()` asks the endpoint's `GET /models` once, so a server or a cascade with an
unreachable teacher (or a wrong key) fails when it starts, not on the first hard request.

Settings (`from_settings`; the `teacher` entry of a cascade, or a dict in Python):

    url            the API root, e.g. https://api.openai.com/v1 (required)
    model          the model name (required)
    cost_per_call  dollars per call, for the cost curve (default 0)
    api_key_env    the environment variable holding the key (default TASKLING_TEACHER_API_KEY)
    concurrency    requests at a time (default 8)
    timeout_s      per request (default 30)
    max_retries    retries of a rate-limited or failing request (default 2: a user is waiting)
    cache_dir      the response cache (default ~/.cache/taskling/teacher; it holds message text)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskling.data.retry import RetryPolicy
from taskling.data.teacher import TeacherClient, TeacherError, label_texts
from taskling.errors import ConfigError
from taskling.serve.prediction import UNKNOWN, Prediction
from taskling.task import Task

log = logging.getLogger(__name__)

__all__ = ["STAGE", "TeacherSettings", "TeacherStage"]

STAGE = "teacher"
DEFAULT_KEY_ENV = "TASKLING_TEACHER_API_KEY"
REACHABLE = (200, 404, 405)  # GET /models: listed, or not offered by this server (it still answered)


class TeacherSettings(BaseModel):
    """How to reach the teacher and what a call costs; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    model: str = Field(min_length=1)
    cost_per_call: float = Field(0.0, ge=0)
    api_key_env: str = DEFAULT_KEY_ENV
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(2, ge=0)
    cache_dir: str | None = None


class TeacherStage:
    """The last (or a late) stage of a cascade: the teacher labels what the cheaper stages were unsure of."""

    name = STAGE

    def __init__(
        self, client: TeacherClient, task: Task, *, cost_per_call: float = 0.0, api_key: str | None = None
    ) -> None:
        self.client = client
        self.api_key = api_key  # for `check`; never logged
        self.task = task
        self.cost_per_call = cost_per_call
        self.version = f"teacher:{client.model}"
        # Answers matched leniently: "Balance." or "'balance'" is the label balance.
        self._by_key = {self._key(label): label for label in task.labels}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], task: Task, *, where: str = "teacher") -> TeacherStage:
        """A stage from settings (see the module docstring); `where` names them in errors (a file, a key)."""
        try:
            parsed = TeacherSettings.model_validate(dict(settings))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(settings)'}: {e['msg']}" for e in err.errors())
            raise ConfigError(
                f"{where}: {problems}",
                fix="give url and model; optional: cost_per_call, api_key_env, concurrency, timeout_s, max_retries",
            ) from None
        key = os.environ.get(parsed.api_key_env)
        if parsed.api_key_env != DEFAULT_KEY_ENV and not key:
            raise ConfigError(
                f"{where}: the environment variable {parsed.api_key_env} (api_key_env) is not set",
                fix=f"export {parsed.api_key_env}=YOUR_KEY before starting",
            )
        client = TeacherClient(
            parsed.url,
            key or None,
            parsed.model,
            cache_dir=Path(parsed.cache_dir) if parsed.cache_dir else None,
            timeout=parsed.timeout_s,
            retry=RetryPolicy(max_retries=parsed.max_retries, backoff=0.5, max_backoff=5.0, max_retry_after=10.0),
            concurrency=parsed.concurrency,
        )
        return cls(client, task, cost_per_call=parsed.cost_per_call, api_key=key)

    def check(self) -> None:
        """Fail now (a TeacherError naming the URL) when the endpoint is unreachable or refuses the key."""
        import httpx

        url = f"{self.client.base_url}/models"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            status = httpx.get(url, headers=headers, timeout=min(self.client.timeout, 10.0)).status_code
        except httpx.HTTPError as err:
            raise TeacherError(
                f"the teacher at {self.client.base_url} is unreachable: {type(err).__name__}: {err}",
                fix="check the teacher url in cascade.json (an OpenAI-compatible API root, e.g. https://host/v1)",
            ) from None
        if status in (401, 403):
            raise TeacherError(
                f"the teacher at {self.client.base_url} refused the API key (HTTP {status})",
                fix="export the right key in the variable named by api_key_env (default TASKLING_TEACHER_API_KEY)",
            )
        if status not in REACHABLE:
            raise TeacherError(
                f"the teacher at {url} answered HTTP {status}",
                fix="check that the url is an OpenAI-compatible API root and the service is up",
            )
        log.info("teacher %s at %s is reachable", self.client.model, self.client.base_url)

    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> list[Prediction]:
        """One Prediction per text, in order; an answer outside the label set is `unknown`."""
        if not texts:
            return []
        rows = label_texts(list(texts), self.task, self.client)
        return [self._prediction(text, row) for text, row in zip(texts, rows, strict=True)]

    def __repr__(self) -> str:  # never show the key
        return f"TeacherStage({self.client!r}, cost_per_call={self.cost_per_call})"

    def __call__(self, text: str) -> Prediction:
        return self.predict([text])[0]

    def _prediction(self, text: str, row: Mapping[str, Any]) -> Prediction:
        label = self._by_key.get(self._key(str(row.get("label", ""))))
        probabilities = dict.fromkeys(self.task.labels, 0.0)
        if label is None:
            log.info("the teacher answered %r, not a label of the set: unknown", str(row.get("label"))[:80])
            return Prediction(text, UNKNOWN, 0.0, probabilities, stage=STAGE)
        confidence = float(row.get("confidence", 1.0))
        probabilities[label] = confidence
        return Prediction(text, label, confidence, probabilities, stage=STAGE)

    @staticmethod
    def _key(answer: str) -> str:
        return answer.strip().strip("\"'`.").strip().casefold()
