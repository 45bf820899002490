# egress-sidecar: `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-installed
SYSTEM_STAMP := $(VENV)/.system-installed

.PHONY: run test unit e2e sealed bench soak lint clean venv system-deps compile

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

# pip compiles what it installs into site-packages, but the editable install runs sidecar/ from
# the source tree, and with PYTHONDONTWRITEBYTECODE set nothing caches its bytecode: every start
# would compile ~7,000 lines (~40 ms of CPU, a sixth of the time to ready). compileall writes
# sidecar/__pycache__ (gitignored, and .dockerignore keeps it out of the image, whose pip
# --compile does the same); it only recompiles files that changed, so it runs before each use.
compile: $(STAMP)
	$(PY) -m compileall -q sidecar

venv: compile

run: compile
	$(VENV)/bin/egress-sidecar run $(if $(CONFIG),--config $(CONFIG))

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(PIP) install -q -e '.[test]'
	touch $@

# Debian packages the tests drive for real (nginx upstreams, promtool, curl, unshare/ip).
$(SYSTEM_STAMP): | $(PY)
	./scripts/install-system-deps.sh
	touch $@

system-deps: $(SYSTEM_STAMP)

test: $(TEST_STAMP) $(SYSTEM_STAMP) compile
	$(PY) -m pytest -q -p no:cacheprovider

unit: $(TEST_STAMP) compile
	$(PY) -m pytest -q tests/unit

# The SSRF/policy tests aimed at non-loopback addresses. They re-run themselves inside a private
# network namespace (unshare --net, needs root or user namespaces) and skip, naming why, where
# none can be made; `make test` runs them the same way.
sealed: $(TEST_STAMP) $(SYSTEM_STAMP) compile
	$(PY) -m pytest -q -p no:cacheprovider -rs tests/sealed

# The gate `.ci/run` runs before the tests: ruff (rules in pyproject's [tool.ruff.lint]) on all our
# Python, mypy --strict on the package ([tool.mypy]). Either failing fails the target.
LINT_STAMP := $(VENV)/.lint-installed

$(LINT_STAMP): pyproject.toml $(STAMP)
	$(PIP) install -q -e '.[lint]'
	touch $@

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info

# Side-by-side benchmark (bench/README.md): installs Debian nginx/wrk and the `bench` extra,
# then runs every candidate in one go; prints the table and writes bench/results/latest.{md,json}.
# BENCH_ARGS passes options through, e.g. BENCH_ARGS="--only sidecar,aiohttp".
BENCH_STAMP := $(VENV)/.bench-installed
.PHONY: bench-quick

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PIP) install -q -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP) compile
	./scripts/install-system-deps.sh
	$(PY) -m bench.run $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP) compile
	./scripts/install-system-deps.sh
	$(PY) -m bench.run --quick $(BENCH_ARGS)

# The egress lock's transparent path beside forward-proxy form and CONNECT (bench/transparent.py):
# needs root (it builds its own sealed pod and world namespaces; nothing leaves the machine).
.PHONY: bench-transparent
bench-transparent: $(BENCH_STAMP) $(TEST_STAMP) compile
	./scripts/install-system-deps.sh
	nice -n 10 $(PY) -m bench.transparent $(BENCH_ARGS)

# The bounded soak (5 minutes of mixed traffic; RSS, descriptors and pool must stay flat).
# -s: the test prints its measurements (one SOAK line).
soak: $(TEST_STAMP) $(SYSTEM_STAMP) compile
	$(PY) -m pytest -q -s -m soak tests/soak
