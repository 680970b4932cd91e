# The two commands of the README:
#   make train   set up, train the default small GPT on tinyshakespeare (CPU: a few minutes), sample from it
#   make test    set up and run the test suite
# Both create ./.venv first (python3 -m venv) and install the pinned requirements into it.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install train test test-triton36 clean

install: $(VENV)/.installed

# Reinstall (and so rebuild kernels._C) when the pins, the build script or the C++/CUDA sources
# change. --no-build-isolation lets setup.py see the installed torch, which decides what part of
# the C++/CUDA extension this machine can build (CUDA code only for the GPUs it sees). pip shows
# setup.py's output only with -v: the whole of it goes to $(VENV)/build.log, and only the lines that
# say what was built or skipped are shown, once each (pip runs setup.py more than once).
$(VENV)/.installed: requirements.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -v -e . --no-build-isolation --no-deps > $(VENV)/build.log 2>&1 || \
	  { tail -n 40 $(VENV)/build.log; echo "(the whole log: $(VENV)/build.log)"; exit 1; }
	@grep 'llm-from-scratch:' $(VENV)/build.log | sed 's/^ *//' | awk '!seen[$$0]++'
	touch $@

# --overwrite: each `make train` starts over in out/ (without it a second run refuses to clobber it)
train: install
	$(BIN)/llm pretrain --overwrite
	$(BIN)/llm generate --prompt "ROMEO:" --max-new-tokens 100

# The optional extras (GGUF export, TensorBoard, lm-eval) are installed for the tests of what uses them.
$(VENV)/.extras: $(VENV)/.installed requirements-extras.txt
	$(BIN)/pip install -r requirements-extras.txt
	touch $@

# -n auto: one pytest-xdist worker per core (the tests themselves use one thread each, tests/conftest.py);
# --durations: the slowest tests are named at the end, so a suite that grows slow says where.
test: install $(VENV)/.extras
	$(BIN)/python -m pytest -n auto --durations=25

# The Triton tests again with the GPU machines' triton 3.6 (beside a CPU torch 2.13), in a venv of their
# own (.ci/requirements-triton36.txt): its interpreter runs every kernel on the CPU, and the
# ahead-of-time compile checks run with triton 3.6's compiler and ptxas.  CI runs it after `make test`.
VENV36  ?= .venv-triton36
TRITON36_TESTS = tests/test_triton_attention.py tests/test_triton_layernorm.py tests/test_triton_cross_entropy.py \
                 tests/test_triton_model.py tests/test_attention_tiles.py tests/test_triton_compile.py
TRITON36_TESTS += tests/test_rope_swiglu.py
TRITON36_TESTS += tests/test_rms_norm.py

$(VENV36)/.installed: .ci/requirements-triton36.txt
	$(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/pip install -r .ci/requirements-triton36.txt
	touch $@

test-triton36: $(VENV36)/.installed
	$(VENV36)/bin/python -m pytest -n auto --durations=10 $(TRITON36_TESTS)

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info
