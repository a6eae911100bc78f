"""Property: hostile unicode through `taskling classify`, `taskling logs` and the HTTP endpoints.

Inputs mix rich markup (`[/]`, `[bold]`), chat control tokens (`<|im_end|>`,
`<start_of_turn>`), lone surrogates, NUL and 50,000-character strings. For any of them:
no traceback; exit codes are the documented ones (classify: 0 all classified, 1 some rows
flagged; logs: 0); one output row per input row; every error body has the one shape; every
acknowledged (2xx) request is in predictions.db.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from taskling.serve.classifier import Classifier
from taskling.serve.predlog import LogRow, PredictionLog, count_rows
from taskling.serve.server import ServeSettings, build_engine, create_app

HOSTILE = [
    "[/]",
    "[bold]",
    "[/bold]",
    "[red]x[/red]",
    "[link=http://x]y",
    ":smile:",
    "\\[",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "<start_of_turn>model\n",
    "<end_of_turn>",
    "\x00",
    "\ud800",
    "\udfff",
    "\x1b[31m",
    "\r",
    "\u2028",
    "\ufeff",
    " ",
    "",
]
piece = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=8))
hostile = st.one_of(
    st.lists(piece, max_size=6).map("".join),
    st.builds(lambda p, n: (p or "x") * n, st.sampled_from(HOSTILE), st.integers(1, 50_000)).map(lambda t: t[:50_000]),
)
FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
runner = CliRunner()


def is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.fixture(scope="module")
def cached(trained_run: Path) -> Classifier:
    return Classifier.from_run(trained_run, dtype="float32", device="cpu")


@pytest.fixture
def fast_cli(cached: Classifier, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The CLI with the model loaded once for all examples (loading is not what is under test)."""
    from taskling.cli import app

    monkeypatch.setattr(Classifier, "from_run", classmethod(lambda cls, *a, **k: cached))
    return app


def no_traceback(result: Any) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


@FUZZ
@given(st.lists(hostile, min_size=1, max_size=3))
def test_classify_arguments(fast_cli: Any, trained_run: Path, texts: list[str]) -> None:
    for as_json in (True, False):
        result = runner.invoke(fast_cli, ["classify", str(trained_run), *(["--json"] if as_json else []), "--", *texts])
        no_traceback(result)
        flagged = [not t.strip() or not is_text(t) for t in texts]
        assert result.exit_code == (1 if any(flagged) else 0), result.output
        if as_json:
            rows = [json.loads(line) for line in result.stdout.split("\n") if line]
            assert len(rows) == len(texts)
            assert [("error" in r) for r in rows] == flagged
            assert [r["text"] for r in rows if "text" in r] == [t for t, f in zip(texts, flagged, strict=True) if not f]


@FUZZ
@given(st.lists(hostile, min_size=1, max_size=4))
def test_classify_file(fast_cli: Any, trained_run: Path, tmp_path: Path, texts: list[str]) -> None:
    data = "\n".join(texts).encode("utf-8", "surrogatepass") + b"\n"
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    lines = data.split(b"\n")[:-1]

    def bad(raw: bytes) -> bool:
        try:
            return not raw.removesuffix(b"\r").decode("utf-8").strip()
        except UnicodeDecodeError:
            return True

    result = runner.invoke(fast_cli, ["classify", str(trained_run), "--file", str(path), "--json"])
    no_traceback(result)
    rows = [json.loads(line) for line in result.stdout.split("\n") if line]
    assert len(rows) == len(lines)  # one output row per input line, never a shift
    assert [r.get("line") for r in rows] == [n if bad(raw) else None for n, raw in enumerate(lines, start=1)]
    assert result.exit_code == (1 if any(bad(raw) for raw in lines) else 0)
    table = runner.invoke(fast_cli, ["classify", str(trained_run), "--file", str(path)])
    no_traceback(table)
    assert table.exit_code == result.exit_code


@FUZZ
@given(st.lists(st.tuples(hostile, hostile, hostile), min_size=1, max_size=3))
def test_logs(tmp_path: Path, rows: list[tuple[str, str, str]]) -> None:
    from taskling.cli import app

    db = tmp_path / f"{uuid.uuid4().hex}.db"  # tmp_path is shared by the examples; each gets its own log
    url = f"sqlite:///{db}"
    plog = PredictionLog(url)
    logged = [(t, label, ad) for t, label, ad in rows if is_text(t + label + ad)]  # the server refuses the rest
    plog.write([LogRow("r", ad, "v", t, label, 0.5, {label: 0.5}, 1.0) for t, label, ad in logged])
    plog.close()
    result = runner.invoke(app, ["logs", "unused", "--url", url])
    no_traceback(result)
    assert result.exit_code == 0
    out = db.with_suffix(".jsonl")
    result = runner.invoke(app, ["logs", "unused", "--url", url, "--export", str(out)])
    assert result.exit_code == 0
    exported = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert [(r["text"], r["label"], r["adapter"]) for r in exported] == logged


@pytest.fixture(scope="module")
def client(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzzsrv') / 'log.db'}"
    engine = build_engine(trained_run, ServeSettings(log_url=url, threads=1, dtype="float32", max_text_chars=30_000))
    with TestClient(create_app(engine)) as c:
        c.db_url = url  # type: ignore[attr-defined]
        yield c


def check(client: Any, endpoint: str, body: dict[str, Any], n_texts: int) -> None:
    before = count_rows(client.db_url)
    resp = client.post(endpoint, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert resp.status_code in (200, 400, 413, 422), resp.text[:300]
    payload = resp.json()
    if resp.status_code != 200:
        assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "code", "param"}
        assert payload["error"]["code"] == resp.status_code
        assert count_rows(client.db_url) == before
        return
    assert count_rows(client.db_url) == before + n_texts  # acknowledged means logged


@FUZZ
@given(st.lists(hostile, min_size=1, max_size=3))
def test_http_classify(client: Any, texts: list[str]) -> None:
    check(client, "/v1/classify", {"texts": texts}, len(texts))


@FUZZ
@given(hostile)
def test_http_chat(client: Any, text: str) -> None:
    check(client, "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": text}]}, 1)
