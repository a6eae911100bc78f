"""When to retry an HTTP request and how long to wait: the teacher client's retry policy.

Rate limits (429), server errors (500, 502, 503, 504, and 408 / 409 that OpenAI-style APIs
send for transient conflicts) and timeouts are retried; anything else (401 bad key, 404
wrong model, 400 bad request) is the caller's mistake and fails at once. The wait is the
server's `Retry-After` when it sends one (seconds or an HTTP-date), else exponential backoff
with jitter, so many clients that failed together do not retry together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` more attempts after the first; waits of `backoff * 2**attempt` seconds
    (at most `max_backoff`), scaled by a random factor in [0.5, 1]; a `Retry-After` is
    honoured up to `max_retry_after` seconds."""

    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    max_retry_after: float = 300.0

    def backoff_delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt counts from 0)."""
        ceiling = min(self.max_backoff, self.backoff * 2.0**attempt)
        return ceiling * (0.5 + 0.5 * rng.random())

    def delay(self, attempt: int, retry_after: str | None, rng: random.Random, now: datetime | None = None) -> float:
        """The server's Retry-After when it gives a usable one, else the backoff delay."""
        asked = retry_after_seconds(retry_after, now)
        if asked is not None:
            return min(asked, self.max_retry_after)
        return self.backoff_delay(attempt, rng)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A `Retry-After` header as seconds to wait: `"3"`, `"1.5"` or an HTTP-date
    (`"Wed, 21 Oct 2015 07:28:00 GMT"`, a date in the past meaning 0); None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)
