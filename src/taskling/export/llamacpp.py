"""llama.cpp's own converter and quantizer, used for GGUF exports when they are installed.

`find_llama_cpp()` looks for `convert_hf_to_gguf.py` and `llama-quantize` in the directory
named by `TASKLING_LLAMA_CPP` (a llama.cpp checkout or install; `build/bin/` is searched too),
then on `PATH`. With the converter, a GGUF is written from the merged safetensors by llama.cpp
itself (`--outtype f16|q8_0`); `llama-quantize` turns an f16 file into `q4_K_M` or `q4_0`.
Either way the export is then checked exactly like the built-in writer's.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from taskling.export.common import ExportError

log = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
QUANTIZER = "llama-quantize"
# llama-quantize's names for the types the export offers.
QUANTIZE_TYPES = {"q4_K_M": "Q4_K_M", "q4_0": "Q4_0", "q8_0": "Q8_0"}


@dataclass(frozen=True)
class LlamaCpp:
    converter: Path | None
    quantizer: Path | None


def _find(name: str, root: Path | None) -> Path | None:
    if root is not None:
        for folder in (root, root / "build" / "bin", root / "bin"):
            if (folder / name).is_file():
                return folder / name
    found = shutil.which(name)
    return Path(found) if found else None


def find_llama_cpp() -> LlamaCpp:
    """Where llama.cpp's converter and quantizer are, each None when not installed."""
    env = os.environ.get("TASKLING_LLAMA_CPP")
    root = Path(env) if env else None
    return LlamaCpp(_find(CONVERTER, root), _find(QUANTIZER, root))


def _run(cmd: list[str], what: str) -> None:
    log.info("running %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ExportError(
            f"llama.cpp's {what} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}",
            fix="check the llama.cpp install named by TASKLING_LLAMA_CPP, or unset it to use the built-in writer",
        )


def convert(tool: Path, merged_dir: Path, out: Path, outtype: str) -> None:
    """`convert_hf_to_gguf.py MERGED --outfile OUT --outtype f16|q8_0`."""
    _run([sys.executable, str(tool), str(merged_dir), "--outfile", str(out), "--outtype", outtype], "converter")


def quantize(tool: Path, source: Path, out: Path, quant: str) -> None:
    """`llama-quantize SOURCE OUT TYPE`."""
    _run([str(tool), str(source), str(out), QUANTIZE_TYPES[quant]], "quantizer")
