"""The runs board: `tasktree serve` serves the trace viewer's routes plus a JSON API over runs in Redis, a live
event stream per run (server-sent events) and, guarded by a token, cancel and retry. Kept out of tracing/ (which
knows no Celery and no fleet): this package reads runs through RunClient."""
