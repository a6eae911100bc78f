"""`taskling push RUN_DIR REPO`: a run's adapter and a model card on the Hugging Face Hub.

The upload holds what a user needs to load the adapter with peft (`adapter_config.json`,
`adapter_model.safetensors`), the tokenizer carrying the exact training chat template,
`run.json` (labels, label answers, base model, versions) and, when the run has them,
`metrics.json` and `gate.json`. `README.md` is the model card: the base model, the labels,
the gate's verdict with each check, and the gold-set metrics. Uploaded with huggingface_hub's
`HfApi.create_repo` and `upload_folder`, so the token comes from `HF_TOKEN` or `hf auth login`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskling.export.common import ExportError
from taskling.io import read_json, write_text
from taskling.rundir import RunDir, read_manifest

log = logging.getLogger(__name__)


@dataclass
class PushResult:
    repo_id: str
    url: str
    files: list[str]


def _metrics_rows(metrics: dict[str, Any]) -> list[str]:
    rows = ["| metric | value |", "|---|---|"]
    for key in ("accuracy", "macro_f1", "worst_category", "worst_category_accuracy", "out_of_label_set_rate"):
        if key in metrics:
            value = metrics[key]
            rows.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return rows


def _gate_lines(gate: dict[str, Any]) -> list[str]:
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    lines = [f"**Gate: {verdict}** against `{gate.get('reference', '?')}` on {gate.get('n', '?')} gold rows "
             f"({gate.get('assessment', '')}).", "", "| check | passed | detail |", "|---|---|---|"]  # fmt: skip
    for check in gate.get("checks", []):
        detail = str(check.get("detail", "")).replace("|", "\\|")
        lines.append(f"| {check.get('name')} | {'yes' if check.get('passed') else 'no'} | {detail} |")
    return lines


def model_card(run_dir: str | Path, repo_id: str) -> str:
    """The README.md pushed with the adapter: base, labels, gate verdict and metrics."""
    run = RunDir(run_dir)
    manifest = read_manifest(run.root)
    labels = list(manifest["task"]["labels"])
    base = str(manifest["base_model"])
    front = ["---", "library_name: peft", "tags:", "- taskling", "- lora", "- text-classification"]
    if "/" in base and not base.startswith(("bundled:", "/", ".")) and not Path(base).exists():
        front.append(f"base_model: {base}")
    lines = [*front, "---", "", f"# {repo_id.split('/')[-1]}", ""]
    lines += [f"A LoRA adapter trained with taskling to classify text into {len(labels)} labels.", ""]
    lines += [f"- base model: `{base}`", f"- task: `{manifest['task']['name']}`",
              f"- labels: {', '.join(f'`{label}`' for label in labels)}",
              f"- taskling {manifest.get('taskling_version', '?')}", ""]  # fmt: skip
    if run.gate.is_file():
        lines += ["## Ship gate", "", *_gate_lines(read_json(run.gate)), ""]
    else:
        lines += ["## Ship gate", "", "Not gated: this run has no gate.json (`taskling gate`).", ""]
    if run.metrics.is_file():
        lines += ["## Metrics on the gold set", "", *_metrics_rows(read_json(run.metrics)), ""]
    lines += ["## Use", "", "```bash", f"taskling classify {repo_id} \"your text\"   # after: hf download {repo_id}",
              "```", "", "With peft: `PeftModel.from_pretrained(base, REPO)`; the tokenizer here carries the "
              "chat template the adapter was trained with.", ""]  # fmt: skip
    return "\n".join(lines)


def stage(run_dir: str | Path, repo_id: str, folder: Path) -> list[str]:
    """Copy what is pushed into `folder`; returns the relative paths."""
    run = RunDir(run_dir)
    if not run.is_finished():
        raise ExportError(f"{run.root} is not a finished run (no run.json or adapter)", fix="train it first")
    for path in run.adapter.iterdir():
        if path.is_file() and path.name != "README.md":
            shutil.copy2(path, folder / path.name)
    shutil.copytree(run.tokenizer, folder / "tokenizer")
    for path in (run.manifest, run.metrics, run.gate, run.summary):
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    write_text(folder / "README.md", model_card(run.root, repo_id))
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def push(
    run_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None, api: Any = None
) -> PushResult:
    """Create `repo_id` (if needed) and upload the run's adapter, tokenizer and model card."""
    from huggingface_hub import HfApi

    hub = api if api is not None else HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="taskling-push-") as tmp:
        files = stage(run_dir, repo_id, Path(tmp))
        repo = hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        hub.upload_folder(
            folder_path=tmp, repo_id=repo_id, repo_type="model", commit_message=f"taskling push {Path(run_dir).name}"
        )
    url = str(getattr(repo, "url", None) or f"https://huggingface.co/{repo_id}")
    log.info("pushed %d files to %s", len(files), url)
    return PushResult(repo_id, url, files)
