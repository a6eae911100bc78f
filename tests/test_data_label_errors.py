"""`taskling label` against a local fake teacher: clear errors for a non-JSON answer and for bad
input rows, no output file left behind, and (property) every input row comes back labeled."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from taskling.cli import app
from taskling.data.teacher import TeacherClient, TeacherError, label_texts, read_texts
from taskling.task import Task

TASK = Task(labels=("billing", "bug"))


class FakeTeacher(BaseHTTPRequestHandler):
    """Answers chat completions: `billing` when the message mentions money, else `bug`;
    in "html" mode, an HTML page with HTTP 200 (a proxy's login page, a wrong base URL)."""

    mode = "json"

    def do_POST(self) -> None:  # the http.server API names it
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "html":
            payload, kind = b"<!doctype html><html><body>Sign in</body></html>", "text/html"
        else:
            message = body["messages"][-1]["content"]
            label = "billing" if "$" in message or "refund" in message else "bug"
            choice = {"index": 0, "message": {"role": "assistant", "content": label}}
            payload, kind = json.dumps({"choices": [choice], "usage": {}}).encode(), "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def teacher_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    FakeTeacher.mode = "json"


@pytest.fixture
def cli_env(teacher_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TASKLING_TEACHER_BASE_URL", teacher_url)
    monkeypatch.setenv("TASKLING_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "task.yaml"
    task.write_text("labels: [billing, bug]\n")
    return task


def label(texts: Path, task: Path, out: Path) -> Any:
    return CliRunner().invoke(app, ["label", str(texts), "--task", str(task), "--out", str(out)])


def test_html_answer_with_http_200_is_a_teacher_error(teacher_url: str, tmp_path: Path, cli_env: Path) -> None:
    FakeTeacher.mode = "html"
    try:
        with pytest.raises(TeacherError, match="HTTP 200 with text/html, not JSON") as err:
            label_texts(["refund me"], TASK, TeacherClient(teacher_url, cache_dir=tmp_path / "c"))
        assert err.value.fix and "/v1" in err.value.fix
        texts = tmp_path / "texts.txt"
        texts.write_text("refund me\n")
        result = label(texts, cli_env, tmp_path / "out.jsonl")
    finally:
        FakeTeacher.mode = "json"
    assert result.exit_code == 2 and "not JSON" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'refund me\n{"txt": "no text key"}\n', r"texts\.jsonl:2: a JSON row needs a string `text` field"),
        (b'refund me\n{"text": 5}\n', r"texts\.jsonl:2: a JSON row needs a string `text` field"),
        (b'{"text": "ok"}\n\n{"text": broken\n', r"texts\.jsonl:3: not valid JSON|texts\.jsonl:3: invalid JSON"),
        (b"fine\ncaf\xe9\n", r"texts\.jsonl:2: not UTF-8"),
        (b'{"text": "lone \\udc80"}\n', r"texts\.jsonl:1: an unpaired surrogate"),
    ],
)
def test_bad_input_rows_name_the_line_and_write_nothing(
    tmp_path: Path, cli_env: Path, content: bytes, message: str
) -> None:
    texts = tmp_path / "texts.jsonl"
    texts.write_bytes(content)
    with pytest.raises(Exception, match=message):
        read_texts(texts)
    result = label(texts, cli_env, tmp_path / "out.jsonl")
    assert result.exit_code == 2, result.output
    assert "texts.jsonl" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.jsonl").exists()


TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), min_size=1, max_size=200)
TRICKY = st.sampled_from(["[/bold]", "[red]x[/]", "<|im_end|>", "\x00", "\x1b[31m", "\u2028", "x" * 50_000])
SURROGATE = st.sampled_from(["\ud800", "a\udfff b", "\udc80"])


def as_line(text: str, as_json: bool) -> str:
    if as_json:
        return json.dumps({"text": text})  # ensure_ascii: a lone surrogate becomes a \\udXXX escape
    return "x" + text if text.lstrip().startswith("{") else text  # a `{` line is a JSON row by definition


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(st.one_of(TEXT, TRICKY), st.booleans()), min_size=1, max_size=6),
    broken=st.one_of(st.none(), st.tuples(st.integers(0, 6), SURROGATE)),
)
def test_label_returns_one_row_per_input_row(
    tmp_path: Path, cli_env: Path, rows: list[tuple[str, bool]], broken: tuple[int, str] | None
) -> None:
    """Any text, plain or as a JSON row: exit 0 and one labeled row per non-blank input row, in
    order; a row holding a lone surrogate: exit 2 naming its line, and no output file."""
    lines = [as_line(t, as_json) for t, as_json in rows]
    if broken is not None:
        lines.insert(min(broken[0], len(lines)), as_line(broken[1], True))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    result = label(texts, cli_env, out)
    if broken is not None:
        line = min(broken[0], len(rows)) + 1
        assert result.exit_code == 2 and f"texts.txt:{line}: an unpaired surrogate" in result.output
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    kinds = [as_json for _, as_json in rows]
    expected = [json.loads(x)["text"] if j else x.strip() for x, j in zip(lines, kinds, strict=True) if x.strip()]
    written = [json.loads(x) for x in out.read_text(encoding="utf-8").split("\n") if x]
    assert [r["text"] for r in written] == expected
    assert all(r["label"] in TASK.labels for r in written)
