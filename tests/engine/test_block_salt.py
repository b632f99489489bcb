"""Which KV blocks a steered request salts (no engine): vLLM's own block
hasher, with the plugin's patch, over requests built by hand. Blocks before
the first position a request may steer hash like an unsteered request's;
every block from there on carries the salt."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.core import kv_cache_utils

from adaras.engine import plugin, prefix_states
from adaras.engine.config import SALT_KEY
from adaras.engine.profile_store import ProfileStore
from adaras.profile import ModelShape, SteeringProfile

SHAPE = ModelShape("Qwen3ForCausalLM", num_layers=2, intermediate_size=64, hidden_size=32)
BLOCK = 16
PROMPT = 70  # blocks 0-3 are all prompt, block 4 holds positions 64-79


@pytest.fixture
def store(tmp_path, monkeypatch):
    plugin.register()
    profiles = ProfileStore(SHAPE, (0, SHAPE.intermediate_size), torch.device("cpu"))
    for name, steer_prompt in (("decode", "none"), ("last", "last"), ("whole", "all")):
        prof = SteeringProfile.random(name, SHAPE, k=4, seed=1)
        prof.provenance = {"steer_prompt": steer_prompt}
        prof.save(tmp_path / f"{name}.st")
        profiles.load(name, str(tmp_path / f"{name}.st"), set())
    local = prefix_states.PrefixStates(profiles.find)
    monkeypatch.setattr(prefix_states, "_LOCAL", local)
    return local


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
    ({"mode": "adaptive", "profile": "decode"}, 4),  # decode positions only
    ({"mode": "always", "profile": "decode"}, 4),
    ({"mode": "always", "profile": "last"}, 4),  # position 69 is in block 4 too
    ({"mode": "always", "profile": "whole"}, 0),  # every prompt position is steered
    ({"mode": "always", "profile": "unknown-here"}, 0),  # not known: salt everything
])
def test_salt_starts_at_the_block_of_the_first_steered_position(store, steering, first_salted):
    got = salted_blocks(steering)
    want = [first_salted is not None and b >= first_salted for b in range(len(got))]
    assert got == want


def test_the_last_prompt_position_moves_the_salt_one_block_earlier(store):
    # a 64-token prompt: position 63 ends block 3
    assert salted_blocks({"mode": "always", "profile": "decode"}, prompt=64).index(True) == 4
    assert salted_blocks({"mode": "always", "profile": "last"}, prompt=64).index(True) == 3


def test_the_same_tokens_steered_from_another_position_hash_apart(store):
    """Block 6 (positions 96-111) of two requests with one steering config:
    steered from 100 in one (its prompt ends there), from 104 in the other
    (positions 100-103 are its prompt). Same tokens, other KV: other keys."""
    steering = {"mode": "always", "profile": "decode"}
    a, b = block_keys(steering, prompt=100, total=128)[6], block_keys(steering, prompt=104, total=128)[6]
    assert a != b and a[-1][0] == b[-1][0] == "adaras"


def test_without_the_frontend_salt_nothing_is_salted(store, monkeypatch):
    """The control of the engine's leak test: no salt, every block shareable."""
    monkeypatch.setattr(plugin, "steering_salt", lambda extra_args: None)
    assert not any(salted_blocks({"mode": "always", "profile": "whole"}))
