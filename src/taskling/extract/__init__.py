"""The extraction stage: schemas of fields to fill from a message, and the decoder that fills them.

`extract` owns the extraction task and its config, record data loading and hashing
(`schema`), and the record format plus the constrained decoder that makes every answer a
schema-valid JSON record by construction (`extractor`). It may import `taskling.errors`,
`io`, `task`, `config`, `rundir`, `model` and `data`; `serve`, `train`, `evaluate`, the
exporters and the CLI build on it, never the other way round.
"""
