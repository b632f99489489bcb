"""Operations: auth, metrics, concurrency, disconnects, logging, draining on
shutdown, and a schemathesis fuzz pass over the OpenAPI spec."""

from __future__ import annotations

import asyncio
import os
import re
import time

import httpx
import pytest

from .conftest import ADMIN_KEY, API_KEY, MODEL, start_server, stop_server

pytestmark = pytest.mark.engine

USER = {"Authorization": f"Bearer {API_KEY}"}


def metric(server, name: str, **labels) -> float:
    """Sum of a Prometheus sample over series matching `labels`."""
    total = 0.0
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, value = line.rsplit(" ", 1)
        got = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


# ---- auth ------------------------------------------------------------------

def test_api_key_is_required_and_health_and_metrics_stay_open(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json=body,
                   headers={"Authorization": "Bearer wrong-key-000"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=USER).status_code == 200
    # the admin key is also a valid API key
    assert httpx.get(server.url + "/v1/models",
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_no_keys_means_open_api_and_no_profile_admin():
    """The ASGI layer alone, without a configured key (no engine needed)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from adaras.api.auth import ApiKeyMiddleware

    inner = Starlette(routes=[Route("/v1/models", lambda r: PlainTextResponse("ok"))])
    open_app = TestClient(ApiKeyMiddleware(inner, api_key=None, admin_key=None, model="m"))
    assert open_app.get("/v1/models").status_code == 200
    locked = TestClient(ApiKeyMiddleware(inner, api_key="k" * 10, admin_key=None, model="m"))
    assert locked.get("/v1/models").status_code == 401
    assert locked.get("/v1/models", headers={"Authorization": "Bearer " + "k" * 10}).status_code \
        == 200


# ---- metrics -----------------------------------------------------------------

def test_metrics_move_with_requests(server, client):
    import openai

    before = {
        "always": metric(server, "adaras_requests_total", mode="always", profile="a"),
        "adaptive": metric(server, "adaras_requests_total", mode="adaptive", profile="pred"),
        "pfail": metric(server, "adaras_failure_probability_count", profile="pred"),
        "decisions": metric(server, "adaras_steering_decisions_total", profile="pred"),
        "tokens": metric(server, "adaras_generation_tokens_total", mode="always"),
        "ttft": metric(server, "adaras_time_to_first_token_seconds_count", mode="always"),
        "errors": metric(server, "adaras_errors_total", type="bad_request"),
    }
    always = {"steering": {"mode": "always", "profile": "a"}, "ignore_eos": True}
    client.completions.create(model=MODEL, prompt="a b c", max_tokens=5, temperature=0,
                              extra_body=always)
    list(client.completions.create(model=MODEL, prompt="a b c", max_tokens=5, stream=True,
                                   extra_body=always))
    client.completions.create(model=MODEL, prompt="a b c", max_tokens=3,
                              extra_body={"steering": {"mode": "adaptive", "profile": "pred"}})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                  extra_body={"steering": {"mode": "nope"}})
    assert metric(server, "adaras_requests_total", mode="always", profile="a") == \
        before["always"] + 2
    assert metric(server, "adaras_requests_total", mode="adaptive", profile="pred") == \
        before["adaptive"] + 1
    assert metric(server, "adaras_failure_probability_count", profile="pred") == \
        before["pfail"] + 1
    assert metric(server, "adaras_steering_decisions_total", profile="pred") == \
        before["decisions"] + 1
    assert metric(server, "adaras_generation_tokens_total", mode="always") == \
        before["tokens"] + 10
    assert metric(server, "adaras_time_to_first_token_seconds_count", mode="always") == \
        before["ttft"] + 1
    assert metric(server, "adaras_errors_total", type="bad_request") == before["errors"] + 1
    assert metric(server, "adaras_requests_running") == 0
    text = httpx.get(server.url + "/metrics").text
    assert "vllm:num_requests_running" in text  # vLLM's own metrics stay available
    assert f'model="{MODEL}"' in text


# ---- load ----------------------------------------------------------------------

def test_32_concurrent_mixed_streams_have_no_errors(aclient):
    modes = [{"mode": "off"}, {"mode": "always", "profile": "a", "alpha": 0.5},
             {"mode": "adaptive", "profile": "pred"}, None]

    async def one(i):
        kw = {"extra_body": {"steering": modes[i % 4]}} if modes[i % 4] else {}
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"question {i}"}],
            max_tokens=16, temperature=0.7, seed=i, stream=True, **kw)
        chunks = [c async for c in stream]
        return chunks[-1].model_extra["steering"], chunks[-1].choices[0].finish_reason

    async def run():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    for i, (report, finish) in enumerate(results):
        assert finish in ("length", "stop")
        assert report["mode"] == (modes[i % 4] or {"mode": "off"})["mode"]
        if report["mode"] == "adaptive":
            assert report["failure_probability"] is not None


# ---- disconnects, logging ----------------------------------------------------------

def settled(server, name: str, **labels) -> float:
    """`metric` once the engine is idle and the counter stopped moving: vLLM's
    stat logger can record a request a moment after its client saw the end."""
    deadline, last = time.time() + 10, None
    while time.time() < deadline:
        now = metric(server, name, **labels)
        if now == last and metric(server, "vllm:num_requests_running") == 0:
            return now
        last = now
        time.sleep(0.3)
    raise AssertionError(f"{name} did not settle")


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def runtime_stats(server) -> dict:
    r = httpx.get(server.url + "/v1/steering/runtime", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_runtime_stats_need_the_admin_key(server):
    assert httpx.get(server.url + "/v1/steering/runtime", headers=USER).status_code == 401
    stats = runtime_stats(server)
    assert set(stats["profiles"]) >= {"a", "pred"} and stats["hooked_layers"] > 0
    assert stats["unavailable"] is None
    # how this start got its graphs (the README's start-up section points here): this
    # server is compiled, so its plain graph was compiled or loaded, and so was a graph
    assert stats["plain_graph"] == "compiled"
    assert stats["plain_graph_from"] in ("loaded", "compiled")
    assert stats["graphs_loaded"] + stats["graphs_compiled"] >= 1


def test_adaptive_requests_read_the_prefix_cache_through_the_api(server, client):
    """The API sets the profile version, so the second adaptive request with
    the same long prompt takes its prompt blocks (128 tokens each on the CPU)
    from the prefix cache with their predictor states, and gets the same p_fail."""
    prompt = " ".join(f"w{i % 37}" for i in range(600))
    before = runtime_stats(server)["prefix_tokens_restored"]
    p_fail = []
    for _ in range(2):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                        extra_body={"steering": {"mode": "adaptive",
                                                                 "profile": "pred"}})
        report = out.model_extra["steering"]
        assert "error" not in report, report
        p_fail.append(report["failure_probability"])
    stats = runtime_stats(server)
    assert stats["prefix_tokens_restored"] - before >= 128 and stats["prefix_states"] > 0
    assert p_fail[1] == pytest.approx(p_fail[0], abs=1e-5)


def test_start_up_probe_ran_the_steering_op(server):
    assert "start-up probe: the steering op ran" in server.log_text()


MAX_TOKENS = 2000  # with ignore_eos and 2048 positions: the most this server can be asked


def hang_up_before_the_answer(server, body: dict, tries: int = 3) -> float:
    """A non-streamed request whose client gives up after 0.5 s. The tiny model
    needs about 2 s for it, but a client starved of CPU under a full CI run has
    woken up to a complete answer; that is no hang-up, so it tries again.
    Returns the engine's generated-token count before the hung-up request."""
    answers = []
    for _ in range(tries):
        generated = settled(server, "vllm:generation_tokens_total")
        start = time.monotonic()
        try:
            r = httpx.post(server.url + "/v1/completions", json=body, headers=USER, timeout=0.5)
        except httpx.ReadTimeout:
            return generated
        answers.append(f"{r.status_code} after {time.monotonic() - start:.2f} s: {r.text[:200]}")
    pytest.fail(f"the server answered before the client could hang up: {answers}")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request_and_leaves_no_state(server, stream):
    disconnects = metric(server, "adaras_client_disconnects_total")
    generated = settled(server, "vllm:generation_tokens_total")
    body = {"model": MODEL, "prompt": "one", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": stream, "steering": {"mode": "always", "profile": "a"}}
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=USER) as r:
            for _ in r.iter_lines():
                break  # hang up after the first event
    else:
        generated = hang_up_before_the_answer(server, body)
    # The middleware counts the hang-up in the same `finally` that ends the request,
    # so this cannot lag behind the request's end.
    wait_for(lambda: metric(server, "adaras_client_disconnects_total") == disconnects + 1,
             what="the disconnect to be recorded")
    assert metric(server, "adaras_requests_running") == 0
    # The worker released the request: vLLM dropped it (finished or aborted) ...
    wait_for(lambda: runtime_stats(server)["requests"] == 0, what="the worker to release it")
    # ... and it was aborted: the engine stopped short of max_tokens. (A third of it
    # was the bound before; under a full CI run the tiny model once produced 1610
    # tokens between the hang-up and the abort, so the margin depends on load.)
    assert settled(server, "vllm:generation_tokens_total") - generated < MAX_TOKENS - 100


def test_every_request_is_logged_with_id_mode_and_decision(server, client):
    out = client.completions.create(model=MODEL, prompt="log me", max_tokens=2,
                                    extra_body={"steering": {"mode": "adaptive",
                                                             "profile": "pred"}})
    rid = out.id.removeprefix("cmpl-")
    time.sleep(0.5)
    line = next(ln for ln in server.log_text().splitlines() if rid in ln and "mode=" in ln)
    assert "mode=adaptive" in line and "applied=" in line and "p_fail=" in line


# ---- fuzz ----------------------------------------------------------------------------

# Operations that reconfigure the engine itself; not for a fuzzer.
NOT_FUZZED = r"^/(scale_elastic_ep|is_scaling_elastic_ep)$"
FUZZ_EXAMPLES = int(os.environ.get("ADARAS_FUZZ_EXAMPLES", "12"))  # per operation


def test_schemathesis_over_the_whole_spec_finds_no_5xx_and_no_error_log(
        server_model, server_profiles, tmp_path):
    """Every operation of /openapi.json (chat, completions, responses, models,
    tokenizer, profiles, runtime, ...), generated bodies with a fixed seed, on a
    server of its own (the fuzzer loads and unloads profiles). Requests that
    would generate for long are cut by a client timeout: a disconnect, which
    must leave no trace either."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    # 256 positions: a generated request without max_tokens ends within a second
    srv = start_server(server_model, dict(server_profiles), tmp_path / "fuzz.log",
                       max_model_len=256)
    failures, cases, timeouts = [], 0, 0
    try:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        schema = schema.exclude(path_regex=NOT_FUZZED)
        for op in schema.get_all_operations():
            operation = op.ok()

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                      derandomize=True, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def check(case):
                nonlocal cases, timeouts
                cases += 1
                try:
                    response = case.call(base_url=srv.url, timeout=5, headers={
                        "Authorization": f"Bearer {ADMIN_KEY}"})
                except Exception as e:  # noqa: BLE001 - a client timeout is a disconnect
                    if "timeout" in type(e).__name__.lower() or "Timeout" in str(e):
                        timeouts += 1
                        return
                    raise
                if response.status_code >= 500 and response.status_code != 501:  # 501: the model lacks it
                    failures.append((case.method, case.formatted_path, response.status_code,
                                     response.text[:200]))

            check()
        time.sleep(2)
        errors = [ln for ln in srv.log_text().splitlines()
                  if re.search(r"\bERROR\b|Traceback", ln)]
    finally:
        stop_server(srv)
    print(f"schemathesis: {cases} cases, {timeouts} client timeouts, {len(failures)} 5xx")
    assert cases >= 100
    assert not failures, failures
    assert not errors, "\n".join(errors[:20])


# ---- shutdown ---------------------------------------------------------------------

def test_sigterm_drains_requests_in_flight(server_model, server_profiles, tmp_path):
    srv = start_server(server_model, {"a": server_profiles["a"]}, tmp_path / "drain.log",
                       api_key=None, admin_key=None)
    try:
        body = {"model": MODEL, "prompt": "one", "max_tokens": 1500, "ignore_eos": True,
                "stream": True, "steering": {"mode": "always", "profile": "a"}}
        finish = None
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            for i, line in enumerate(r.iter_lines()):
                if i == 1:
                    srv.proc.send_signal(15)  # SIGTERM to the server process
                if '"finish_reason": "length"' in line or '"finish_reason":"length"' in line:
                    finish = "length"
        assert finish == "length", "the request in flight was cut off instead of drained"
    finally:
        code = stop_server(srv)
    assert code is not None


def test_steering_is_refused_with_the_reason_when_the_plugin_is_off(server_model, server_profiles,
                                                                   tmp_path):
    # The plugin switched off in the engine: the steering op can never run.
    srv = start_server(server_model, {"a": server_profiles["a"]}, tmp_path / "off.log",
                       api_key=None, admin_key=None, env={"ADARAS_PLUGIN": "0"})
    try:
        body = {"model": MODEL, "prompt": "one", "max_tokens": 2}
        r = httpx.post(srv.url + "/v1/completions", json={**body, "steering": {"mode": "always"}})
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["type"] == "ServiceUnavailableError"
        assert "steering is unavailable" in error["message"]
        assert "ADARAS_PLUGIN=0" in error["message"]
        # unsteered requests are still served
        assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 200
        assert "steering disabled" in srv.log_text()
    finally:
        stop_server(srv)


def test_health_is_503_when_the_engine_dies(server_model, server_profiles, tmp_path,
                                            monkeypatch):
    import psutil

    # Keep the HTTP server up after the engine dies so /health can be observed
    # (by default vLLM's watchdog then stops the server, and the pod restarts).
    monkeypatch.setenv("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "1")
    srv = start_server(server_model, {"a": server_profiles["a"]}, tmp_path / "dead.log",
                       api_key=None, admin_key=None)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        engines = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
                   if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
        assert engines, "no engine core process found"
        for p in engines:
            p.kill()
        deadline = time.time() + 30
        status = None
        while time.time() < deadline:
            status = httpx.get(srv.url + "/health").status_code
            if status == 503:
                break
            time.sleep(0.5)
        assert status == 503
    finally:
        stop_server(srv)
