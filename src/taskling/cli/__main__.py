"""`python -m taskling.cli`: the same as the `taskling` command (used by torchrun and accelerate)."""

from taskling.cli import app

app()
