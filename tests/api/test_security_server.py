"""The security review's attack requests against a real `adaras serve`: the
shared server, and one configured the way the deploy files configure it
(profiles from ADARAS_PROFILES, a steering default mode, a root path)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from adaras.profile import SteeringProfile

from .conftest import ADMIN_KEY, API_KEY, MODEL, start_server, stop_server
from .test_operations import runtime_stats, wait_for
from .test_profiles_api import shape_of

pytestmark = pytest.mark.engine

USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_invocations_needs_the_key_and_carries_the_report(server):
    url = server.url + "/invocations"
    assert httpx.post(url, json=CHAT).status_code == 401
    r = httpx.post(url, headers=USER, json={**CHAT, "steering": {"mode": "adaptive",
                                                                 "profile": "pred"}})
    assert r.status_code == 200, r.text
    assert r.json()["steering"]["failure_probability"] is not None


def test_a_client_id_cannot_take_another_clients_report(server):
    """Three concurrent adaptive requests, all sending `X-Request-Id: adaras`
    (once a prefix of every engine id): each gets its own p_fail, at once."""
    body = {"model": MODEL, "max_tokens": 3, "steering": {"mode": "adaptive", "profile": "pred"}}
    prompts = ["one two three", "four five six seven eight", "nine"]

    async def one(client, prompt):
        t0 = time.perf_counter()
        r = await client.post(server.url + "/v1/completions", json={**body, "prompt": prompt},
                              headers={**USER, "X-Request-Id": "adaras"})
        return r, time.perf_counter() - t0

    async def all_three():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(all_three())
    alone = [httpx.post(server.url + "/v1/completions", headers=USER,
                        json={**body, "prompt": p}).json()["steering"] for p in prompts]
    for (r, seconds), want in zip(results, alone):
        assert r.status_code == 200 and r.headers["x-request-id"] == "adaras"
        report = r.json()["steering"]
        assert report["failure_probability"] == pytest.approx(want["failure_probability"],
                                                              abs=1e-5)
        assert r.json()["id"] != "cmpl-adaras"
        assert seconds < 4.0  # no wait for a report that another request took


def test_reports_nobody_reads_are_not_kept(server, client):
    for mode in ("always", "adaptive", "always"):
        for _ in range(10):
            client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                      extra_body={"steering": {"mode": mode, "profile":
                                                               "a" if mode == "always"
                                                               else "pred"}})
    wait_for(lambda: runtime_stats(server)["requests"] == 0, what="the engine to go idle")
    assert runtime_stats(server)["reports"] == 0


def test_batched_prompts_get_a_report_per_prompt(server):
    prompts = ["one two three", "four five six seven eight"]
    body = {"model": MODEL, "max_tokens": 2, "steering": {"mode": "adaptive", "profile": "pred"}}
    alone = [httpx.post(server.url + "/v1/completions", headers=USER,
                        json={**body, "prompt": p}).json()["steering"]["failure_probability"]
             for p in prompts]
    assert alone[0] != pytest.approx(alone[1], abs=1e-6), "the test needs different p_fail"
    r = httpx.post(server.url + "/v1/completions", headers=USER,
                   json={**body, "prompt": prompts, "n": 2})
    choices = r.json()["steering"]["choices"]
    got = [c["failure_probability"] for c in choices]
    assert got == pytest.approx([alone[0], alone[0], alone[1], alone[1]], abs=1e-5)
    assert r.json()["steering"]["failure_probability"] is None  # they differ


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "vllm_xargs": {"adaras_salt": "adaras:x"}},
     "vllm_xargs.adaras_salt"),
    ("/v1/chat/completions", {**CHAT, "steering_fingerprint": "0" * 16},
     "steering_fingerprint"),
    ("/v1/chat/completions/batch", {**CHAT, "steering": {"mode": "always", "profile": "a"}},
     "steering"),
    ("/v1/responses", {"model": MODEL, "input": "hi", "steering": {"mode": "always"}},
     "steering"),
])
def test_steering_and_internal_fields_cannot_enter_by_another_door(server, path, body, param):
    r = httpx.post(server.url + path, headers=USER, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.fixture(scope="module")
def deployed(server_model, server_profiles, tmp_path_factory):
    """Profiles from ADARAS_PROFILES (as compose and k8s set them), adaptive
    by default, behind a proxy path, uploads capped at 64 KB."""
    env = {"ADARAS_PROFILES": f"pred={server_profiles['pred']}", "ADARAS_DEFAULT_MODE":
           "adaptive", "ADARAS_MAX_UPLOAD_MB": "0.0625"}
    srv = start_server(server_model, {}, tmp_path_factory.mktemp("deployed") / "server.log",
                       env=env, vllm_extra=("--root-path", "/api"))
    yield srv
    stop_server(srv)


def test_the_root_path_does_not_open_a_way_around_the_key(deployed):
    url = deployed.url + "/api/v1/chat/completions"
    assert httpx.post(url, json=CHAT).status_code == 401
    r = httpx.post(url, json=CHAT, headers=USER)
    assert r.status_code == 200 and r.json()["steering"]["mode"] == "adaptive"  # not skipped
    assert r.json()["steering"]["failure_probability"] is not None


def test_profiles_loaded_at_run_time_can_be_used_beside_the_environments(deployed, tmp_path):
    path = tmp_path / "late.safetensors"
    SteeringProfile.random("late", shape_of(deployed), k=6, seed=5).save(path)
    r = httpx.post(deployed.url + "/api/v1/steering/profiles", headers=ADMIN,
                   json={"name": "late", "path": str(path)})
    assert r.status_code == 201, r.text
    r = httpx.post(deployed.url + "/api/v1/chat/completions", headers=USER,
                   json={**CHAT, "steering": {"mode": "always", "profile": "late"}})
    assert r.status_code == 200, r.text
    assert r.json()["steering"]["neurons"] == 6


def test_routes_without_a_report_are_not_served_silently_unsteered(deployed):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 16}
    r = httpx.post(deployed.url + "/api/v1/responses", headers=USER, json=body)
    assert r.status_code == 400 and "adaptive" in r.json()["error"]["message"]
    r = httpx.post(deployed.url + "/api/v1/responses", headers=USER,
                   json={**body, "steering": {"mode": "off"}})
    assert r.status_code != 400, r.text


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_an_upload_over_the_cap_is_refused_while_it_streams(deployed):
    """48 MB against a 64 KB cap: a 413, and the server never holds the body
    (its memory grew by the whole upload before the fix)."""
    def body():
        yield (b"--b\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
               b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n"
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(768):
            yield b"\0" * 65536

    before = rss_mb(deployed.proc.pid)
    try:
        r = httpx.post(deployed.url + "/api/v1/steering/profiles", content=body(), timeout=60,
                       headers={**ADMIN, "content-type": "multipart/form-data; boundary=b"})
        status = r.status_code
    except httpx.HTTPError:  # the server may answer and close before the body is sent
        status = 413
    assert status == 413
    assert rss_mb(deployed.proc.pid) - before < 16
    assert not list((deployed.log.parent / "cache" / "uploads").glob("*"))
