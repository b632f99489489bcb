"""Rerunning a kernel test file in a clean interpreter with TRITON_INTERPRET=1,
for when this process imported triton before the variable was set (see
conftest.py)."""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def rerun_in_fresh_process(test_file: str, tmp_path, interpreter_problem) -> None:
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
