# Two commands on a fresh CPU machine:
#   make serve   install everything, then serve the default model
#   make test    install everything (incl. test tools), then run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
EXTRAS ?= cpu,test

.PHONY: install install-gpu test test-fast lint serve bench clean

install:
	$(PIP) install -c constraints-cpu.txt -e ".[$(EXTRAS)]"
	# PyPI's torchvision/torchaudio/torchcodec break `import vllm` next to the CPU torch.
	$(PIP) uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

install-gpu:
	$(PIP) install -e ".[gpu,test]"

test: install lint
	$(PYTHON) -m pytest -q

# Kernel, profile and predictor tests only (no engine start-up).
test-fast:
	$(PYTHON) -m pytest -q -m "not engine and not slow"

lint:
	$(PYTHON) -m ruff check server steering_kernels tests benchmarks scripts

serve: install
	$(PYTHON) -m adaras.cli serve

bench:
	$(PYTHON) benchmarks/bench_overhead.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
