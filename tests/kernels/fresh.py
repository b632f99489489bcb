"""Running the Triton kernel tests on CPU: through the Triton interpreter in
this process when it can (see conftest.py), else by rerunning the test file
in a clean interpreter with TRITON_INTERPRET=1 (each kernel file has one
`*_in_fresh_process` test that does so)."""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def interpreter_problem() -> str | None:
    """None if Triton kernels can run in this process on CPU tensors, else why not."""
    import steering_kernels as sk

    if not sk.HAS_TRITON:
        return "triton not importable"
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if not triton.knobs.runtime.interpret:
        return "TRITON_INTERPRET is not 1 (CPU tensors need the interpreter)"
    if isinstance(tl.sum, JITFunction):
        # triton.language's own @jit helpers were built before TRITON_INTERPRET=1
        # (e.g. tests/engine imported vllm first).
        return "triton.language was imported before TRITON_INTERPRET=1"
    return None


def interpret_or_skip() -> None:
    """For a test that launches a kernel: skip unless this process can
    interpret it (its file's fresh-process test then runs it)."""
    pytest.importorskip("triton")
    if problem := interpreter_problem():
        pytest.skip(f"{problem}; covered by this file's *_in_fresh_process test")


def rerun_in_fresh_process(test_file: str, tmp_path) -> None:
    pytest.importorskip("triton")
    if interpreter_problem() is None:
        pytest.skip("kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp_path))
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
         "-k", "not fresh_process"],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0 and "passed" in summary and "skipped" not in summary, (
        res.stdout[-4000:] + res.stderr[-2000:]
    )
