"""Predictor states of prompt blocks in vLLM's prefix cache, so that adaptive
requests read the prefix cache like any other request.

The failure predictor pools a prompt with an online softmax whose state
(running max, sum of weights, weighted feature sum) merges exactly across any
split of the tokens (`PoolState.merge`). So the state of the tokens of one
KV block, kept under that block's hash (which chains the whole prefix before
it, and any salt) and the profile's version, stands in for running those
tokens through the predictor again:

  * scheduler (engine core): an adaptive request's prefix-cache hit is cut to
    the leading blocks whose states are held, and those states are pinned for
    the request (`pin`); with none held it reads no cache, as before;
  * worker: the gate starts the request's pooling state from the pinned
    states of the blocks vLLM skipped (`take`), and stores the state of every
    full prompt block it computes (`put`).

Where a state is missing the request computes those tokens: p_fail is never
built from a state that is not there. The store is an LRU of at most
`ADARAS_PREFIX_STATES` states (default 16384; one state is F + 2 floats, about
1 KiB at F = 256, so 16 MiB); a state whose block vLLM evicted is never hit
again and ages out.

Both sides must live in one process: vLLM's uniprocess executor (one worker,
its default for TP = 1). With a multiprocess executor the scheduler's process
holds no store (`local()` is None) and adaptive requests read no prefix cache.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

from adaras.predictor import PoolState

CAPACITY_ENV = "ADARAS_PREFIX_STATES"
DEFAULT_CAPACITY = 16384
MAX_PINNED = 4096  # pins of requests that were aborted before their first step


@dataclass
class Pinned:
    """What the scheduler granted one adaptive request."""

    version: str  # the profile version the states were pooled for
    hashes: list  # the request's block hashes (vLLM's list, grows with the request)
    block_size: int  # tokens per hash block
    states: list[PoolState] = field(default_factory=list)  # of blocks 0..len-1, pinned


class PrefixStates:
    def __init__(self, find_profile, capacity: int | None = None):
        """find_profile(profile name or None, fingerprint or "") -> the
        LoadedProfile a request will run with, or None (unknown profile)."""
        self.find_profile = find_profile
        self.capacity = capacity if capacity is not None else int(
            os.environ.get(CAPACITY_ENV, DEFAULT_CAPACITY))
        self.states: OrderedDict[tuple[bytes, str], PoolState] = OrderedDict()
        self.pinned: dict[str, Pinned] = {}
        self.restored_tokens = 0  # prompt tokens whose state came from here, ever

    def pin(self, req_id: str, profile: str | None, fingerprint: str, hashes: list,
            block_size: int) -> int:
        """Pin the states of the request's leading blocks that are held;
        returns how many (the blocks its prefix-cache hit may cover)."""
        loaded = self.find_profile(profile, fingerprint)
        if loaded is None or loaded.profile.predictor is None:
            self.pinned.pop(req_id, None)
            return 0
        version = loaded.version
        states = []
        for h in hashes:
            state = self.states.get((h, version))
            if state is None:
                break
            self.states.move_to_end((h, version))
            states.append(state)
        self.pinned.pop(req_id, None)
        self.pinned[req_id] = Pinned(version, hashes, block_size, states)
        while len(self.pinned) > MAX_PINNED:
            self.pinned.pop(next(iter(self.pinned)))
        return len(states)

    def take(self, req_id: str) -> Pinned | None:
        return self.pinned.pop(req_id, None)

    def put(self, block_hash: bytes, version: str, state: PoolState) -> None:
        self.states[(block_hash, version)] = state
        self.states.move_to_end((block_hash, version))
        while len(self.states) > self.capacity:
            self.states.popitem(last=False)

    def drop(self, req_id: str) -> None:
        """Forget a request's pin (it finished or was aborted before its
        worker took it)."""
        self.pinned.pop(req_id, None)


_LOCAL: PrefixStates | None = None


def local() -> PrefixStates | None:
    """The store of the worker in this process, if any (see module doc)."""
    return _LOCAL


def set_local(store: PrefixStates | None) -> None:
    global _LOCAL
    _LOCAL = store


def first_steered_position(steering, fingerprint: str, num_prompt_tokens: int) -> int:
    """The first position whose KV a steered request may change, for its
    prefix-cache salt. Adaptive requests decide after the prompt and steer
    decode positions only. `always` requests also steer the prompt positions
    their profile names (provenance "steer_prompt"); where the profile is not
    known in this process, every position counts as steered."""
    if steering.mode == "adaptive":
        return num_prompt_tokens
    loaded = _LOCAL.find_profile(steering.profile, fingerprint) if _LOCAL is not None else None
    if loaded is None:
        return 0
    steered = loaded.profile.steered_prompt_positions
    return 0 if steered < 0 else num_prompt_tokens - steered
