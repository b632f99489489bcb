"""`/v1/steering/profiles`: list, show, load (path or upload), unload, admin
key, refusals, and atomic swaps under load."""

from __future__ import annotations

import threading

import httpx
import pytest

from adaras.profile import ModelShape, SteeringProfile

from .conftest import ADMIN_KEY, API_KEY, MODEL

pytestmark = pytest.mark.engine

USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def shape_of(server) -> ModelShape:
    import transformers

    return ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(server.model_dir))


def test_list_and_show(server):
    r = httpx.get(server.url + "/v1/steering/profiles", headers=USER)
    assert r.status_code == 200
    body = r.json()
    assert {p["name"] for p in body["data"]} == {"a", "pred"}
    assert body["default"] == "a"
    r = httpx.get(server.url + "/v1/steering/profiles/pred", headers=USER)
    info = r.json()
    assert info["k"] == 24 and info["has_predictor"] is True
    assert sum(info["layer_histogram"]) == 24 and len(info["layer_histogram"]) == 2
    assert info["provenance"]["synthetic"] is True and info["fingerprint"]
    assert httpx.get(server.url + "/v1/steering/profiles/zzz", headers=USER).status_code == 404


def test_load_from_path_needs_admin_and_can_be_used_then_unloaded(server, client, tmp_path):
    path = tmp_path / "c.safetensors"
    SteeringProfile.random("c", shape_of(server), k=8, seed=21, scale=3.0).save(path)
    body = {"name": "c", "path": str(path)}
    url = server.url + "/v1/steering/profiles"
    assert httpx.post(url, json=body, headers=USER).status_code == 401
    assert httpx.post(url, json=body).status_code == 401
    r = httpx.post(url, json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["k"] == 8
    out = client.completions.create(model=MODEL, prompt="one two", max_tokens=3,
                                    extra_body={"steering": {"mode": "always", "profile": "c"}})
    assert out.model_extra["steering"]["neurons"] == 8
    assert httpx.delete(url + "/c", headers=USER).status_code == 401
    assert httpx.delete(url + "/c", headers=ADMIN).status_code == 204
    assert httpx.delete(url + "/c", headers=ADMIN).status_code == 404
    r = httpx.post(server.url + "/v1/completions", headers=USER, json={
        "model": MODEL, "prompt": "x", "max_tokens": 2, "steering": {"mode": "always",
                                                                     "profile": "c"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.profile"


def test_upload(server, tmp_path):
    path = tmp_path / "up.safetensors"
    SteeringProfile.random("up", shape_of(server), k=5, seed=22).save(path)
    url = server.url + "/v1/steering/profiles"
    with path.open("rb") as f:
        r = httpx.post(url, headers=ADMIN, data={"name": "uploaded"},
                       files={"file": ("up.safetensors", f, "application/octet-stream")})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "uploaded" and r.json()["source"] == "upload:up.safetensors"
    uploads = server.log.parent / "cache" / "uploads"
    assert [p.name.split(".")[0] for p in uploads.iterdir()] == ["uploaded"]
    assert httpx.delete(url + "/uploaded", headers=ADMIN).status_code == 204
    assert list(uploads.iterdir()) == []  # deleted with its profile


def test_refusals(server, tmp_path):
    url = server.url + "/v1/steering/profiles"
    other = tmp_path / "other.safetensors"
    SteeringProfile.random("o", ModelShape("Qwen3ForCausalLM", 3, 100, 64), k=4).save(other)
    r = httpx.post(url, json={"name": "o", "path": str(other)}, headers=ADMIN)
    assert r.status_code == 400 and "shape" in r.json()["error"]["message"].lower() or \
        "layers" in r.text
    for bad in ("../etc", "a/b", "..", ".hidden", "x" * 65):
        r = httpx.post(url, json={"name": bad, "path": str(other)}, headers=ADMIN)
        assert r.status_code in (400, 422), (bad, r.text)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a profile")
    r = httpx.post(url, json={"name": "junk", "path": str(junk)}, headers=ADMIN)
    assert r.status_code == 400
    r = httpx.post(url, json={"name": "nofile", "path": str(tmp_path / "missing")},
                   headers=ADMIN)
    assert r.status_code == 400
    with other.open("rb") as f:  # an upload for another model is refused too
        r = httpx.post(url, headers=ADMIN, data={"name": "o2"},
                       files={"file": ("o.safetensors", f, "application/octet-stream")})
    assert r.status_code == 400
    names = {p["name"] for p in httpx.get(url, headers=USER).json()["data"]}
    assert names == {"a", "pred"}


def test_swap_over_http_keeps_streams_on_their_profile(server, client, tmp_path):
    """A stream that starts on profile `swap` v1 finishes on v1 when `swap` is
    replaced by v2 during it; new requests get v2. (Whether the engine was
    still generating at the swap depends on timing here; the deterministic
    mid-request swap is tests/engine: test_reloading_a_profile_mid_request.)"""
    shape = shape_of(server)
    v1, v2 = tmp_path / "v1.safetensors", tmp_path / "v2.safetensors"
    SteeringProfile.random("swap", shape, k=24, seed=31, scale=3.0).save(v1)
    SteeringProfile.random("swap", shape, k=24, seed=32, scale=3.0).save(v2)
    url = server.url + "/v1/steering/profiles"
    kw = dict(model=MODEL, prompt="one two three", max_tokens=1500, temperature=0,
              extra_body={"steering": {"mode": "always", "profile": "swap", "alpha": 1.0},
                          "ignore_eos": True})

    assert httpx.post(url, json={"name": "swap", "path": str(v1)}, headers=ADMIN).is_success
    ref_v1 = client.completions.create(**kw).choices[0].text
    assert httpx.post(url, json={"name": "swap", "path": str(v2)}, headers=ADMIN).is_success
    ref_v2 = client.completions.create(**kw).choices[0].text
    assert ref_v1 != ref_v2
    assert httpx.post(url, json={"name": "swap", "path": str(v1)}, headers=ADMIN).is_success

    swapped = threading.Event()
    texts = []
    for chunk in client.completions.create(stream=True, **kw):
        texts.append(chunk.choices[0].text if chunk.choices else "")
        if len(texts) == 3 and not swapped.is_set():
            r = httpx.post(url, json={"name": "swap", "path": str(v2)}, headers=ADMIN)
            assert r.is_success
            swapped.set()
    assert swapped.is_set()
    assert "".join(texts) == ref_v1
    assert client.completions.create(**kw).choices[0].text == ref_v2
    httpx.delete(url + "/swap", headers=ADMIN)
