# The two set-up commands of the README:  `make demo` (the main job, offline, CPU) and `make test`.
# Both create .venv on first use: torch==2.13.0 first, then valle with its test tools.
# Which torch build comes depends on the index: from PyPI, Linux gets the CUDA build (several GB
# of CUDA packages), macOS and Windows the CPU build (with MPS on Apple silicon). For the CPU-only
# build on Linux, take torch from PyTorch's CPU index:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Paths are single-quoted in every recipe, so VENV and the checkout may sit in a folder with spaces.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_INDEX_URL ?=
# $(call q,path): one single-quoted shell word ($(call q,$(call q,x)): a quoted word that stays quoted
# after one more shell, for a command handed to the inner make); $(call t,path): a target name.
q = '$(subst ','\'',$(1))'
space := $(subst ,, )
t = $(subst $(space),\$(space),$(1))
ABS_BIN := $(if $(filter /%,$(BIN)),$(BIN),$(CURDIR)/$(BIN))
ACTIVATE_HINT = valle is installed in $(VENV)/: '. $(BIN)/activate' puts it on PATH (or run $(BIN)/valle)
ACTIVATE := @echo $(call q,$(ACTIVATE_HINT)) >&2
PIPELINE_TOOLS := VALLE=$(call q,$(call q,$(ABS_BIN)/valle)) PYTHON=$(call q,$(call q,$(ABS_BIN)/python)) WORK=$(call q,$(CURDIR)/work)

.PHONY: demo speak quality test lint install clean-demo

# valle evaluate needs pocketsphinx (it ships an English model) and jiwer.
# resemblyzer (the GE2E speaker encoder of valle similarity) ships its weights; its webrtcvad
# dependency needs pkg_resources, so the wheel-packaged webrtcvad stands in (hence --no-deps).
$(call t,$(VENV))/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(call q,$(VENV))
	$(call q,$(BIN)/pip) install -q --upgrade pip
	$(call q,$(BIN)/pip) install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(call q,$(TORCH_INDEX_URL)))
	$(call q,$(BIN)/pip) install -q -e '.[dev]'
	$(call q,$(BIN)/pip) install -q webrtcvad-wheels pocketsphinx jiwer && $(call q,$(BIN)/pip) install -q --no-deps resemblyzer
	touch $(call q,$@)

install: $(call t,$(VENV))/.installed
	$(ACTIVATE)

demo: $(call t,$(VENV))/.installed
	$(MAKE) -C pipelines demo $(PIPELINE_TOOLS)
	$(ACTIVATE)

# The recipe that speaks, about 90 minutes on 2 CPU cores: ./work/speak/report/index.html
speak: $(call t,$(VENV))/.installed
	$(MAKE) -C pipelines speak $(PIPELINE_TOOLS)
	$(ACTIVATE)

# The same pipeline at scale on a GPU (base preset, 40 voices x 100 utterances): ./work/quality/
quality: $(call t,$(VENV))/.installed
	$(MAKE) -C pipelines quality $(PIPELINE_TOOLS)

test: $(call t,$(VENV))/.installed
	$(call q,$(BIN)/python) -m pytest -q

lint: $(call t,$(VENV))/.installed
	$(call q,$(BIN)/ruff) check valle_cli tests benchmarks examples
	$(call q,$(BIN)/lint-imports)

clean-demo:
	rm -rf work
