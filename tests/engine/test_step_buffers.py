"""The step buffers, driven by hand (no engine): allocated once, filled in
place every step, whatever the batch mix. The steering op reads them, so their
addresses must never change (a captured CUDA graph would keep the old ones),
rows past the step's tokens must read slot 0, and the rows they steer must get
exactly alpha * delta at their profile's neurons: checked against the profile
itself, through the op's CPU plan and through its table path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adaras.engine import models, step
from adaras.engine.runtime import SteeringRuntime
from adaras.profile import MAX_NEURONS_PER_LAYER, ModelShape, ProfileError, SteeringProfile

SHAPE = ModelShape("Qwen3ForCausalLM", num_layers=3, intermediate_size=64, hidden_size=32)
MAX_TOKENS = 48


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.delenv("ADARAS_PROFILES", raising=False)
    monkeypatch.delenv("ADARAS_DEFAULT_PROFILE", raising=False)
    rt = SteeringRuntime(SHAPE, 0, 1, torch.device("cpu"), max_tokens=MAX_TOKENS, max_requests=6)
    for name, k, seed in (("a", 12, 1), ("b", 5, 2)):
        SteeringProfile.random(name, SHAPE, k=k, seed=seed, scale=1.0).save(tmp_path / f"{name}.st")
        rt.load_profile(name, str(tmp_path / f"{name}.st"))
    return rt


def params(mode="always", profile="a", alpha=1.0):
    steering = {"mode": mode} if mode == "off" else {"mode": mode, "profile": profile, "alpha": alpha}
    return SimpleNamespace(extra_args={"steering": steering})


# Each step: (req_id, scheduled tokens, computed tokens, prompt length, params if new)
PROMPT = 6
STEPS = [
    [("r1", 6, 0, PROMPT, params(alpha=1.0)), ("u1", 6, 0, PROMPT, params("off"))],
    [("r1", 1, 6, PROMPT, None), ("u1", 1, 6, PROMPT, None),
     ("r2", 6, 0, PROMPT, params(profile="b", alpha=2.0)), ("r3", 4, 0, PROMPT, params(alpha=0.5))],
    [("u1", 1, 7, PROMPT, None)],  # only an unsteered request: no context at all
    [("r2", 1, 6, PROMPT, None), ("r3", 2, 4, PROMPT, None), ("r4", 6, 0, PROMPT, params(alpha=1.0)),
     ("r1", 1, 7, PROMPT, None), ("u2", 20, 0, 30, params("off"))],
    [("r2", 1, 7, PROMPT, None)],
    [],  # idle
    [("r1", 1, 8, PROMPT, None)],
]
SETTINGS = {"r1": ("a", 1.0), "r2": ("b", 2.0), "r3": ("a", 0.5), "r4": ("a", 1.0)}


def begin(rt, batch):
    ids = [rid for rid, *_ in batch]
    return rt.begin_step(ids, {rid: i for i, rid in enumerate(ids)},
                         np.array([b[1] for b in batch], dtype=np.int32),
                         np.array([b[2] for b in batch], dtype=np.int32),
                         np.array([b[3] for b in batch], dtype=np.int32),
                         [(b[0], b[4]) for b in batch if b[4] is not None])


def expected_delta(rt, batch, T_pad: int, layer: int) -> torch.Tensor:
    """fp32 [T_pad, I]: alpha * delta at each steered row's profile neurons,
    straight from the SteeringProfile (no runtime tables)."""
    want = torch.zeros(T_pad, SHAPE.intermediate_size)
    row = 0
    for rid, n, computed, prompt, _ in batch:
        if rid in SETTINGS:
            name, alpha = SETTINGS[rid]
            prof = rt.profiles[name].profile
            at = prof.layers == layer
            for r in range(row, row + n):
                if computed + (r - row) >= prompt:  # decode positions only
                    want[r, prof.neurons[at].long()] += alpha * prof.delta[at]
        row += n
    return want


def test_buffers_keep_their_addresses_and_steer_exactly_whatever_the_batch(runtime):
    buf = runtime.buffers
    ptrs = (buf.row_slot.data_ptr(), buf.steer_idx.data_ptr(), buf.steer_val.data_ptr())
    assert buf.steer_idx.shape == (7, SHAPE.num_layers, MAX_NEURONS_PER_LAYER)
    seen_ctx = 0
    for batch in STEPS:
        ctx = begin(runtime, batch)
        assert (buf.row_slot.data_ptr(), buf.steer_idx.data_ptr(), buf.steer_val.data_ptr()) == ptrs
        T = sum(b[1] for b in batch)
        assert not bool(buf.row_slot[T:].any()), "rows past the step's tokens must read slot 0"
        steered = any(rid in SETTINGS and c + n > p for rid, n, c, p, _ in batch)
        assert (ctx is not None) == steered
        if ctx is not None:
            seen_ctx += 1
            assert ctx.buffers is buf and step.current() is ctx
            T_pad = T + 3  # vLLM pads the token count (e.g. to a graph size)
            gen = torch.Generator().manual_seed(T)
            act = torch.randn(T_pad, SHAPE.intermediate_size, generator=gen)
            for layer in range(SHAPE.num_layers):
                want = act + expected_delta(runtime, batch, T_pad, layer)
                planned = act.clone()  # the CPU plan
                models.add_steering_(planned, ctx, layer)
                tabled = act.clone().t().contiguous().t()  # not contiguous: the table path
                models.add_steering_(tabled, ctx, layer)
                torch.testing.assert_close(planned, want, rtol=0, atol=1e-6)
                assert torch.equal(planned, tabled)
                untouched = (want == act).all(dim=1)
                assert torch.equal(planned[untouched], act[untouched])  # bitwise stock rows
        runtime.end_step()
        assert step.current() is None
    assert seen_ctx == 4  # steps 2, 4, 5 and 7 steer a row


def test_a_profile_with_too_many_neurons_in_one_layer_is_refused():
    k = MAX_NEURONS_PER_LAYER + 1
    shape = ModelShape("Qwen3ForCausalLM", num_layers=2, intermediate_size=2 * k, hidden_size=8)
    prof = SteeringProfile("wide", torch.zeros(k, dtype=torch.int32),
                           torch.arange(k, dtype=torch.int32), torch.ones(k), shape)
    with pytest.raises(ProfileError, match=f"layer 0 has {k} neurons.*at most {k - 1} per layer"):
        prof.validate()


def test_the_kernel_path_refuses_a_predictor_wider_than_its_gather(tmp_path):
    """A profile whose predictor reads more features than GatherBuffers hold
    is refused at load, naming the fix, instead of failing mid-step."""
    from adaras.engine.profile_store import ProfileStore
    from adaras.predictor import FailurePredictor
    from adaras.profile import ModelShape, ProfileError, SteeringProfile

    shape = ModelShape("Qwen3ForCausalLM", num_layers=2, intermediate_size=64, hidden_size=8)
    prof = SteeringProfile.random("wide", shape, k=4)
    flat = torch.randperm(128)[:40]
    prof.predictor = FailurePredictor((flat // 64).to(torch.int32), (flat % 64).to(torch.int32),
                                      hidden=4).eval()
    path = tmp_path / "wide.safetensors"
    prof.save(path)
    cpu = ProfileStore(shape, (0, 64), torch.device("cpu"))
    assert cpu.load("wide", str(path), set())["k"] == 4  # the CPU path has no such limit
    narrow = ProfileStore(shape, (0, 64), torch.device("cpu"), max_features=32)
    with pytest.raises(ProfileError, match="reads 40 features; this engine's feature gather "
                                           "holds 32"):
        narrow.load("wide", str(path), set())
    assert "wide" not in narrow.by_name
