"""The default profile served with the default model.

The package ships the profile that the project's own pipeline built for
SmolLM2-135M-Instruct (`adaras/profiles/<model>.safetensors`; how it was made
and what it does: docs/results/). It is served under the name stored in the
file. Only if that file is missing (a trimmed install) does the default model
get a clearly labelled placeholder: random neurons, named
`placeholder-random`, with `provenance.placeholder = true`. Requests steer
only when they ask to (the default mode is `off`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from adaras.api.settings import DEFAULT_MODEL, Settings

PLACEHOLDER = "placeholder-random"


def bundled_profile(model: str) -> Path | None:
    ref = resources.files("adaras") / "profiles" / f"{model}.safetensors"
    return Path(str(ref)) if ref.is_file() else None


def default_profiles(settings: Settings) -> dict[str, str]:
    if settings.model != DEFAULT_MODEL or not settings.default_profile_auto:
        return {}
    bundled = bundled_profile(settings.model)
    if bundled is not None:
        from adaras.profile import SteeringProfile

        return {SteeringProfile.load(bundled).name: str(bundled)}
    return {PLACEHOLDER: str(placeholder_profile(settings.model))}


def placeholder_profile(model: str) -> Path:
    import transformers

    from adaras.profile import ModelShape, SteeringProfile
    from adaras.zoo import cache_dir, resolve_model

    path = cache_dir() / "profiles" / f"{model}.{PLACEHOLDER}.safetensors"
    if not path.exists():
        shape = ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(
            resolve_model(model)))
        prof = SteeringProfile.random(PLACEHOLDER, shape, k=50, seed=0, scale=0.5)
        prof.provenance = {"placeholder": True, "note": "random neurons, not an AdaRAS "
                           "profile; build one with the adaras pipeline"}
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.save(path)
    return path
