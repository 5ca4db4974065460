# The whole set-up on a fresh machine is `make demo` or `make test`.
# torch is installed first and pinned to the CPU build that lies on local disk;
# the project itself only asks for a range (torch>=2.4).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
DEMO    ?= demo_out
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test test-all demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[cpu]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" tests

demo: $(STAMP)
	$(BIN)/python -m asvr.tokenizer.demo --out $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
