"""One request's steering state in the worker: its resolved steering, the
profile it started with, the gate's and the answer probe's pooling states,
and the report they make (`report.single`)."""

from __future__ import annotations

from dataclasses import dataclass

from adaras.engine.prefix_states import PromptBlocks
from adaras.engine.profile_store import LoadedProfile
from adaras.predictor import PoolState
from adaras.report import single as single_report
from adaras.steering import Resolved


@dataclass
class RequestState:
    steering: Resolved  # the request's steering with its defaults filled in
    profile: LoadedProfile | None
    # prompt positions also steered when the request is steered from the start
    # ("always"): 0 = none, 1 = the last one, -1 = all (profile provenance
    # "steer_prompt"; see SteeringProfile.steered_prompt_positions)
    steer_prompt: int = 0
    pool: PoolState | None = None
    pool_pos: int = 0  # prompt positions already in `pool` (recomputation skips them)
    blocks: PromptBlocks | None = None  # its prompt blocks' hashes, to store their states
    block_pool: PoolState | None = None  # the current prompt block's own state
    p_fail: float | None = None
    applied: bool = False  # decode steps are steered
    error: str | None = None
    # the answer probe: its head's pooling state over positions >= the prompt length
    answer_pool: PoolState | None = None
    answer_pos: int = -1  # positions before it are folded (-1: not started)
    answer_p_fail: float | None = None

    @property
    def alpha(self) -> float:
        return self.steering.alpha

    def report(self) -> dict:
        return single_report(self.steering, self.p_fail, self.applied, self.error,
                             self.answer_p_fail).wire()
