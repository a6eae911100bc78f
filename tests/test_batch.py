"""Batch inference: the local engine against the classifier, and Ray against the local engine row by row."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from taskling.errors import DataError, TasklingError
from taskling.serve.batch import RESULT_COLUMNS, predict_batch, read_table
from taskling.serve.classifier import Classifier

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rows = [json.loads(line) for line in (FIXTURES / "clinc8_gold.jsonl").read_text().splitlines()][:48]
    return pd.DataFrame({"id": range(len(rows)), "text": [r["text"] for r in rows], "gold": [r["label"] for r in rows]})


def write_input(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_local_engine_matches_the_classifier(
    trained_run: Path, frame: pd.DataFrame, tmp_path: Path, suffix: str
) -> None:
    src = write_input(frame, tmp_path / f"in{suffix}")
    result = predict_batch(trained_run, src, tmp_path / f"out{suffix}")
    out = read_table(result.output_path)
    assert result.rows == len(frame) == len(out)
    assert list(out.columns) == ["id", "text", "gold", *RESULT_COLUMNS]
    assert out["id"].tolist() == frame["id"].tolist()
    preds = Classifier.from_run(trained_run).predict(frame["text"].tolist())
    assert out["label"].tolist() == [p.label for p in preds]
    for got, p in zip(out.itertuples(), preds, strict=True):
        assert got.probability == pytest.approx(p.probability, abs=1e-6)
        assert json.loads(got.probabilities) == pytest.approx(p.probabilities, abs=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"in{suffix}", f"out{suffix}"]  # no temp file left


def test_a_null_text_names_the_row_and_writes_nothing(trained_run: Path, frame: pd.DataFrame, tmp_path: Path) -> None:
    broken = frame.copy()
    broken.loc[5, "text"] = None
    src = write_input(broken, tmp_path / "in.parquet")
    with pytest.raises(DataError, match=r"in\.parquet: row 6 has no text"):
        predict_batch(trained_run, src, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.parquet"]  # no temp file left either


def test_missing_text_column_and_bad_suffix_are_user_errors(
    trained_run: Path, frame: pd.DataFrame, tmp_path: Path
) -> None:
    src = write_input(frame.rename(columns={"text": "message"}), tmp_path / "in.jsonl")
    with pytest.raises(DataError, match="no column 'text'"):
        predict_batch(trained_run, src, tmp_path / "out.jsonl")
    out = predict_batch(trained_run, src, tmp_path / "out.jsonl", text_field="message")
    assert out.rows == len(frame)
    with pytest.raises(DataError, match=r"unsupported file type \.txt"):
        predict_batch(trained_run, src, tmp_path / "out.txt")
    with pytest.raises(TasklingError, match="unknown engine"):
        predict_batch(trained_run, src, tmp_path / "out.jsonl", engine="spark")


# The Ray half runs in its own interpreter: Ray leaves gRPC threads in the process after
# `ray.shutdown()`, and a later test's fork could then hang in gRPC's fork handlers (it did
# once in CI, in the forked child of a test that ran after this one).
RAY_SCRIPT = """
import json, sys
import ray
from taskling.errors import TasklingError
from taskling.serve.batch import predict_batch

run, src, out, broken, failed = sys.argv[1:]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
try:
    result = predict_batch(run, src, out, engine="ray", workers=2, batch_size=16)
    try:
        predict_batch(run, broken, failed, engine="ray", workers=1)
        error = None
    except TasklingError as err:
        error = str(err)
finally:
    ray.shutdown()
print(json.dumps({"rows": result.rows, "output_path": str(result.output_path), "error": error}))
"""


@pytest.mark.slow  # a local Ray cluster and its workers take ~60 s to start on 2 busy cores
def test_ray_engine_equals_the_local_engine_row_by_row(trained_run: Path, frame: pd.DataFrame, tmp_path: Path) -> None:
    import subprocess
    import sys

    pytest.importorskip("ray")
    big = pd.concat([frame] * 3, ignore_index=True).assign(id=lambda f: range(len(f)))
    src = tmp_path / "in.parquet"
    # Several files' worth of row groups, so Ray has several blocks to spread over its workers.
    big.to_parquet(src, index=False, row_group_size=24)
    local = read_table(predict_batch(trained_run, src, tmp_path / "local.parquet", batch_size=16).output_path)
    broken = write_input(
        frame.assign(text=[None if i == 3 else t for i, t in enumerate(frame["text"])]), tmp_path / "b.jsonl"
    )
    args = [trained_run, src, tmp_path / "ray.parquet", broken, tmp_path / "broken.jsonl"]
    done = subprocess.run(
        [sys.executable, "-c", RAY_SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and "b.jsonl: row 4 of a Ray block has no text" in result["error"]
    assert not (tmp_path / "broken.jsonl").exists()
    remote = read_table(Path(result["output_path"]))
    assert result["rows"] == len(big)
    assert list(remote.columns) == list(local.columns)
    assert pq.read_schema(result["output_path"]) == pq.read_schema(tmp_path / "local.parquet")
    assert remote.dtypes.tolist() == local.dtypes.tolist()
    assert remote["id"].tolist() == local["id"].tolist()
    assert remote["label"].tolist() == local["label"].tolist()
    # Rows are batched per Ray block, so padding (float32 summation order) differs slightly.
    assert remote["probability"].tolist() == pytest.approx(local["probability"].tolist(), abs=1e-4)
    for a, b in zip(remote["probabilities"], local["probabilities"], strict=True):
        assert json.loads(a) == pytest.approx(json.loads(b), abs=1e-4)


def test_cli_predict_batch(trained_run: Path, frame: pd.DataFrame, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from taskling.cli import app

    src = write_input(frame.head(10), tmp_path / "in.jsonl")
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(app, ["predict-batch", str(trained_run), str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 10 rows" in result.output
    assert read_table(out)["label"].isin(Classifier.from_run(trained_run).task.labels).all()
    missing = CliRunner().invoke(
        app, ["predict-batch", str(trained_run), str(tmp_path / "nope.csv"), "--out", str(out)]
    )
    assert missing.exit_code == 2 and "file does not exist" in " ".join(missing.output.split())
