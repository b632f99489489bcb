"""Kernel-test setup.

Triton's interpreter (needed to run @triton.jit kernels on CPU tensors) is
selected by TRITON_INTERPRET when a kernel is decorated/jitted.  Set it before
anything imports triton kernels; ``steering_kernels`` additionally jits lazily
at first launch, so import order does not matter for it.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

# Make `import steering_kernels` work with a bare `pytest` too (not only `python -m pytest`).
_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
