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

.PHONY: install install-test-tools test up bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Without a GPU take the CPU build of torch this machine holds, before
	# anything can pull a multi-GB CUDA build through the torch range.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[$(ORT),test]'
	touch $@

# Debian tools the integration tests run for real: Prometheus + promtool.
install-test-tools:
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then \
			(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus) \
			|| echo "warning: could not install Debian's prometheus; Prometheus tests will be skipped"; \
		else echo "warning: not root, cannot apt-get install prometheus; Prometheus tests will be skipped"; fi; \
	fi

test: install install-test-tools
	$(PY) -m pytest -q -ra

up: install
	$(VENV)/bin/bsbr-serve up --host $(HOST) --port $(PORT)

bench: install
	$(PY) bench/scaling.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
