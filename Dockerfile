# One image for every Python service of docker-compose.yml (worker, coordinator, flower, ui, exporter, fake-llm,
# demo): installed once at build time, so `--scale worker=N` starts N containers from the same installed code.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# 1. Dependencies alone, read from pyproject.toml at the exact versions of constraints.txt (`make constraints`), so
#    an image built twice gets the same versions: this layer is rebuilt only when those two files change, not when
#    the code does.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['flower'], sep=chr(10))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt && rm /tmp/requirements.txt

# 2. The package (the `tasktree` command, the worker app), without touching the dependencies installed above.
COPY README.md ./
COPY tasktree_dist ./tasktree_dist
COPY broker_config ./broker_config
COPY worker ./worker
RUN pip install --no-deps .

# Tree modules the workers import (TASKTREE_IMPORTS=examples.llm_batch), the demo and its blackboards; /app is the
# working directory, so `celery -A worker` and `examples.*` resolve from it.
COPY examples ./examples

# Run as an unprivileged user; /app/.traces and /app/.flower are where the traces and Flower volumes are mounted
# (a new named volume takes this ownership).
RUN useradd --create-home --uid 10001 tasktree && mkdir -p /app/.traces /app/.flower \
    && chown tasktree /app/.traces /app/.flower
USER tasktree

CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
