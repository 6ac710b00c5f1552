# 3Compute backend. `make run` serves on the embedded default; `make test` runs everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 5555
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test test-fast lint image engine bench loadtest soak clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed ## a .venv with everything the server and its tests need

run: setup ## the server in dev mode: Docker when an engine answers (image built if missing), else local tmux
	@if docker info >/dev/null 2>&1; then \
		scripts/build-image.sh && exec $(PY) server.py --dev --port $(PORT); \
	else \
		echo "make run: no Docker engine answers; using --backend local (tmux on this host)"; \
		exec $(PY) server.py --dev --backend local --port $(PORT); \
	fi

engine: ## install and start a Docker engine if none answers
	scripts/docker-engine.sh

image: engine ## build the 3compute image without a registry (cached)
	scripts/build-image.sh

test: setup image ## the whole suite, against a real Docker engine
	REQUIRE_DOCKER=1 $(PY) -m pytest -q -p no:cacheprovider

test-fast: setup ## the suite without the Docker tests
	$(PY) -m pytest -q -m "not docker"

lint: setup
	$(VENV)/bin/ruff check .

SOAK_ARGS ?=
soak: $(VENV)/.bench-installed image ## 100 users x 2 tabs for 15 min with faults (SOAK_ARGS="--duration 300 --faults exec,disk")
	$(PY) scripts/soak.py --spawn docker --out results/soak.json $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
include bench/Makefile.inc
