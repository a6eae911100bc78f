"""serve: answer with a trained classifier, one message, one request or one file at a time.

This package owns inference and everything around it: the constrained classifier
(`classifier.py`), abstention (`abstain.py`), batch inference over files (`batch.py`), the
HTTP server (`settings.py` start-up checks, `engine.py` batching worker, `http.py` error
shape and middleware, `server.py` routes) and the prediction log (`predlog.py`). It may
import `taskling.model`, `taskling.data`, `taskling.rundir`, `taskling.io`, `taskling.task`
and `taskling.errors`; it never imports train, evaluate, export, monitor or the CLI.
"""
