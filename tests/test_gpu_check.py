"""scripts/gpu_check.sh, the device check a lent GPU runs in one call: here it
must skip every check cleanly, and its checks must pass on the CPU under the
Triton interpreter (so the script has run before a scarce GPU runs it) and
fail loudly when a kernel and its twin disagree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["parity silu_and_mul_steer", "parity sparse_steer_", "parity gather_slots_",
          "parity sum_slots_", "capture steer+gather+sum launch", "bench"]


def run(args, env_extra, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(env_extra)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def statuses(out: Path) -> dict:
    data = json.loads((out / "gpu_check.json").read_text())
    return {c["check"]: c["status"] for c in data["checks"]}


def test_without_a_gpu_every_check_skips_and_the_script_succeeds(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check runs for real")
    res = run(["bash", "scripts/gpu_check.sh", str(tmp_path)], {})
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.split(" ")[0] in ("PASS", "FAIL",
                                                                          "SKIPPED")]
    assert [ln.split(None, 1)[1].split(":")[0] for ln in lines] == CHECKS
    assert all(ln.startswith("SKIPPED") and "no CUDA device" in ln for ln in lines)
    assert statuses(tmp_path) == {c: "SKIPPED" for c in CHECKS}
    assert (tmp_path / "gpu_check.txt").read_text().count("SKIPPED") == len(CHECKS)


def test_the_checks_pass_under_the_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    res = run([sys.executable, "scripts/gpu_check.py", str(tmp_path)],
              {"ADARAS_GPU_CHECK_INTERPRET": "1", "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert statuses(tmp_path) == {c: "PASS" for c in CHECKS}
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "steer/fused" in text and "sum/fused" in text  # the table is written
    bench = next(c for c in json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
                 if c["check"] == "bench")
    assert all(r["sum_us"] > 0 and r["sum_fraction"] > 0 for r in bench["rows"])


BROKEN_TWIN = """
import runpy, sys, torch
import steering_kernels as sk
real = sk.apply_sparse_steer_
def off_by_a_bit(act, *a, **k):
    out = real(act, *a, **k)
    out[0, 0] += 1.0  # a row the kernel left alone
    return out
sk.apply_sparse_steer_ = off_by_a_bit
sys.argv = ["gpu_check.py", sys.argv[1]]
runpy.run_path("scripts/gpu_check.py", run_name="__main__")
"""


def test_a_kernel_that_disagrees_with_its_twin_fails_the_check(tmp_path):
    pytest.importorskip("triton")
    res = run([sys.executable, "-c", BROKEN_TWIN, str(tmp_path)],
              {"ADARAS_GPU_CHECK_INTERPRET": "1", "TRITON_INTERPRET": "1",
               "PYTHONPATH": str(ROOT)})
    assert res.returncode == 1, res.stdout + res.stderr
    got = statuses(tmp_path)
    assert got["parity sparse_steer_"] == "FAIL"
    assert got["capture steer+gather+sum launch"] == "FAIL"
    # one failure does not hide the others
    assert got["parity gather_slots_"] == got["parity sum_slots_"] == "PASS"
    assert "FAIL    parity sparse_steer_" in res.stdout


def test_the_end_to_end_check_skips_cleanly_here(tmp_path):
    """scripts/gpu_e2e_check.py needs vLLM on a GPU; here it must say so and succeed."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = run([sys.executable, "scripts/gpu_e2e_check.py", "--out", str(tmp_path / "e2e.json")],
              {})
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("SKIPPED gpu_e2e_check:")
    assert not (tmp_path / "e2e.json").exists()
