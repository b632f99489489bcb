"""Shared vLLM engines on tiny offline models.

Starting a CPU engine costs ~20-40 s, so each engine is created once per test
session and shared. Whether the plugin is active is decided per engine by the
`ADARAS_PLUGIN` variable its spawned processes inherit; the test process
itself always registers the plugin so its frontend patches are installed.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from adaras.engine import plugin  # noqa: E402
from adaras.predictor import FailurePredictor  # noqa: E402
from adaras.profile import ModelShape, SteeringProfile  # noqa: E402
from adaras.tiny_models import make_tiny_model  # noqa: E402

plugin.register()

# Small batches force chunked prefill on the longer prompts used here.
ENGINE_KW = dict(
    max_model_len=512,
    max_num_batched_tokens=32,
    max_num_seqs=32,
    dtype="float32",
    seed=0,
    enable_prefix_caching=True,
    enable_chunked_prefill=True,
    block_size=32,
)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_llm(model_dir, *, plugin_on: bool = True, profiles: dict | None = None, **kw):
    from vllm import LLM

    env = {"ADARAS_PLUGIN": "1" if plugin_on else "0"}
    if profiles:
        env["ADARAS_PROFILES"] = ",".join(f"{k}={v}" for k, v in profiles.items())
    with _env(**env):
        return LLM(str(model_dir), **{**ENGINE_KW, **kw})


def shutdown(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _shape(model_dir) -> ModelShape:
    import transformers

    return ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(model_dir))


def random_head(shape: ModelShape, seed: int, features: int) -> FailurePredictor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(shape.num_layers * shape.intermediate_size, generator=g)[:features]
    predictor = FailurePredictor(
        (flat // shape.intermediate_size).to(torch.int32),
        (flat % shape.intermediate_size).to(torch.int32),
        hidden=16,
    )
    with torch.no_grad():
        for p in predictor.parameters():
            p.normal_(0.0, 0.5, generator=g)
    return predictor.eval()


def make_profiles(model_dir, out_dir) -> dict[str, str]:
    """Two plain profiles (a, b) and one with a failure predictor and an
    answer head (pred)."""
    shape = _shape(model_dir)
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        prof = SteeringProfile.random(name, shape, k=24, seed=seed, scale=3.0, default_alpha=0.5)
        paths[name] = str(out_dir / f"{name}.safetensors")
        prof.save(paths[name])
    prof = SteeringProfile.random("pred", shape, k=24, seed=3, scale=3.0, default_alpha=0.5)
    prof.predictor = random_head(shape, 4, 32)
    prof.answer_predictor = random_head(shape, 5, 24)
    prof.threshold = 0.5
    paths["pred"] = str(out_dir / "pred.safetensors")
    prof.save(paths["pred"])
    return paths


@pytest.fixture(scope="session")
def qwen3_dir(models_dir):
    return make_tiny_model(models_dir / "qwen3", "qwen3")


@pytest.fixture(scope="session")
def qwen3_profiles(qwen3_dir, tmp_path_factory):
    return make_profiles(qwen3_dir, tmp_path_factory.mktemp("profiles-qwen3"))


@pytest.fixture(scope="session")
def qwen3_llm(qwen3_dir, qwen3_profiles):
    llm = start_llm(qwen3_dir, profiles=qwen3_profiles)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="session")
def qwen3_stock(qwen3_dir):
    llm = start_llm(qwen3_dir, plugin_on=False)
    yield llm
    shutdown(llm)


def prompt_ids(n: int, length: int, seed: int = 0, vocab: int = 400) -> list[list[int]]:
    """`n` distinct token-id prompts (ids above the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(n)]


def stats(llm) -> dict:
    """The worker runtime's stats (SteeringRuntime.stats) of rank 0."""
    return llm.collective_rpc("adaras_rpc", args=("stats",))[0]


def generate(llm, prompts: list[list[int]], params) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
