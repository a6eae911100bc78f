"""Exports: ship a trained run to the runtimes people deploy on.

`export(run_dir, to=...)` writes one directory per format, atomically (a temp directory
renamed into place), each with a `manifest.json` listing every file's sha256, the source
run, the base model, the labels and the taskling version:

    merged   model.safetensors + config + tokenizer carrying the training chat template
    gguf     model.gguf (f16, q8_0, q4_0; q4_K_M with llama.cpp) with llama.cpp tensor names,
             hyperparameters, the tokenizer and `tokenizer.chat_template`; Llama, Qwen3, Gemma 3
    ollama   model.gguf + a Modelfile whose TEMPLATE is the training chat template in Go
             template syntax, with its stop tokens, the task instruction as SYSTEM, temperature 0
    vllm     adapter/ (peft) + launch.sh (`vllm serve BASE --enable-lora --lora-modules ...`)
             + request.json asking for a structured-output `choice` over the label set

Every export is checked before it is renamed into place: the merged model must predict the
labels `Classifier.from_run` predicts; a GGUF is read back with `gguf.GGUFReader`, loaded by
transformers' GGUF loader (an independent reader that undoes llama.cpp's q/k permutation) and
its logits compared to the merged model's, and its tokenizer must produce the same ids; the
Ollama template must render exactly what the Jinja template renders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from taskling.export.common import (
    LOGIT_TOLERANCE,
    NEAR_TIE,
    WEIGHT_TOLERANCE,
    ExportError,
    RunInfo,
    compare_predictions,
    load_run,
    merged_model,
    sample_texts,
    sha256_file,
)
from taskling.io import read_json, write_json, write_text
from taskling.model.head import is_head_run
from taskling.model.loader import load_model, load_tokenizer
from taskling.rundir import RunDir
from taskling.version import __version__

log = logging.getLogger(__name__)

# Re-exported: callers import these from here (`from taskling.export.exporter import ExportError`).
__all__ = [
    "LOGIT_TOLERANCE",
    "NEAR_TIE",
    "WEIGHT_TOLERANCE",
    "ExportError",
    "ExportResult",
    "RunInfo",
    "compare_predictions",
    "export",
    "load_run",
    "merged_model",
    "ollama_template",
    "render_go_template",
    "sample_texts",
]

FORMATS = ("merged", "gguf", "ollama", "vllm")
# q4_K_M (what Ollama users expect) needs llama.cpp's llama-quantize; q4_0 is built in.
QUANTS = ("f16", "q8_0", "q4_0", "q4_K_M")
MERGED_DTYPES = ("float32", "bfloat16", "float16")
GGUF_NAME = "model.gguf"
# vLLM accepts only these --max-lora-rank values.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    files: dict[str, str]  # relative path -> sha256
    checks: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- writing


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temp directory beside `out`; on success it replaces `out` in one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # Only a previous export is replaced; the old one is moved aside first so a reader
        # never sees a half-written directory.
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_manifest(
    directory: Path, run: RunInfo, fmt: str, quant: str | None, checks: dict[str, Any]
) -> dict[str, str]:
    """Write manifest.json (every other file's sha256 and size, the source, the labels)."""
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = {
        "format": fmt,
        "quant": quant,
        "taskling_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_run": str(run.run_dir),
        "base_model": run.manifest["base_model"],
        "base_model_path": run.base_path,
        "task": {
            "name": run.task.name,
            "labels": list(run.task.labels),
            "system_prompt": run.task.system_prompt(),
            # what the model writes -> the label as written (differs with task.label_text: readable)
            "answer_to_label": {run.task.answer(label): label for label in run.task.labels},
        },
        "chat_template_sha256": hashlib.sha256(run.chat_template.encode()).hexdigest(),
        "files": {name: {"sha256": sha, "bytes": (directory / name).stat().st_size} for name, sha in files.items()},
        "checks": checks,
    }
    write_json(directory / "manifest.json", manifest)
    return files


def default_out(run_dir: Path, fmt: str, quant: str) -> Path:
    suffix = f"-{quant}" if fmt in ("gguf", "ollama") else ""
    return RunDir(run_dir).exports / f"{fmt}{suffix}"


def export(
    run_dir: str | Path,
    to: str,
    out: str | Path | None = None,
    *,
    quant: str = "f16",
    dtype: str = "float32",
    verify: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Export a finished run to `to` (merged, gguf, ollama or vllm) and check the result.

    Writes into `out` (default RUN_DIR/exports/FORMAT[-QUANT]) atomically; an existing
    directory is replaced only when it is itself a taskling export. `quant` applies to
    gguf and ollama, `dtype` (the saved weights) to merged. `progress(done, 3)` is called
    after each of the three steps: the run loaded, the format written and checked, the
    manifest written.
    """
    report = progress or (lambda done, total: None)
    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}", fix=f"use one of: {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise ExportError(f"unknown GGUF quantization {quant!r}", fix=f"use one of: {', '.join(QUANTS)}")
    if dtype not in MERGED_DTYPES:
        raise ExportError(f"unknown dtype {dtype!r} for merged weights", fix=f"use one of: {', '.join(MERGED_DTYPES)}")
    run = load_run(run_dir)
    if is_head_run(run.manifest):
        raise ExportError(
            f"{run_dir} classifies with a linear label head (model.head: linear); merged weights, GGUF, "
            "Ollama and vLLM runtimes score labels with the LM head and would drop it",
            fix=f"serve the run with taskling (taskling serve {run_dir}), or copy its adapter/ folder, "
            "which carries the head; retrain with model.head: labels for these formats",
        )
    report(1, 3)
    out_dir = Path(out) if out is not None else default_out(run.run_dir, to, quant)
    if out_dir.exists() and not (out_dir / "manifest.json").is_file():
        raise ExportError(
            f"{out_dir} exists and is not a taskling export; refusing to replace it",
            fix="choose another --out, or remove that directory",
        )
    with atomic_dir(out_dir) as tmp:
        if to == "merged":
            checks = write_merged(run, tmp, quant=quant, verify=verify, dtype=dtype)
        else:
            writer = {"gguf": write_gguf_dir, "ollama": write_ollama, "vllm": write_vllm}[to]
            checks = writer(run, tmp, quant=quant, verify=verify)
        report(2, 3)
        files = write_manifest(tmp, run, to, quant if to in ("gguf", "ollama") else None, checks)
    report(3, 3)
    log.info("exported %s to %s (%d files)", to, out_dir, len(files) + 1)
    return ExportResult(out_dir, to, files, checks)


# ---------------------------------------------------------------- shared helpers for the formats


def _placeholder(tag: str) -> str:
    return f"@@taskling-{tag}@@"


def split_rendering(rendered: str, parts: Sequence[str]) -> list[str] | None:
    """Cut `rendered` at each of `parts` (each must occur exactly once, in order)."""
    pieces: list[str] = []
    rest = rendered
    for part in parts:
        if rendered.count(part) != 1 or part not in rest:
            return None
        head, rest = rest.split(part, 1)
        pieces.append(head)
    pieces.append(rest)
    return pieces


_GO_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.S)


def render_go_template(template: str, system: str | None, prompt: str) -> str:
    """Render the Go-template subset the Ollama export writes (enough to check it).

    Supports literal text, `{{ .System }}`, `{{ .Prompt }}` and `{{ if .System }}..{{ else }}..{{ end }}`.
    """
    values = {".System": system or "", ".Prompt": prompt}
    out: list[str] = []
    stack: list[bool] = []  # per open `if`: is the current branch taken
    pos = 0

    def emitting() -> bool:
        return all(stack)

    for match in _GO_ACTION.finditer(template):
        if emitting():
            out.append(template[pos : match.start()])
        pos = match.end()
        action = match.group(1)
        if action in values:
            if emitting():
                out.append(values[action])
        elif action.startswith("if "):
            stack.append(bool(values.get(action[3:].strip(), "")))
        elif action == "else":
            stack[-1] = not stack[-1] and all(stack[:-1])
        elif action == "end":
            stack.pop()
        else:
            raise ValueError(f"unsupported Go template action {{{{ {action} }}}}")
    if emitting():
        out.append(template[pos:])
    return "".join(out)


# ---------------------------------------------------------------- merged


def write_merged(run: RunInfo, out: Path, *, quant: str, verify: bool, dtype: str = "float32") -> dict[str, Any]:
    model = merged_model(run)
    # float32 by default: rounding the merged weights to bf16 moves label probabilities by up
    # to ~0.1 on SmolLM2-135M (the LoRA delta is small next to the weights it is added to).
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    # The tokenizer saved here carries the exact chat template the adapter was trained with.
    run.tokenizer.save_pretrained(out)
    checks: dict[str, Any] = {"dtype": dtype}
    if verify:
        checks["labels"] = check_merged(run, out)
    return checks


def check_merged(run: RunInfo, out: Path) -> dict[str, Any]:
    """The saved merged model predicts what `Classifier.from_run` predicts on the run's own texts."""
    from taskling.serve.classifier import Classifier

    texts = sample_texts(run)
    reference = Classifier.from_run(run.run_dir, device="cpu", dtype="float32").predict(texts)
    tokenizer = load_tokenizer(str(out))
    if tokenizer.chat_template != run.chat_template:
        raise ExportError(f"{out}: the saved tokenizer lost the training chat template")
    fmt = run.chat_format(tokenizer)
    for label, answer in run.manifest["label_answers"].items():
        if fmt.answer_text(label) != answer:
            raise ExportError(f"{out}: the saved tokenizer renders label {label!r} differently than in training")
    model = load_model(str(out), torch.float32)
    candidate = Classifier(model, fmt, device="cpu").predict(texts)
    result = compare_predictions(reference, candidate)
    if result["clear_disagreements"]:
        raise ExportError(
            f"the merged model in {out} disagrees with the run on {result['clear_disagreements']} clear answers: "
            f"{result['disagreements']}"
        )
    return result


# ---------------------------------------------------------------- gguf


def write_gguf_dir(run: RunInfo, out: Path, *, quant: str, verify: bool) -> dict[str, Any]:
    from taskling.export.gguf import check_gguf

    model = merged_model(run)
    writer = write_gguf_file(run, model, out / GGUF_NAME, quant)
    checks: dict[str, Any] = {"gguf": {"quant": quant, "writer": writer}}
    if verify:
        checks["gguf"] = {**check_gguf(out / GGUF_NAME, model, run, quant), "writer": writer}
    return checks


def write_gguf_file(run: RunInfo, model: Any, path: Path, quant: str) -> str:
    """Write the GGUF with llama.cpp's converter when installed, else the built-in writer;
    4-bit K-quants go through llama-quantize. Returns which writer was used."""
    from taskling.export.gguf import write_gguf
    from taskling.export.llamacpp import convert, find_llama_cpp, quantize

    tools = find_llama_cpp()
    if quant == "q4_K_M" and tools.quantizer is None:
        raise ExportError(
            "q4_K_M needs llama.cpp's llama-quantize: the gguf Python package cannot quantize to Q4_K",
            fix="install llama.cpp and set TASKLING_LLAMA_CPP to its directory (or put llama-quantize on PATH), "
            "or use --quant q4_0 (built in), q8_0 or f16",
        )
    first = "f16" if quant in ("q4_K_M", "q4_0") and tools.quantizer is not None else quant
    staged = path.with_name(f"staged-{first}.gguf") if first != quant else path
    if tools.converter is not None and first in ("f16", "q8_0"):
        with tempfile.TemporaryDirectory(prefix="taskling-merged-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            run.tokenizer.save_pretrained(tmp)
            convert(tools.converter, Path(tmp), staged, first)
        writer = "llama.cpp convert_hf_to_gguf.py"
    else:
        write_gguf(model, run.tokenizer, run.chat_template, staged, first, name=run.task.name)
        writer = "taskling (gguf package)"
    if staged != path:
        assert tools.quantizer is not None
        quantize(tools.quantizer, staged, path, quant)
        staged.unlink()
        writer += " + llama-quantize"
    return writer


# ---------------------------------------------------------------- ollama


def ollama_template(run: RunInfo) -> str:
    """The training chat template as an Ollama (Go) TEMPLATE, checked to render identically.

    Derived by rendering the Jinja template with placeholder messages: with a system and a
    user message it must read A<system>B<user>C, and with only a user message D<user>C.
    Anything else (content the template rewrites, turns it reorders) is refused.
    """
    sys_mark, user_mark = _placeholder("system"), _placeholder("user")
    fmt = run.chat_format()

    def jinja(system: str | None, user: str) -> str:
        # The task's own messages, so few-shot turns (if any) become part of the template.
        messages = run.task.messages(user)
        if system is None:
            messages = messages[1:]
        else:
            messages[0] = {"role": "system", "content": system}
        return fmt._render(messages, True)

    with_system = split_rendering(jinja(sys_mark, user_mark), [sys_mark, user_mark])
    without_system = split_rendering(jinja(None, user_mark), [user_mark])
    refuse = ExportError(
        "cannot translate this run's chat template to an Ollama template faithfully",
        fix="export to gguf and give your runtime the template stored in the GGUF (tokenizer.chat_template)",
    )
    if with_system is None or without_system is None or without_system[1] != with_system[2]:
        raise refuse
    a, b, c = with_system
    d = without_system[0]
    if any("{{" in part or '"""' in part for part in (a, b, c, d)):
        raise refuse
    template = f"{{{{ if .System }}}}{a}{{{{ .System }}}}{b}{{{{ else }}}}{d}{{{{ end }}}}{{{{ .Prompt }}}}{c}"
    probes = [
        (run.task.system_prompt(), "what's my credit score?"),
        (" leading and trailing spaces ", "two\nlines\n\n"),
        ("ünïcode — 字", "tab\there <b>tags</b> {{ .Prompt }}"),
        (None, "no system message"),
    ]
    for system, user in probes:
        if render_go_template(template, system, user) != jinja(system, user):
            raise refuse
    return template


def stop_tokens(run: RunInfo) -> list[str]:
    """What ends an answer in training: the text the template writes after a label, and EOS."""
    stops: list[str] = []
    for label, answer in run.manifest["label_answers"].items():
        written = run.task.answer(label)  # the label as the model writes it (task.label_text)
        tail = answer[len(written) :].strip() if answer.startswith(written) else ""
        if tail and tail not in stops:
            stops.append(tail)
    eos = run.tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    return stops


def modelfile_text(run: RunInfo) -> str:
    system = run.task.system_prompt()
    if '"""' in system:
        raise ExportError('the task instruction contains \'"""\', which a Modelfile cannot quote')
    fmt = run.chat_format()
    lines = [
        f"# taskling export of {run.run_dir.name} (task {run.task.name}); labels: {', '.join(run.task.labels)}",
        f"FROM ./{GGUF_NAME}",
        f'TEMPLATE """{ollama_template(run)}"""',
        f'SYSTEM """{system}"""',
        *(f"PARAMETER stop {json.dumps(stop)}" for stop in stop_tokens(run)),
        "PARAMETER temperature 0",
        # A label is the whole answer; this caps a misbehaving model at the longest one.
        f"PARAMETER num_predict {fmt.max_answer_length + 1}",
    ]
    return "\n".join(lines) + "\n"


def write_ollama(run: RunInfo, out: Path, *, quant: str, verify: bool) -> dict[str, Any]:
    # Template first: an untranslatable template fails before minutes of GGUF writing.
    text = modelfile_text(run)
    checks = write_gguf_dir(run, out, quant=quant, verify=verify)
    write_text(out / "Modelfile", text)
    checks["modelfile"] = {"template_round_trip": True, "stop": stop_tokens(run)}
    return checks


# ---------------------------------------------------------------- vllm


def _vllm_base(run: RunInfo) -> str:
    """A hub id stays a hub id; anything else (bundled, GGUF, local) is the local directory trained on."""
    spec = str(run.manifest["base_model"])
    if not spec.startswith("bundled:") and not Path(spec).exists() and not spec.endswith(".gguf"):
        return spec
    return str(Path(run.base_path).resolve())


def write_vllm(run: RunInfo, out: Path, *, quant: str, verify: bool) -> dict[str, Any]:
    import shlex

    shutil.copytree(run.files.adapter, out / "adapter")
    write_text(out / "chat_template.jinja", run.chat_template)
    adapter_config = read_json(out / "adapter" / "adapter_config.json")
    rank = max([int(adapter_config["r"]), *map(int, (adapter_config.get("rank_pattern") or {}).values())])
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", run.task.name) or "taskling"
    base = _vllm_base(run)
    launch = (
        "#!/usr/bin/env bash\n"
        f"# Serve {base} with the LoRA adapter of taskling run {run.run_dir.name} as model {name!r}.\n"
        "# The chat template is the one the adapter was trained with; request.json shows a call\n"
        '# constrained to the label set (vLLM >= 0.12: "structured_outputs"; older: "guided_choice").\n'
        "set -euo pipefail\n"
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"\n'
        f'vllm serve {shlex.quote(base)} --enable-lora --lora-modules {name}="$HERE/adapter" '
        f'--max-lora-rank {max_rank} --chat-template "$HERE/chat_template.jinja" "$@"\n'
    )
    write_text(out / "launch.sh", launch)
    (out / "launch.sh").chmod(0o755)
    fmt = run.chat_format()
    request = {
        "model": name,
        "messages": run.task.messages(sample_texts(run, 1)[0]),
        "temperature": 0,
        "max_tokens": fmt.max_answer_length + 1,
        "structured_outputs": {"choice": [run.task.answer(label) for label in run.task.labels]},
    }
    write_json(out / "request.json", request)
    checks: dict[str, Any] = {"max_lora_rank": max_rank, "adapter_rank": rank, "base": base}
    if verify:
        same = all(
            sha256_file(p) == sha256_file(out / "adapter" / p.name) for p in run.files.adapter.iterdir() if p.is_file()
        )
        if not same:
            raise ExportError(f"{out / 'adapter'} does not match the run's adapter byte for byte")
        checks["adapter_identical"] = True
    return checks
