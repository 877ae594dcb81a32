# The two set-up commands of the README:  `make demo` (the main job, offline, CPU) and `make test`.
# Both create .venv on first use: torch==2.13.0 first, then valle with its test tools.
# Which torch build comes depends on the index: from PyPI, Linux gets the CUDA build (several GB
# of CUDA packages), macOS and Windows the CPU build (with MPS on Apple silicon). For the CPU-only
# build on Linux, take torch from PyTorch's CPU index:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_INDEX_URL ?=
ACTIVATE := @echo "valle is installed in $(VENV)/: '. $(VENV)/bin/activate' puts it on PATH (or run $(BIN)/valle)" >&2

.PHONY: demo quality test lint install clean-demo

# valle evaluate needs pocketsphinx (it ships an English model) and jiwer.
# resemblyzer (the GE2E speaker encoder of valle similarity) ships its weights; its webrtcvad
# dependency needs pkg_resources, so the wheel-packaged webrtcvad stands in (hence --no-deps).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q webrtcvad-wheels pocketsphinx jiwer && $(BIN)/pip install -q --no-deps resemblyzer
	touch $@

install: $(VENV)/.installed
	$(ACTIVATE)

demo: $(VENV)/.installed
	$(MAKE) -C pipelines demo VALLE=$(abspath $(BIN))/valle PYTHON=$(abspath $(BIN))/python WORK=$(CURDIR)/work
	$(ACTIVATE)

# The same pipeline at scale on a GPU (base preset, 40 voices x 100 utterances): ./work/quality/
quality: $(VENV)/.installed
	$(MAKE) -C pipelines quality VALLE=$(abspath $(BIN))/valle PYTHON=$(abspath $(BIN))/python WORK=$(CURDIR)/work

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check valle_cli tests benchmarks examples
	$(BIN)/lint-imports

clean-demo:
	rm -rf work
