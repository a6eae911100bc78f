"""The teacher client under a flaky local server: retries with backoff, Retry-After honoured,
a clear error after the last retry, bounded concurrency, input order kept, progress reported."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from taskling.cli import app
from taskling.data.retry import RetryPolicy, retry_after_seconds
from taskling.data.teacher import TeacherClient, TeacherError, label_texts, synthesize
from taskling.task import Task

TASK = Task(labels=("billing", "bug"))


class Flaky(BaseHTTPRequestHandler):
    """A chat-completions endpoint whose answers are scripted per user text.

    `scripts[text]` lists what each attempt gets: an HTTP status (with optional headers), a
    number of seconds to stall before answering, or "ok". Past the script's end: "ok".
    The answer is `billing` when the text mentions money, else `bug`."""

    scripts: ClassVar[dict[str, list[Any]]] = {}
    attempts: ClassVar[dict[str, int]] = defaultdict(int)
    hold: ClassVar[dict[str, float]] = {}  # seconds to take over a successful answer
    in_flight: ClassVar[int] = 0
    max_in_flight: ClassVar[int] = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # the http.server API names it
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        with Flaky.lock:
            attempt = Flaky.attempts[text]
            Flaky.attempts[text] += 1
            Flaky.in_flight += 1
            Flaky.max_in_flight = max(Flaky.max_in_flight, Flaky.in_flight)
        try:
            script = Flaky.scripts.get(text, [])
            step = script[attempt] if attempt < len(script) else "ok"
            if isinstance(step, float):  # stall past the client's timeout
                time.sleep(step)
                step = "ok"
            if step == "ok":
                time.sleep(Flaky.hold.get(text, 0.0))
                label = "billing" if "$" in text or "refund" in text else "bug"
                choice = {"index": 0, "message": {"role": "assistant", "content": label}}
                self.reply(200, {"choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
            else:
                status, headers = step if isinstance(step, tuple) else (step, {})
                self.reply(status, {"error": {"message": f"scripted {status}"}}, headers)
        finally:
            with Flaky.lock:
                Flaky.in_flight -= 1

    def reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture
def flaky(server_url: str) -> Iterator[type[Flaky]]:
    Flaky.scripts, Flaky.hold = {}, {}
    Flaky.attempts.clear()
    Flaky.in_flight = Flaky.max_in_flight = 0
    yield Flaky


def client(url: str, tmp_path: Path, waits: list[float], **kwargs: Any) -> TeacherClient:
    """A client that records the waits instead of sleeping through them."""
    kwargs.setdefault("retry", RetryPolicy(max_retries=3, backoff=0.1))
    return TeacherClient(url, "k", "teacher", cache_dir=tmp_path / "cache", sleep=waits.append, seed=0, **kwargs)


def test_429_with_retry_after_seconds_then_200(server_url: str, flaky: type[Flaky], tmp_path: Path) -> None:
    flaky.scripts["refund $5"] = [(429, {"Retry-After": "2"})]
    waits: list[float] = []
    c = client(server_url, tmp_path, waits)
    rows = label_texts(["refund $5"], TASK, c)
    assert [r["label"] for r in rows] == ["billing"]
    assert waits == [2.0] and flaky.attempts["refund $5"] == 2
    assert (c.usage.requests, c.usage.retries) == (1, 1)


def test_429_with_retry_after_http_date(server_url: str, flaky: type[Flaky], tmp_path: Path) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    flaky.scripts["app crashes"] = [(429, {"Retry-After": when})]
    waits: list[float] = []
    label_texts(["app crashes"], TASK, client(server_url, tmp_path, waits))
    assert len(waits) == 1 and 28.0 <= waits[0] <= 30.0  # the date has whole seconds


def test_503_twice_then_200_backs_off_exponentially_with_jitter(
    server_url: str, flaky: type[Flaky], tmp_path: Path
) -> None:
    flaky.scripts["crash on save"] = [503, 503]
    waits: list[float] = []
    rows = label_texts(["crash on save"], TASK, client(server_url, tmp_path, waits))
    assert rows[0]["label"] == "bug" and flaky.attempts["crash on save"] == 3
    assert len(waits) == 2
    assert 0.05 <= waits[0] <= 0.1 and 0.1 <= waits[1] <= 0.2  # backoff 0.1 s x 2**attempt, jitter [0.5, 1]


def test_a_timeout_then_200(server_url: str, flaky: type[Flaky], tmp_path: Path) -> None:
    flaky.scripts["slow refund"] = [1.0]  # the first attempt stalls past the 0.3 s timeout
    waits: list[float] = []
    c = client(server_url, tmp_path, waits, timeout=0.3)
    rows = label_texts(["slow refund"], TASK, c)
    assert rows[0]["label"] == "billing" and flaky.attempts["slow refund"] == 2
    assert c.usage.retries == 1 and len(waits) == 1


def test_a_permanent_500_is_a_clear_error_after_the_last_retry(
    server_url: str, flaky: type[Flaky], tmp_path: Path
) -> None:
    flaky.scripts["always broken"] = [500] * 10
    waits: list[float] = []
    with pytest.raises(TeacherError) as err:
        label_texts(["always broken"], TASK, client(server_url, tmp_path, waits))
    assert err.value.status == 500 and flaky.attempts["always broken"] == 4 and len(waits) == 3
    assert "answered HTTP 500" in str(err.value) and "gave up after 4 attempts" in str(err.value)
    assert err.value.fix and "rerun" in err.value.fix


def test_a_client_error_is_not_retried(server_url: str, flaky: type[Flaky], tmp_path: Path) -> None:
    flaky.scripts["bad key"] = [401]
    waits: list[float] = []
    with pytest.raises(TeacherError, match="HTTP 401") as err:
        label_texts(["bad key"], TASK, client(server_url, tmp_path, waits))
    assert err.value.status == 401 and flaky.attempts["bad key"] == 1 and waits == []


def test_concurrency_is_bounded_and_output_keeps_input_order(
    server_url: str, flaky: type[Flaky], tmp_path: Path
) -> None:
    texts = [f"refund ${i}" if i % 3 == 0 else f"crash {i}" for i in range(16)]
    for i, text in enumerate(texts):
        flaky.hold[text] = 0.2 - 0.01 * i  # early texts finish last
    flaky.scripts[texts[5]] = [503]  # one retry on the way
    calls: list[tuple[int, int]] = []
    c = client(server_url, tmp_path, [], concurrency=4)
    rows = label_texts(texts, TASK, c, progress=lambda done, total: calls.append((done, total)))
    assert flaky.max_in_flight == 4
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == ["billing" if i % 3 == 0 else "bug" for i in range(16)]
    dones = [d for d, _ in calls]
    assert calls[0] == (0, 16) and calls[-1] == (16, 16) and dones == sorted(dones)
    assert len(set(dones)) >= 5  # reported as answers arrive, not only at the end
    assert {t for _, t in calls} == {16}


def test_repeated_texts_are_asked_once(server_url: str, flaky: type[Flaky], tmp_path: Path) -> None:
    c = client(server_url, tmp_path, [])
    rows = label_texts(["refund me", "crash", "refund me"], TASK, c)
    assert [r["label"] for r in rows] == ["billing", "bug", "billing"]
    assert flaky.attempts["refund me"] == 1 and (c.usage.requests, c.usage.cache_hits) == (2, 1)


def test_one_failure_stops_the_batch(server_url: str, flaky: type[Flaky], tmp_path: Path) -> None:
    texts = ["broken"] + [f"crash {i}" for i in range(30)]
    flaky.scripts["broken"] = [500] * 10
    for text in texts[1:]:
        flaky.hold[text] = 0.05
    with pytest.raises(TeacherError, match="HTTP 500"):
        label_texts(texts, TASK, client(server_url, tmp_path, [], concurrency=2, retry=RetryPolicy(max_retries=0)))
    time.sleep(0.1)
    assert sum(flaky.attempts.values()) < len(texts)  # queued requests were cancelled, not sent


def test_synth_runs_categories_concurrently_in_label_order(server_url: str, flaky: type[Flaky], tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    c = client(server_url, tmp_path, [], concurrency=2)
    result = synthesize(TASK, c, per_label=2, progress=lambda d, t: calls.append((d, t)))
    assert c.usage.requests == 2 and calls[-1] == (2, 2)
    # The fake answers a plain label, parsed as one line each: "bug" for both prompts.
    assert [ex.label for ex in result.accepted] + [r["requested"] for r in result.rejected] == ["billing", "bug"]


@pytest.mark.parametrize(
    "header,seconds",
    [
        ("3", 3.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: retry now
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_seconds(header: str | None, seconds: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert retry_after_seconds(header, now) == seconds


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(backoff=1.0, max_backoff=8.0, max_retry_after=20.0)
    rng = random.Random(0)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)]:
        delays = [policy.backoff_delay(attempt, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not constant
    assert policy.delay(0, "600", rng) == 20.0  # a Retry-After is honoured up to the cap


def test_label_cli_concurrency_and_plain_progress(
    server_url: str, flaky: type[Flaky], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLING_TEACHER_BASE_URL", server_url)
    monkeypatch.setenv("TASKLING_CACHE", str(tmp_path / "cache"))
    (tmp_path / "task.yaml").write_text("labels: [billing, bug]\n")
    texts = [f"refund ${i}" if i % 2 else f"crash {i}" for i in range(12)]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    for text in texts:
        flaky.hold[text] = 0.05
    out = tmp_path / "out.jsonl"
    args = ["label", str(tmp_path / "texts.txt"), "--task", str(tmp_path / "task.yaml"), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--concurrency", "3"])
    assert result.exit_code == 0, result.output
    assert flaky.max_in_flight <= 3
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in written] == texts
    assert "12/12 texts" in result.output  # the plain progress line (not a terminal)
