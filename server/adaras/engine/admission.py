"""What the seam decides a steered request with, in the frontend and the
engine core: which profile names the workers hold (the frontend's name
check), the first position whose KV a steered request may change, and the
prefix-cache salt that keeps steered KV apart. Below both `plugin` and
`seam`, which import it; it imports neither, nor vLLM.
"""

from __future__ import annotations

import json


def known_profiles(input_processor) -> set[str] | None:
    """Profile names one engine's workers hold, as its frontend knows them:
    ADARAS_PROFILES at engine creation plus `adaras.engine.load_profile` calls.
    None = unknown (then only the workers can tell, and they report it)."""
    return getattr(input_processor, "_adaras_profiles", None)


def remember_profile(input_processor, name: str, loaded: bool) -> None:
    """Record in the frontend that the workers now hold (or no longer hold) `name`."""
    known = known_profiles(input_processor)
    if loaded:
        input_processor._adaras_profiles = (known or set()) | {name}
    elif known is not None:
        known.discard(name)


def check_profile_name(input_processor, steering) -> None:
    from adaras.steering import unknown_profile

    known = known_profiles(input_processor)
    if steering.engaged and steering.profile is not None and known is not None \
            and steering.profile not in known:
        raise unknown_profile(steering.profile, known)


def first_steered_position(steering, extra_args: dict | None, num_prompt_tokens: int) -> int:
    """The first position whose KV a steered request may change, which its
    prefix-cache salt starts at. Adaptive requests decide after the prompt
    and steer decode positions only. `always` requests also steer the prompt
    positions their profile names ("steer_prompt"), which the engine core
    cannot see: the request declares them (PROMPT_POSITIONS_KEY, set by the
    HTTP API); without a declaration every position counts."""
    from adaras.steering import declared_prompt_positions

    if steering.mode == "adaptive":
        return num_prompt_tokens
    declared = declared_prompt_positions(extra_args)
    if declared is None or declared < 0:
        return 0
    return max(num_prompt_tokens - declared, 0)


def steering_salt(extra_args: dict | None) -> str | None:
    """Prefix-cache salt for a steered request; None when it is not steered."""
    from adaras.steering import FINGERPRINT_KEY, steering_from_extra_args

    config = steering_from_extra_args(extra_args)
    if not config.active:
        return None
    fingerprint = (extra_args or {}).get(FINGERPRINT_KEY, "")  # the profile's version
    return "adaras:" + json.dumps([config.to_dict(), fingerprint], sort_keys=True)
