# Two commands do all the set-up: `make demo` and `make test`.
# Both create .venv/ when it is missing and install the project with pinned versions.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench install clean browser

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt etl/native/_hmac.c etl/native/_lines.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/omop-etl demo

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# python -m bench --help: sizes, engines, DuckDB memory limit; e.g.
# make bench BENCH_ARGS="--patients 1000,10000 --engines duckdb --memory-limit 6GB"
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache

# The tests render report.html in a real headless browser: Debian's chromium, installed
# here when it is missing and apt-get is usable (as root); elsewhere that test is skipped.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the report.html browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null) || echo "chromium could not be installed: that test will be skipped"; \
	  else echo "no chromium and no apt-get as root: the report.html browser test is skipped"; fi; \
	fi
