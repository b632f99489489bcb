"""Which KV blocks a steered request salts (no engine): vLLM's own block
hasher, with the plugin's patch, over requests built by hand. Blocks before
the first position a request may steer hash like an unsteered request's;
every block from there on carries the salt and that position."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.v1.core import kv_cache_utils

from adaras.engine import admission, plugin
from adaras.engine.config import SALT_KEY
from adaras.steering import PROMPT_POSITIONS_KEY, steered_prompt_positions

plugin.register()
BLOCK = 16
PROMPT = 70  # blocks 0-3 are all prompt, block 4 holds positions 64-79


def block_keys(steering: dict | None, prompt: int = PROMPT, total: int = 100,
               declared: int | None = None) -> list:
    extra = None
    if steering is not None:  # what the frontend adds (seam.patch_input_processor)
        extra = {"steering": steering}
        if declared is not None:  # what the HTTP API declares for `always`
            extra[PROMPT_POSITIONS_KEY] = declared
        salt = admission.steering_salt(extra)
        if salt is not None:
            extra[SALT_KEY] = salt
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra),
                              num_prompt_tokens=prompt, mm_features=None, lora_request=None,
                              cache_salt=None, prompt_embeds=None)
    return [kv_cache_utils.generate_block_hash_extra_keys(request, start, start + BLOCK, 0)[0]
            for start in range(0, total - BLOCK + 1, BLOCK)]


def salted_blocks(steering: dict | None, prompt: int = PROMPT, declared: int | None = None
                  ) -> list[bool]:
    return [any(k[0] == "adaras" for k in keys or ())
            for keys in block_keys(steering, prompt, declared=declared)]


@pytest.mark.parametrize("steering, declared, first_salted", [
    (None, None, None),
    ({"mode": "off"}, None, None),
    ({"mode": "adaptive", "profile": "p"}, None, 4),  # decode positions only: 70 is in block 4
    ({"mode": "always", "profile": "p"}, None, 0),  # undeclared: every block
    ({"mode": "always", "profile": "p"}, 0, 4),  # a decode-only profile
    ({"mode": "always", "profile": "p"}, 1, 4),  # also position 69, in block 4 too
    ({"mode": "always", "profile": "p"}, 7, 3),  # positions 63-69: from block 3
    ({"mode": "always", "profile": "p"}, -1, 0),  # every prompt position
])
def test_salt_starts_at_the_block_of_the_first_steered_position(steering, declared,
                                                                 first_salted):
    got = salted_blocks(steering, declared=declared)
    want = [first_salted is not None and b >= first_salted for b in range(len(got))]
    assert got == want


def test_the_same_tokens_steered_from_another_position_hash_apart():
    """Block 6 (positions 96-111) of two adaptive requests with one steering
    config: steered from 100 in one (its prompt ends there), from 104 in the
    other (positions 100-103 are its prompt). Same tokens, other KV: other keys."""
    steering = {"mode": "adaptive", "profile": "p"}
    a = block_keys(steering, prompt=100, total=128)[6]
    b = block_keys(steering, prompt=104, total=128)[6]
    assert a != b and a[-1][0] == b[-1][0] == "adaras"


@pytest.mark.parametrize("profile, declared, steered", [
    (0, None, 0), (1, None, 1), (-1, None, -1),  # undeclared: all blocks salted, the profile's
    (1, 0, 0), (-1, 0, 0), (-1, 1, 1),  # never more of the prompt than was salted
    (0, 1, 0), (1, -1, 1), (-1, -1, -1),
])
def test_the_worker_steers_no_prompt_position_the_request_did_not_declare(profile, declared,
                                                                          steered):
    assert steered_prompt_positions(profile, declared) == steered


def test_without_the_frontend_salt_nothing_is_salted(monkeypatch):
    """The control of the engine's leak test: no salt, every block shareable."""
    monkeypatch.setattr(admission, "steering_salt", lambda extra_args: None)
    assert not any(salted_blocks({"mode": "always", "profile": "p"}))
