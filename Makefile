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

.PHONY: setup demo test lock clean-state

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
	$(BIN)/python -m pytest

# Regenerate the lock after changing dependencies in pyproject.toml:
# install them into a fresh .venv (torch first), then freeze everything but torch and finsent.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(torch==|finsent)' > requirements.lock

clean-state:
	rm -rf .finsent
