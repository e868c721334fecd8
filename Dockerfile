# One image for every Python service of docker-compose.yml (worker, flower, fake-llm, demo): the package is
# installed once at build time, so `--scale worker=N` starts N containers from the same installed code.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Dependencies first (cached while only the code changes), then the code.
COPY pyproject.toml README.md ./
COPY tasktree_dist ./tasktree_dist
COPY broker_config ./broker_config
COPY worker ./worker
RUN pip install '.[flower]'

# Tree modules the workers import (TASKTREE_IMPORTS=examples.llm_batch) and the demo; /app is the working
# directory, so `celery -A worker` and `examples.*` resolve from it.
COPY examples ./examples

# Run as an unprivileged user.
RUN useradd --create-home --uid 10001 tasktree && mkdir -p /app/.traces && chown tasktree /app/.traces
USER tasktree

CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
