# The two set-up commands of the README:  `make demo` (the main job, offline, CPU) and `make test`.
# Both create .venv on first use: torch==2.13.0 first (the CPU build; an unpinned torch would
# pull gigabytes of CUDA packages), then valle with its test tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo quality test lint install clean-demo

# valle evaluate needs pocketsphinx (it ships an English model) and jiwer.
# resemblyzer (the GE2E speaker encoder of valle similarity) ships its weights; its webrtcvad
# dependency needs pkg_resources, so the wheel-packaged webrtcvad stands in (hence --no-deps).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q webrtcvad-wheels pocketsphinx jiwer && $(BIN)/pip install -q --no-deps resemblyzer
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(MAKE) -C pipelines demo VALLE=$(abspath $(BIN))/valle PYTHON=$(abspath $(BIN))/python WORK=$(CURDIR)/work

# The same pipeline at scale on a GPU (base preset, 40 voices x 100 utterances): ./work/quality/
quality: $(VENV)/.installed
	$(MAKE) -C pipelines quality VALLE=$(abspath $(BIN))/valle PYTHON=$(abspath $(BIN))/python WORK=$(CURDIR)/work

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check valle_cli tests benchmarks examples

clean-demo:
	rm -rf work
