"""The `celery -A worker worker` entry point.

The Celery app (`worker.app`) arrives with distributed execution; until then this package only reserves the
name so the repository layout is the final one.
"""
