# One obvious command per job. `make setup` is implied by every other target.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup redis-server chromium test test-fast conformance demo demo-local lint docs bench trace-server serve flower constraints clean

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

# The runs board's browser test drives Debian's headless Chromium (Playwright's own browser download is never used):
# install the OS package if missing. Without it the browser test skips, naming this target.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "chromium missing: installing the OS package"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup chromium
	$(BIN)/pytest -q

# The quick loop: tests/unit only (no redis-server, no workers, no browser), about 20 s.
test-fast: setup
	$(BIN)/pytest -q tests/unit

# tinytasktree 0.1.7's own test suite against tasktree_dist (drop-in compatibility), from a tinytasktree checkout:
# make conformance TINYTASKTREE_SRC=../tinytasktree. Prints the pass count; fails unless all but test_utils.py pass.
conformance: setup
	@test -n "$(TINYTASKTREE_SRC)" || { echo "usage: make conformance TINYTASKTREE_SRC=<tinytasktree checkout>" >&2; exit 2; }
	$(BIN)/python -m tasktree_dist.testing.conformance "$(TINYTASKTREE_SRC)"

# The main job: the LLM batch across two Celery workers (starts and stops its own Redis, fake LLM and workers).
demo: setup
	$(BIN)/python examples/distributed_demo.py

demo-local: setup
	$(BIN)/python examples/local_demo.py

lint: setup
	$(BIN)/ruff check .

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link, page or reference. The
# configuration page's table is generated from the settings model while it builds (docs/hooks/settings_table.py).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python benchmarks/local_overhead.py

trace-server: setup
	$(BIN)/python -m tasktree_dist --httpserver --host 127.0.0.1 --port 8000 --trace-dir .traces

# The runs board (live run pages, per-worker timelines) and the trace viewer on http://127.0.0.1:8000/runs for the
# fleet in TASKTREE_REDIS_URL. Cancel/retry from the page only with TASKTREE_CONTROL_TOKEN set (sent by the page).
serve: setup
	$(BIN)/tasktree serve --host 127.0.0.1 --port 8000 --trace-dir .traces

# Flower on 127.0.0.1:5555 for a fleet on the broker below (the same TASKTREE_* variables the workers read;
# defaults are broker_config's: a Redis on 127.0.0.1:6379). Flower 2.2 locks its HTTP API (/api/...) unless it has
# authentication: `FLOWER_BASIC_AUTH=admin:secret make flower` (Flower reads FLOWER_* variables; comma-separate
# several users), then `curl -u admin:secret http://127.0.0.1:5555/api/tasks`. FLOWER_UNAUTHENTICATED_API=1 opens
# the API to anyone who can reach the port, cross-origin pages included: never on a shared host.
flower: setup
	@[ -n "$$FLOWER_BASIC_AUTH$$FLOWER_AUTH" ] || echo "note: Flower's API answers 401 without FLOWER_BASIC_AUTH=user:password"
	TASKTREE_BROKER_URL=$${TASKTREE_BROKER_URL:-redis://127.0.0.1:6379/0} \
	TASKTREE_REDIS_URL=$${TASKTREE_REDIS_URL:-redis://127.0.0.1:6379/1} \
	TASKTREE_IMPORTS=$${TASKTREE_IMPORTS:-examples.llm_batch} \
	$(BIN)/celery -A worker flower --address=127.0.0.1 --port=5555

# constraints.txt: the exact versions the Docker image installs (pip install -c), frozen from a clean venv of the
# package and its flower extra. Run after changing dependencies in pyproject.toml, and commit the result.
constraints:
	rm -rf .constraints-venv && $(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/pip install --quiet '.[flower]'
	{ sed -n '1,2p' constraints.txt; .constraints-venv/bin/pip freeze --exclude tasktree_dist; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .constraints-venv

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .traces .artifacts site
