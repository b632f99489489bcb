"""AdaRAS steering inside vLLM: the plugin, steered models and worker runtime.

Offline, on any `vllm.LLM` (the plugin registers itself through its entry point):

    llm = LLM("Qwen/Qwen3-1.7B")
    load_profile(llm, "math", "math.safetensors")
    steer = Steering(profile="math", alpha=0.3)            # or mode="adaptive"
    outs = steer.reports(llm, llm.generate(prompts, SamplingParams(extra_args=steer.args())))
    outs[0].steering   # {"mode": "always", "profile": "math", "alpha": 0.3, "applied": True, ...}
"""

from __future__ import annotations

from dataclasses import dataclass

from adaras.engine import admission
from adaras.steering import (
    STEERING_KEY,
    Mode,
    SteeringConfigError,
    SteeringRequest,
    parse_steering,
)


@dataclass(frozen=True)
class Steering:
    """One steering setting for offline `vllm.LLM` requests.

    `mode` "always" steers every decode step, "adaptive" only when the
    profile's failure predictor fires on the prompt, "off" never; with
    `answer_probe` (any mode) each choice's report carries the profile's
    answer head's `answer_failure_probability`. `None`
    fields take the profile's defaults (alpha, threshold) or the engine's
    default profile. Invalid values raise SteeringConfigError (a ValueError)
    naming the field, here rather than at generate time."""

    profile: str | None = None
    alpha: float | None = None
    mode: Mode = "always"
    threshold: float | None = None
    answer_probe: bool = False  # report each choice's answer_failure_probability

    def __post_init__(self) -> None:
        parse_steering(self.request_dict())

    def request_dict(self) -> dict:
        """The `steering` object, as the HTTP API takes it."""
        return SteeringRequest(self.mode, self.profile, self.alpha, self.threshold,
                               self.answer_probe).to_dict()

    def args(self, **extra) -> dict:
        """`SamplingParams.extra_args` carrying this steering (plus `extra`)."""
        return {**extra, STEERING_KEY: self.request_dict()}

    @staticmethod
    def reports(llm, outputs: list) -> list:
        """Attach each output's steering report as `output.steering` (its first
        choice's; None for a request that carried no steering) and return the
        outputs. Each choice's own report is `output.outputs[i].steering`."""
        got = reports_of(outputs)
        for o in outputs:
            o.steering = got.get(o.request_id)
        return outputs


def _rpc(llm, op: str, *args):
    """Call `SteeringRuntime.<op>` on every worker; return rank 0's answer."""
    results = llm.collective_rpc("adaras_rpc", args=(op, *args))
    return results[0]


def load_profile(llm, name: str, path: str) -> dict:
    """Load a profile file into every worker under `name`; returns its summary.
    The prefix cache is reset so no KV computed under an older profile of the
    same name is reused."""
    summary = _rpc(llm, "load_profile", name, str(path))
    llm.reset_prefix_cache()
    admission.remember_profile(llm.llm_engine.input_processor, name, loaded=True)
    return summary


def unload_profile(llm, name: str) -> bool:
    found = _rpc(llm, "unload_profile", name)
    llm.reset_prefix_cache()
    admission.remember_profile(llm.llm_engine.input_processor, name, loaded=False)
    return found


def reports_of(outputs: list) -> dict[str, dict]:
    """Steering reports ({mode, profile, alpha, failure_probability, applied,
    neurons}) of finished RequestOutputs, keyed by RequestOutput.request_id:
    the first choice's (see `CompletionOutput.steering` for each). Requests
    that carried no steering are left out. The reports came with the outputs
    (`adaras.engine.reports`): the engine holds nothing to collect."""
    out = {}
    for o in outputs:
        report = next((c.steering for c in o.outputs if getattr(c, "steering", None)), None)
        if report is not None:
            out[o.request_id] = report
    return out


def _owner(engine_id: str, request_ids: list[str]) -> str:
    """Which of the caller's request ids an engine request id belongs to."""
    from adaras.engine.runtime import belongs_to

    return next(w for w in request_ids if belongs_to(engine_id, w))


def pop_captures(llm, request_ids: list[str]) -> dict[str, dict]:
    """Finished activation captures (`extra_args["adaras_capture"]`) keyed by
    the request ids you pass: {"count", "mean": float32 [L, I], "tokens":
    float32 [T, F]}. Tensor-parallel shards of `mean` are joined here."""
    import numpy as np

    def array(raw) -> np.ndarray:
        data, shape = raw
        return np.frombuffer(data, dtype=np.float32).reshape(shape)

    per_rank = llm.collective_rpc("adaras_rpc", args=("pop_captures", request_ids))
    out = {}
    for rid, first in per_rank[0].items():
        result = dict(first)
        if "mean" in first:  # each rank holds its slice of the neurons
            result["mean"] = np.concatenate([array(r[rid]["mean"]) for r in per_rank], axis=1)
        if "tokens" in first:  # all-reduced: the same on every rank
            result["tokens"] = array(first["tokens"])
        out[_owner(rid, request_ids)] = result
    return out


__all__ = ["Steering", "SteeringConfigError", "SteeringRequest", "parse_steering",
           "load_profile", "unload_profile", "reports_of", "pop_captures"]
