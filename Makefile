# One obvious command per job. `make setup` is implied by every other target.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup redis-server test demo demo-local lint bench trace-server clean

setup: $(STAMP) redis-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Tests, the demo and benchmarks start their own private redis-server: install the OS package if missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server missing: installing the OS package"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

test: setup
	$(BIN)/pytest -q

# The main job: the LLM batch across two Celery workers (starts and stops its own Redis, fake LLM and workers).
demo: setup
	$(BIN)/python examples/distributed_demo.py

demo-local: setup
	$(BIN)/python examples/local_demo.py

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/local_overhead.py

trace-server: setup
	$(BIN)/python -m tasktree_dist --httpserver --host 127.0.0.1 --port 8000 --trace-dir .traces

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .traces
