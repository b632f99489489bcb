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
                  "../profiles/smollm2-135m-instruct", "some-other-model"):
        assert bundled_profile(model) is None
        assert default_profiles(Settings(model=model)) == {}


def test_the_switch_turns_the_bundled_profile_off():
    assert default_profiles(Settings(model="qwen2.5-coder-1.5b-instruct",
                                     default_profile_auto=False)) == {}
    assert PLACEHOLDER not in default_profiles(Settings())  # the default model ships its own
