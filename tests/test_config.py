"""Pure-python pieces: the steering object, request-id matching, settings."""

from __future__ import annotations

import pytest

from adaras.engine.config import parse_profiles_env
from adaras.engine.runtime import belongs_to, request_base_id
from adaras.steering import SteeringConfigError, parse_steering, steering_from_extra_args


def test_parse_steering_defaults_and_values():
    assert parse_steering(None).mode == "off"
    assert parse_steering(None, default_mode="adaptive").mode == "adaptive"
    req = parse_steering({"mode": "adaptive", "profile": "m", "alpha": 1, "threshold": 0.2})
    assert (req.mode, req.profile, req.alpha, req.threshold) == ("adaptive", "m", 1.0, 0.2)
    assert steering_from_extra_args(None).mode == "off"
    assert steering_from_extra_args({"steering": {"mode": "always"}}).mode == "always"


@pytest.mark.parametrize("raw, field", [
    ({"mode": "x"}, "mode"), ({"alpha": -1}, "alpha"), ({"alpha": float("inf")}, "alpha"),
    ({"alpha": True}, "alpha"), ({"mode": "always", "threshold": 0.5}, "threshold"),
    ({"mode": "adaptive", "threshold": -0.1}, "threshold"), ({"profile": ""}, "profile"),
    ({"bogus": 1}, "bogus"), (3, "<object>"),
])
def test_parse_steering_refuses_with_field(raw, field):
    with pytest.raises(SteeringConfigError) as e:
        parse_steering(raw)
    assert e.value.field == field and f"steering.{field}" in str(e.value)


def test_profiles_env():
    assert parse_profiles_env("a=/x/a.st, b=/y/b.st") == {"a": "/x/a.st", "b": "/y/b.st"}
    assert parse_profiles_env("") == {}
    with pytest.raises(ValueError, match="name=path"):
        parse_profiles_env("justaname")


@pytest.mark.parametrize("engine_id, frontend_id, match", [
    ("0-1a2b3c4d", "0", True),
    ("10-1a2b3c4d", "1", False),
    ("cmpl-adaras-ab12-0-1a2b3c4d", "cmpl-adaras-ab12", True),   # multi-prompt index
    ("3_chatcmpl-xyz-1a2b3c4d", "chatcmpl-xyz", True),            # n > 1 child
    ("chatcmpl-xyzw-1a2b3c4d", "chatcmpl-xyz", False),
])
def test_engine_ids_map_back_to_frontend_ids(engine_id, frontend_id, match):
    assert belongs_to(engine_id, frontend_id) is match
    assert request_base_id("5_req-deadbeef") == "req"


def test_settings_validation(monkeypatch):
    from adaras.api.settings import Settings

    monkeypatch.setenv("ADARAS_PROFILES", "a=/p/a.safetensors")
    monkeypatch.setenv("ADARAS_DEFAULT_MODE", "always")
    s = Settings()
    assert s.profiles == {"a": "/p/a.safetensors"} and s.default_mode == "always"
    assert Settings(profiles=["x=/1", "y=/2"]).profiles == {"x": "/1", "y": "/2"}
    with pytest.raises(ValueError, match="default_mode"):
        Settings(default_mode="sometimes")
    with pytest.raises(ValueError, match="no paths"):
        Settings(profiles={"../evil": "/p"})
    with pytest.raises(ValueError, match="at least 8"):
        Settings(api_key="short")
    with pytest.raises(ValueError, match="must differ"):
        Settings(api_key="samekey123", admin_key="samekey123")
    with pytest.warns(UserWarning, match="without an API key"):
        Settings(host="0.0.0.0")
