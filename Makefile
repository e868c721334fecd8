# One obvious command per job. `make setup` is implied by every other target.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The supported Pythons (pyproject's classifiers). The default interpreter ($(PYTHON)) has .venv; each other one has
# .venv-3.X, made from python3.X on PATH when it runs (pyenv's shim of a version not selected does not), else from the
# newest $(PYENV_ROOT)/versions/3.X.*. A missing one is skipped with a message, an error with REQUIRE_PYTHONS=1 (CI).
PYTHONS        := 3.11 3.12 3.13
PYENV_ROOT     ?= $(HOME)/.pyenv
python_for      = $(shell python$(1) -c '' >/dev/null 2>&1 && command -v python$(1) || \
                    ls -d $(PYENV_ROOT)/versions/$(1).*/bin/python$(1) 2>/dev/null | sort -V | tail -n 1)
DEFAULT_PYTHON  = $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
OTHER_PYTHONS   = $(filter-out $(DEFAULT_PYTHON),$(PYTHONS))
FOUND_PYTHONS   = $(foreach v,$(OTHER_PYTHONS),$(if $(call python_for,$(v)),$(v)))
MISSING_PYTHONS = $(filter-out $(FOUND_PYTHONS),$(OTHER_PYTHONS))
# tinytasktree's own interpreter (it requires 3.13): CI runs the whole suite on it too, conformance runs there too.
NATIVE_PYTHON  := 3.13

.PHONY: setup redis-server chromium test test-serial test-fast conformance demo demo-local lint docs bench trace-server serve flower constraints clean
.PHONY: test-all-pythons test-fast-pythons test-ci pythons-present test-hosts

setup: $(STAMP) redis-server

# $(1): the interpreter, $(2): the virtual environment's directory (its .installed stamp: made again when
# pyproject.toml changes)
define make_venv
	$(1) -m venv $(2)
	$(2)/bin/pip install --quiet --upgrade pip
	$(2)/bin/pip install --quiet -e '.[dev]'
	touch $(2)/.installed
endef

$(STAMP): pyproject.toml
	$(call make_venv,$(PYTHON),$(VENV))

.PRECIOUS: .venv-%/.installed
.venv-%/.installed: pyproject.toml
	$(call make_venv,$(or $(call python_for,$*),$(error Python $* not found (python$* on PATH, $(PYENV_ROOT)/versions/$*.*))),.venv-$*)

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

# The whole suite in two pytest processes (pytest-xdist), a test module never split: each process has its own
# redis-server, fleets and ports. Most of the suite waits (worker boots, leases, LLM latency) rather than computes, so
# the two overlap their waits: 903 tests in 279-302 s (fresh clone, 2026-12-06) against 568 s for 891 in one process on
# this 2-core machine (load ~1).
PARALLEL := -n 2 --dist loadfile

test: setup chromium
	$(BIN)/pytest -q $(PARALLEL)

# The same suite in one process (a failure's output unmixed; pdb works).
test-serial: setup chromium
	$(BIN)/pytest -q

# The quick loop: tests/unit only (no redis-server, no workers, no browser), about 20 s.
test-fast: setup
	$(BIN)/pytest -q tests/unit

# The fleet over network-namespace hosts (root; skipped with the reason otherwise): docs/deployment.md
test-hosts: setup
	$(BIN)/pytest -q -m hosts

# `make pytest-3.X [TESTS=tests/unit]`: the suite (or TESTS) in Python 3.X's own virtual environment.
pytest-%: .venv-%/.installed redis-server $(if $(TESTS),,chromium)
	.venv-$*/bin/pytest -q $(if $(TESTS),$(TESTS),$(PARALLEL))

# Names the supported Pythons this machine lacks; fails on them with REQUIRE_PYTHONS=1.
pythons-present:
	@$(foreach v,$(MISSING_PYTHONS),echo "Python $(v) not found (python$(v) on PATH, $(PYENV_ROOT)/versions/$(v).*): \
		$(if $(REQUIRE_PYTHONS),required here (REQUIRE_PYTHONS=1),skipped)" >&2;) \
		$(if $(and $(REQUIRE_PYTHONS),$(MISSING_PYTHONS)),exit 1,true)

# The whole suite, or tests/unit, on the default Python and then on each other supported one found.
test-all-pythons: test pythons-present
	@$(foreach v,$(FOUND_PYTHONS),$(MAKE) --no-print-directory pytest-$(v) &&) true

test-fast-pythons: test-fast pythons-present
	@$(foreach v,$(FOUND_PYTHONS),$(MAKE) --no-print-directory pytest-$(v) TESTS=tests/unit &&) true

# What CI runs (.ci/run), about 13 min: the whole suite on the default Python and on 3.13 (tinytasktree's own, the
# one its users bring), tests/unit on every other supported one. Every supported Python must be present.
test-ci: REQUIRE_PYTHONS := 1
test-ci: pythons-present test
	@$(foreach v,$(filter-out $(NATIVE_PYTHON),$(OTHER_PYTHONS)),$(MAKE) --no-print-directory pytest-$(v) \
		TESTS=tests/unit &&) true
	@$(foreach v,$(filter $(NATIVE_PYTHON),$(OTHER_PYTHONS)),$(MAKE) --no-print-directory pytest-$(v) &&) true

# tinytasktree 0.1.7's own test suite against tasktree_dist (drop-in compatibility), from a tinytasktree checkout,
# on the default Python and on 3.13 (tinytasktree's own): make conformance TINYTASKTREE_SRC=../tinytasktree.
# Prints the pass count per Python; fails unless all but test_utils.py pass on each.
conformance: setup
	@test -n "$(TINYTASKTREE_SRC)" || { echo "usage: make conformance TINYTASKTREE_SRC=<tinytasktree checkout>" >&2; exit 2; }
	$(BIN)/python -m tasktree_dist.testing.conformance "$(TINYTASKTREE_SRC)"
	@$(foreach v,$(filter $(NATIVE_PYTHON),$(OTHER_PYTHONS)),$(if $(filter $(v),$(FOUND_PYTHONS)), \
		$(MAKE) --no-print-directory conformance-$(v) &&,echo "Python $(v) not found: conformance on it skipped" &&)) true

conformance-%: .venv-%/.installed
	.venv-$*/bin/python -m tasktree_dist.testing.conformance "$(TINYTASKTREE_SRC)"

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
	rm -rf $(VENV) .venv-3.* .pytest_cache .ruff_cache .traces .artifacts site
