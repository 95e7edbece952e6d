# bsbr-serve: `make up` starts the server with the shipped models,
# `make test` runs the test suite. Both install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# onnxruntime flavour: cpu (default) or gpu; they cannot share an environment.
ORT ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-test-tools test up bench load clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Without a GPU take the CPU build of torch this machine holds, before
	# anything can pull a multi-GB CUDA build through the torch range.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[$(ORT),test,redis,experiments,load]'
	touch $@

# Debian tools the integration tests run for real: Prometheus + promtool
# (package prometheus), curl (the README's examples) and poppler's pdfinfo +
# pdftotext (poppler-utils: the PDF tests check page counts and text against
# them), redis-server (package redis-server: the Redis session store's tests
# start one on 127.0.0.1). Without them those
# tests skip, with a warning here; under CI=true a missing tool fails this
# step, and the tests that need it fail rather than skip.
TEST_TOOLS := prometheus promtool curl pdfinfo pdftotext redis-server
TEST_PACKAGES := prometheus curl poppler-utils redis-server
install-test-tools:
	@missing() { for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || printf ' %s' $$t; done; }; \
	if [ -n "$$(missing)" ]; then \
		if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo=sudo; else sudo=none; fi; \
		if [ "$$sudo" != none ]; then \
			$$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
				--no-install-recommends $(TEST_PACKAGES) || true; \
		fi; \
		gone="$$(missing)"; \
		if [ -n "$$gone" ]; then \
			why="test tools missing:$$gone (apt-get install $(TEST_PACKAGES) as root or with sudo)"; \
			if [ "$${CI:-}" = true ]; then echo "error: $$why; CI=true needs every test tool" >&2; exit 1; fi; \
			echo "warning: $$why; the tests that need them will be skipped" >&2; \
		fi; \
	fi

test: install install-test-tools
	$(PY) -m pytest -q -ra

up: install
	$(VENV)/bin/bsbr-serve up --host $(HOST) --port $(PORT)

bench: install
	$(PY) bench/scaling.py

# The soak: 32 clients for 10 minutes against `make up`'s server (started on
# free ports, stopped after); writes bench/results/load.{json,png}.
USERS ?= 32
DURATION ?= 600
load: install
	$(PY) bench/load.py --users $(USERS) --duration-s $(DURATION)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
