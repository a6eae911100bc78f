"""Fixed-format generation (``task.kind: generate``): free text, regex-shaped or SQL answers.

Owns the generation task spec and its config (``spec``), the constrained greedy decoder
(``decode``: every regex-format answer fullmatches while decoding), the ``Generator`` that
answers from a trained run or the base model, per-row generation metrics (``metrics``) and
SQL execution checks on a read-only SQLite database (``sql``). It may import ``config``,
``rundir``, ``io``, ``errors``, ``model``, ``data`` and ``extract``; ``train``, ``evaluate``,
``serve`` and ``cli`` build on it.
"""
