"""Steered models refuse CUDA graphs (they would freeze per-step steering)."""

from types import SimpleNamespace

import pytest
from vllm.config import CUDAGraphMode

from adaras.engine.models import check_supported


def config(mode):
    return SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=mode))


@pytest.mark.parametrize("mode", [CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL,
                                  CUDAGraphMode.FULL_AND_PIECEWISE])
def test_cuda_graphs_are_refused_with_the_fix_named(mode):
    with pytest.raises(ValueError, match="--enforce-eager"):
        check_supported(config(mode))


def test_eager_and_cpu_are_accepted():
    check_supported(config(CUDAGraphMode.NONE))
    check_supported(config(None))
