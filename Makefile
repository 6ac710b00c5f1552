# 3Compute backend. `make run` serves on the embedded default; `make test` runs everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 5555
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: ttyd-deps setup run test test-fast lint image engine browser cluster-deps cluster cluster-down cluster-status bench loadtest soak clean web

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed ## a .venv with everything the server and its tests need

# The web workspace: rebuilt when any of its sources or the lock file changed.
WEB_SOURCES := $(shell find web/src -type f) web/index.html web/build.mjs web/package.json web/package-lock.json
web/dist/manifest.json: $(WEB_SOURCES)
	scripts/build-web.sh

web: web/dist/manifest.json ## bundle the web workspace served at / (Node.js installed with apt if missing)

run: setup web ## the server in dev mode: Docker when an engine answers (image built if missing), else local tmux
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

browser: ## Debian's Chromium for the browser tests (installed with apt when missing)
	scripts/chromium.sh

cluster-deps: ## install PostgreSQL and HAProxy (apt) if missing; tests start private instances of them
	scripts/cluster.sh install

cluster: setup cluster-deps ## REPLICAS (3) servers on one private PostgreSQL behind HAProxy on CLUSTER_PORT (5600)
	scripts/cluster.sh up

cluster-down: ## stop the cluster and remove everything it made
	scripts/cluster.sh down

cluster-status:
	scripts/cluster.sh status

test: setup image web browser cluster-deps ## the whole suite: a real Docker engine, browser, PostgreSQL and HAProxy
	REQUIRE_DOCKER=1 REQUIRE_BROWSER=1 $(PY) -m pytest -q -p no:cacheprovider

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
