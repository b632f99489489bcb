"""The default profile served with a known model.

The package ships the profiles that the project's own pipeline built
(`adaras/profiles/<model>.safetensors`: SmolLM2-135M-Instruct and
Qwen2.5-Coder-1.5B-Instruct; how each was made and what it does:
docs/results/). A model started by its known name gets its profile, under the
name stored in the file. Only if the default model's file is missing (a
trimmed install) does it get a clearly labelled placeholder: random neurons,
named `placeholder-random`, with `provenance.placeholder = true`. Requests
steer only when they ask to (the default mode is `off`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from adaras.api.settings import DEFAULT_MODEL, Settings

PLACEHOLDER = "placeholder-random"


def bundled_profile(model: str) -> Path | None:
    from adaras.zoo import KNOWN

    if model not in KNOWN:  # a path, a hub id: no profile ships for it
        return None
    ref = resources.files("adaras") / "profiles" / f"{model}.safetensors"
    return Path(str(ref)) if ref.is_file() else None


def default_profiles(settings: Settings) -> dict[str, str]:
    if not settings.default_profile_auto:
        return {}
    bundled = bundled_profile(settings.model)
    if bundled is not None:
        from adaras.profile import SteeringProfile

        return {SteeringProfile.load(bundled).name: str(bundled)}
    if settings.model != DEFAULT_MODEL:
        return {}
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
