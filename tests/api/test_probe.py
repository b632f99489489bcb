"""The start-up probe against fake engines: every way steering can fail to
run is a reason (and so a 503 for steered requests), never a crash or a hang."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from adaras.api.glue import probe_steering


class FakeEngine:
    def __init__(self, hooked_per_request=30, stats_error=None, generate_error=None,
                 hang=False):
        self.hooked = 0
        self.per_request = hooked_per_request
        self.stats_error, self.generate_error, self.hang = stats_error, generate_error, hang
        self.aborted = []
        self.model_config = SimpleNamespace(hf_config=SimpleNamespace(
            architectures=["MistralForCausalLM"]))

    async def collective_rpc(self, method, args=()):
        op = args[0]
        if op == "stats":
            if self.stats_error:
                raise self.stats_error
            return [{"hooked_layers": self.hooked}]
        return [{}]

    async def generate(self, prompt, params, request_id):
        if self.generate_error:
            raise self.generate_error
        if self.hang:
            await asyncio.sleep(3600)
        self.hooked += self.per_request
        yield SimpleNamespace(finished=True)

    async def abort(self, request_id):
        self.aborted.append(request_id)


def registry(with_profile=True):
    entries = {"p": SimpleNamespace(version="v1")} if with_profile else {}
    return SimpleNamespace(default="p" if with_profile else None, entries=entries)


def probe(engine, reg=None, timeout_s=5.0):
    return asyncio.run(probe_steering(engine, reg or registry(), timeout_s=timeout_s))


@pytest.mark.parametrize("with_profile", [True, False])
def test_a_hook_that_runs_passes(with_profile):
    assert probe(FakeEngine(), registry(with_profile)) is None


def test_a_hook_that_never_runs_is_named():
    why = probe(FakeEngine(hooked_per_request=0))
    assert "did not reach the steering op (MistralForCausalLM)" in why


def test_a_failing_rpc_is_a_reason():
    why = probe(FakeEngine(stats_error=AttributeError("no adaras_rpc")))
    assert why.startswith("the steered probe request failed: AttributeError")


def test_a_refused_probe_request_is_a_reason():
    why = probe(FakeEngine(generate_error=ValueError("steering.profile: unknown profile 'p'")))
    assert "unknown profile" in why


def test_a_hanging_engine_is_a_reason_and_the_probe_is_aborted():
    engine = FakeEngine(hang=True)
    why = probe(engine, timeout_s=0.2)
    assert "got no answer within" in why
    assert len(engine.aborted) == 1 and engine.aborted[0].startswith("adaras-probe-")
