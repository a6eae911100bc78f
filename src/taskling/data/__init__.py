"""The data stage: every row a model trains or is scored on comes through here.

`data` owns loading labeled files in the formats people have (`load`, with every bad row
counted and named by file and line), finding exact and near duplicates and gold copies
(`dedupe`), cleaning and the data report (`clean`), train/validation/gold splits and the
frozen gold set (`split`, `gold`), turning teacher logs into training data (`distill`),
the teacher client (`teacher`) and the bundled demo data (`demo`). It may import
`taskling.errors`, `io`, `task`, `config`, `rundir` and `model` (for embeddings), never a
later stage (extract, serve, train, evaluate, export, monitor, cli).
"""

from taskling.data.load import Example, LoadResult, load_file, load_files

__all__ = ["Example", "LoadResult", "load_file", "load_files"]
