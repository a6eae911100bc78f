"""export: ship a finished classification run to the runtimes people deploy on.

This package owns every export format (merged safetensors, GGUF, an Ollama Modelfile, a
vLLM LoRA launch line) and the checks that each export predicts what the run predicts.
`common.py` holds what the formats share (the run being exported, sample texts,
tolerances), `gguf.py` the GGUF writer and check (`gguf_arch.py` its architectures, `gguf_vocab.py` its
tokenizers, `llamacpp.py` llama.cpp's tools when installed), `exporter.py` the formats and
`export()`, `hub.py` `push` to the Hugging Face Hub. It reads
runs through `taskling.rundir`, loads models through `taskling.model`, checks labels with
`taskling.serve`'s classifier, and writes through `taskling.io`; it never imports the CLI.
"""

from taskling.export.exporter import export

__all__ = ["export"]
