"""Kernel-test setup: run Triton kernels on CPU through the Triton interpreter.

Triton freezes "compiled vs interpreter" when a function is @triton.jit-decorated,
and its own helpers (tl.sum, tl.sigmoid, ...) are decorated when `triton.language`
is first imported.  So TRITON_INTERPRET=1 must be set before that import; we can
only do it if nothing (e.g. vllm via tests/engine/conftest.py) imported triton yet.
Otherwise the in-process kernel tests skip and `test_kernel_tests_in_fresh_process`
reruns them in a clean interpreter.  (`steering_kernels` jits its own kernel lazily
at first launch, so importing it does not freeze anything.)

The variable is set only while this directory's tests run (and during collection,
when `steering_kernels` imports triton): vLLM engines spawned by other test
directories must not inherit it.
"""

import os
import sys

import pytest

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if _ROOT not in sys.path:  # make `import steering_kernels` work with a bare `pytest` too
    sys.path.insert(0, _ROOT)

_PREV = os.environ.get("TRITON_INTERPRET")
_WE_SET_IT = _PREV is None and "triton.language" not in sys.modules
if _WE_SET_IT:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_finish(session):
    if _WE_SET_IT:
        os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    if _WE_SET_IT:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
