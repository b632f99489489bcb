"""Which profiles `adaras serve` loads when it is given none."""

from __future__ import annotations

from adaras.api.defaults import PLACEHOLDER, bundled_profile, default_profiles
from adaras.api.settings import Settings
from adaras.profile import SteeringProfile


def test_a_known_model_started_by_name_gets_its_bundled_profile():
    for model in ("smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"):
        path = bundled_profile(model)
        assert path is not None, f"the package must ship a profile for {model}"
        got = default_profiles(Settings(model=model))
        assert got == {SteeringProfile.load(path).name: str(path)}


def test_no_bundled_profile_for_paths_or_unknown_models(tmp_path):
    (tmp_path / "qwen2.5-coder-1.5b-instruct").mkdir()  # a directory of that name is no known model
    for model in (str(tmp_path / "qwen2.5-coder-1.5b-instruct"), "Qwen/Qwen3-1.7B",
                  "../profiles/smollm2-135m-instruct", "some-other-model", "",
                  "SmolLM2-135M-Instruct"):
        assert bundled_profile(model) is None
        assert default_profiles(Settings(model=model)) == {}


def test_the_switch_turns_the_bundled_profile_off():
    assert default_profiles(Settings(model="qwen2.5-coder-1.5b-instruct",
                                     default_profile_auto=False)) == {}


def test_the_default_model_gets_a_labelled_placeholder_only_when_its_profile_is_missing(
        monkeypatch, tmp_path):
    from adaras.api import defaults

    model = "smollm2-135m-instruct"  # with its profile: the first test of this file
    monkeypatch.setattr(defaults, "bundled_profile", lambda m: None)  # a trimmed install
    monkeypatch.setattr(defaults, "placeholder_profile", lambda m: tmp_path / "p.safetensors")
    assert default_profiles(Settings(model=model)) == {PLACEHOLDER: str(tmp_path / "p.safetensors")}
    assert default_profiles(Settings(model="qwen2.5-coder-1.5b-instruct")) == {}
