"""Which KV blocks a steered request salts (no engine): vLLM's own block
hasher, with the plugin's patch, over requests built by hand. Blocks before
the first position a request may steer hash like an unsteered request's;
every block from there on carries the salt and that position."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.v1.core import kv_cache_utils

from adaras.engine import plugin
from adaras.engine.config import SALT_KEY

plugin.register()
BLOCK = 16
PROMPT = 70  # blocks 0-3 are all prompt, block 4 holds positions 64-79


def block_keys(steering: dict | None, prompt: int = PROMPT, total: int = 100) -> list:
    extra = None
    if steering is not None:  # what the frontend adds (seam.patch_input_processor)
        extra = {"steering": steering}
        salt = plugin.steering_salt(extra)
        if salt is not None:
            extra[SALT_KEY] = salt
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra),
                              num_prompt_tokens=prompt, mm_features=None, lora_request=None,
                              cache_salt=None, prompt_embeds=None)
    return [kv_cache_utils.generate_block_hash_extra_keys(request, start, start + BLOCK, 0)[0]
            for start in range(0, total - BLOCK + 1, BLOCK)]


def salted_blocks(steering: dict | None, prompt: int = PROMPT) -> list[bool]:
    return [any(k[0] == "adaras" for k in keys or ()) for keys in block_keys(steering, prompt)]


@pytest.mark.parametrize("steering, first_salted", [
    (None, None),
    ({"mode": "off"}, None),
    ({"mode": "adaptive", "profile": "p"}, 4),  # decode positions only: 70 is in block 4
    ({"mode": "always", "profile": "p"}, 0),  # may steer prompt positions: every block
])
def test_salt_starts_at_the_block_of_the_first_steered_position(steering, first_salted):
    got = salted_blocks(steering)
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


def test_without_the_frontend_salt_nothing_is_salted(monkeypatch):
    """The control of the engine's leak test: no salt, every block shareable."""
    monkeypatch.setattr(plugin, "steering_salt", lambda extra_args: None)
    assert not any(salted_blocks({"mode": "always", "profile": "p"}))
