# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: demo test lab install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,widgets,export]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/workbench demo

# Tests in TEST_WORKERS processes (pytest-xdist), a test file per process at a time (module fixtures are
# built once); most tests use one core at a time, so 2 workers halve the run on CI's 2 cores. A short
# OpenMP spin: workers' torch threads share the cores (RESULTS.md, "OpenMP spin-waiting").
TEST_WORKERS ?= 2
test: $(STAMP)
	GOMP_SPINCOUNT=$${GOMP_SPINCOUNT:-1000} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# JupyterLab from the project's venv (its kernel is the venv's Python), on 127.0.0.1 only, with a fresh
# token; prints the URL to open. LAB_PORT=9999 make lab for another port (a busy port fails loudly).
LAB_PORT ?= 8888
lab: $(STAMP)
	@mkdir -p runs
	@TOKEN=$$($(BIN)/python -c "import secrets; print(secrets.token_urlsafe(24))"); \
	echo ""; \
	echo "JupyterLab (notebooks in notebooks/, traces under runs/):"; \
	echo "    http://127.0.0.1:$(LAB_PORT)/lab/tree/notebooks?token=$$TOKEN"; \
	echo ""; \
	GOMP_SPINCOUNT=$${GOMP_SPINCOUNT:-1000} exec $(BIN)/jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) \
	    --ServerApp.port_retries=0 --IdentityProvider.token="$$TOKEN" --ServerApp.root_dir="$(CURDIR)" \
	    $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf $(VENV) runs
