"""AdaRAS steering inside vLLM: the plugin, steered models and worker runtime.

Offline helpers for an `vllm.LLM` whose process loaded the plugin:

    llm = LLM("Qwen/Qwen3-1.7B")            # plugin registers via entry point
    load_profile(llm, "math", "math.safetensors")
    out = llm.generate(prompts, SamplingParams(extra_args={"steering": {"mode": "adaptive"}}))
    reports = pop_reports(llm, [o.request_id for o in out])
"""

from __future__ import annotations

from adaras.engine import plugin
from adaras.engine.config import SteeringConfigError, SteeringRequest, parse_steering


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
    plugin.remember_profile(llm.llm_engine.input_processor, name, loaded=True)
    return summary


def unload_profile(llm, name: str) -> bool:
    found = _rpc(llm, "unload_profile", name)
    llm.reset_prefix_cache()
    plugin.remember_profile(llm.llm_engine.input_processor, name, loaded=False)
    return found


def pop_reports(llm, request_ids: list[str] | None = None) -> dict[str, dict]:
    """Steering reports ({mode, profile, alpha, failure_probability, applied,
    neurons}) keyed by the request ids you pass (RequestOutput.request_id)."""
    raw = _rpc(llm, "pop_reports", request_ids)
    if request_ids is None:
        return raw
    return {_owner(rid, request_ids): rep for rid, rep in raw.items()}


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


__all__ = ["SteeringConfigError", "SteeringRequest", "parse_steering",
           "load_profile", "unload_profile", "pop_reports", "pop_captures"]
