# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON      ?= python3.11
VENV        := .venv
BIN         := $(VENV)/bin
# torch goes in first and on its own: a bare requirement would pull a CUDA build.
# GPU nodes: TORCH_SPEC="torch==2.13.0" PIP_TORCH_FLAGS="--index-url <CUDA wheel index>" (see README).
TORCH_SPEC      ?= torch==2.13.0
PIP_TORCH_FLAGS ?=
# Dev defaults for the data; the library itself only reads FINSENT_FPB_DIR / FINSENT_REUTERS_DIR.
FPB_DIR     ?= $(abspath ../shared/data/financial_phrasebank)
REUTERS_DIR ?= $(abspath ../shared/data/reuters21578)
export FINSENT_FPB_DIR     ?= $(FPB_DIR)
export FINSENT_REUTERS_DIR ?= $(REUTERS_DIR)
export DVC_NO_ANALYTICS    := 1
export GX_ANALYTICS_ENABLED := false

.PHONY: setup demo test test-scaled scaled-services stack-up stack-down lock clean-state secrets

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

demo: setup
	$(BIN)/finsent demo

test: setup
	$(BIN)/python -m pytest -m "not scaled"

# The scaled profile's tests, against the machine's own PostgreSQL and Redis on loopback.
test-scaled: setup scaled-services
	$(BIN)/python -m pytest -m scaled tests/scaled

# PostgreSQL and Redis answer on loopback: started first where they are installed but down.
scaled-services:
	pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster $$(pg_lsclusters -h | head -1 | cut -d' ' -f1,2) start
	redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --bind 127.0.0.1 --port 6379 --save '' --daemonize yes
	pg_isready -h 127.0.0.1 -p 5432 -t 30 && redis-cli -h 127.0.0.1 -p 6379 ping

# The scaled profile on this machine (docs/scaling.md): MLflow, Airflow and two Celery workers as local
# processes with pid files under .finsent/stack; PostgreSQL and Redis are the machine's own.
stack-up: setup
	FINSENT_PROFILE=scaled $(BIN)/finsent stack up

stack-down: setup
	FINSENT_PROFILE=scaled $(BIN)/finsent stack down

# Regenerate the lock after changing dependencies in pyproject.toml:
# install them into a fresh .venv (torch first), then freeze everything but torch and finsent.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(torch==|finsent)' > requirements.lock

clean-state:
	rm -rf .finsent

# docker/.env for the compose stack in docker/: fresh random secrets, mode 0600.
# Refuses to overwrite an existing one (the database volumes keep their first passwords).
secrets:
	python3 docker/make_env.py
