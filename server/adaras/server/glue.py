"""Engine glue: how the HTTP layer talks to vLLM's engine and request models.

* The middleware leaves the resolved `steering` object (and the profile's
  fingerprint, for the prefix-cache salt) in the JSON body. vLLM's request
  models keep unknown fields (`extra="allow"`); `install_request_hooks` makes
  their `to_sampling_params` carry them into `SamplingParams.extra_args`,
  where the engine plugin reads them.
* `engine_rpc` calls the worker runtime through `collective_rpc`.
"""

from __future__ import annotations

from typing import Any

STEERING_KEY = "steering"
FINGERPRINT_KEY = "steering_fingerprint"


def install_request_hooks() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for cls in (ChatCompletionRequest, CompletionRequest):
        if getattr(cls, "_adaras_hooked", False):
            continue
        orig = cls.to_sampling_params

        def to_sampling_params(self, *args, _orig=orig, **kwargs):
            params = _orig(self, *args, **kwargs)
            extra = self.model_extra or {}
            if STEERING_KEY in extra:
                params.extra_args = dict(params.extra_args or {})
                params.extra_args[STEERING_KEY] = extra[STEERING_KEY]
                params.extra_args[FINGERPRINT_KEY] = extra.get(FINGERPRINT_KEY, "")
            return params

        cls.to_sampling_params = to_sampling_params
        cls._adaras_hooked = True


async def engine_rpc(engine, op: str, *args: Any) -> Any:
    """`SteeringRuntime.<op>(*args)` on every worker; rank 0's answer."""
    results = await engine.collective_rpc("adaras_rpc", args=(op, *args))
    return results[0]
