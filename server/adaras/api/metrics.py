"""Prometheus metrics (prefix `adaras_`), served at /metrics beside vLLM's own."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter("adaras_requests", "Requests by steering mode",
                   ["model", "profile", "mode"])
DECISIONS = Counter("adaras_steering_decisions", "Steering decisions (applied or skipped)",
                    ["model", "profile", "decision"])
P_FAIL = Histogram("adaras_failure_probability", "Predicted failure probability (adaptive)",
                   ["model", "profile"], buckets=[i / 20 for i in range(1, 21)])
ANSWER_P_FAIL = Histogram("adaras_answer_failure_probability",
                          "The answer probe's failure probability, per choice (answer_probe)",
                          ["model", "profile"], buckets=[i / 20 for i in range(1, 21)])
TTFT = Histogram("adaras_time_to_first_token_seconds", "Time to first token (streaming)",
                 ["model", "profile", "mode"], buckets=_LAT)
TPOT = Histogram("adaras_time_per_output_token_seconds", "Time per output token after the first",
                 ["model", "profile", "mode"], buckets=_TPOT)
E2E = Histogram("adaras_e2e_request_latency_seconds", "End-to-end request latency",
                ["model", "profile", "mode"], buckets=_LAT)
GEN_TOKENS = Counter("adaras_generation_tokens", "Generated tokens",
                     ["model", "profile", "mode"])
PROMPT_TOKENS = Counter("adaras_prompt_tokens", "Prompt tokens", ["model", "profile", "mode"])
RUNNING = Gauge("adaras_requests_running", "Requests in flight", ["model"])
ERRORS = Counter("adaras_errors", "Errors by type", ["model", "type"])
DISCONNECTS = Counter("adaras_client_disconnects", "Completion requests whose client hung up "
                      "before the response ended (vLLM aborts them)", ["model"])
