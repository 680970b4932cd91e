# The two commands of the README:
#   make train   set up, train the default small GPT on tinyshakespeare (CPU: a few minutes), sample from it
#   make test    set up and run the test suite
# Both create ./.venv first (python3 -m venv) and install the pinned requirements into it.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install train test clean

install: $(VENV)/.installed

# Reinstall (and so rebuild kernels._C) when the pins, the build script or the C++/CUDA sources
# change. --no-build-isolation lets setup.py see the installed torch, which decides what part of
# the C++/CUDA extension this machine can build.
$(VENV)/.installed: requirements.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -e . --no-build-isolation --no-deps
	touch $@

# --overwrite: each `make train` starts over in out/ (without it a second run refuses to clobber it)
train: install
	$(BIN)/llm pretrain --overwrite
	$(BIN)/llm generate --prompt "ROMEO:" --max-new-tokens 100

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
