"""Confidence from logprobs: the scores any server can compute for an answer
from the top-k logprobs of its generated tokens, set beside the answer probe.

Definitions (DeepConf, arXiv 2508.15260; self-certainty, arXiv 2502.18581;
facts in shared/DESIGN.md section 5), one owner for all of them:

* token confidence  C_i = -(1/k) sum_j log P_i(j) over the top k logprobs at
  generated position i (k = 20; the sampled token counts only if it is in the top k);
* group confidence  the mean of C over a sliding window of `window` tokens (stride 1;
  an answer shorter than the window is one group);
* an answer's       mean C, its lowest group, the mean of its bottom 10% of groups
                    (at least one), and the mean C of its last `tail` tokens;
* self-certainty    KL(uniform || P_i) averaged over tokens; from the top k alone the
                    rest of the vocabulary is taken as sharing the remaining mass evenly;
* mean token logprob the mean log P_i(sampled token).

Raw logprobs (vLLM's default `logprobs_mode`), before temperature. Every score
`trace_scores` returns is a *failure* score, higher = more likely wrong (a
confidence negated), so it ranks answers the same way as the probe's p_fail.
numpy only: the pipeline, the verdict and the tests use it without vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

TOP_K = 20
# The per-token arrays an answer records ("confidence" in a generation row).
TOKEN_FIELDS = ("lp", "conf", "sc")
SCORES = ("mean_logprob", "conf_mean", "conf_lowest_group", "conf_bottom10", "conf_tail",
          "self_certainty", "length")


@dataclass(frozen=True)
class Knobs:
    """The window of a group and the length of the tail, in tokens (DeepConf's
    2048 is longer than most answers here: fixed on a validation split)."""

    window: int = 2048
    tail: int = 2048
    bottom_fraction: float = 0.1

    def __post_init__(self):
        if self.window < 1 or self.tail < 1 or not 0 < self.bottom_fraction <= 1:
            raise ValueError(f"knobs out of range: {self}")


def token_arrays(chosen: np.ndarray, top: np.ndarray, vocab: int) -> dict[str, np.ndarray]:
    """Per generated token: `chosen` [T] the sampled token's logprob, `top`
    [T, k] the top-k logprobs (any order), `vocab` the logits' width ->
    {"lp": [T], "conf": [T], "sc": [T]} (float64)."""
    chosen = np.asarray(chosen, dtype=np.float64).reshape(-1)
    top = np.asarray(top, dtype=np.float64)
    if top.ndim != 2 or top.shape[0] != chosen.shape[0]:
        raise ValueError(f"top must be [T, k] with T = {chosen.shape[0]}, got {top.shape}")
    k = top.shape[1]
    if not 0 < k < vocab:
        raise ValueError(f"need 0 < k < vocab, got k={k}, vocab={vocab}")
    conf = -top.mean(axis=1)
    # the mass outside the top k, spread evenly over the other vocab - k tokens
    rest = np.clip(1.0 - np.exp(top).sum(axis=1), 1e-30, 1.0)
    log_rest_each = np.log(rest) - math.log(vocab - k)
    sum_log_p = top.sum(axis=1) + (vocab - k) * log_rest_each
    sc = -math.log(vocab) - sum_log_p / vocab
    return {"lp": chosen, "conf": conf, "sc": sc}


def from_vllm(token_ids: Sequence[int], logprobs: Sequence[Mapping], vocab: int,
              k: int = TOP_K) -> dict[str, list[float]]:
    """A vLLM CompletionOutput's `logprobs` (one {token id: Logprob} per
    generated token, the top `k` by rank plus the sampled token when it ranks
    lower) -> the per-token arrays, rounded to 5 decimals for storage."""
    if len(logprobs) != len(token_ids):
        raise ValueError(f"{len(logprobs)} logprob entries for {len(token_ids)} tokens")
    if not token_ids:
        return {f: [] for f in TOKEN_FIELDS}
    chosen = np.array([d[t].logprob for t, d in zip(token_ids, logprobs)])
    ranked = [sorted((lp.logprob for lp in d.values()), reverse=True)[:k] for d in logprobs]
    if any(len(r) != k for r in ranked):
        raise ValueError(f"fewer than {k} logprobs per token; ask for logprobs={k}")
    top = np.array(ranked)
    return {f: np.round(a, 5).tolist() for f, a in token_arrays(chosen, top, vocab).items()}


def groups(conf: np.ndarray, window: int) -> np.ndarray:
    """Sliding-window means of token confidence (stride 1); one group when
    the answer is shorter than the window."""
    conf = np.asarray(conf, dtype=np.float64)
    if conf.size <= window:
        return conf.mean(keepdims=True)
    c = np.concatenate([[0.0], np.cumsum(conf)])
    return (c[window:] - c[:-window]) / window


def trace_scores(tokens: Mapping[str, Sequence[float]], knobs: Knobs = Knobs()) -> dict:
    """An answer's failure scores from its per-token arrays (see `token_arrays`);
    NaN for an answer with no token (no confidence to read)."""
    lp = np.asarray(tokens["lp"], dtype=np.float64)
    conf = np.asarray(tokens["conf"], dtype=np.float64)
    sc = np.asarray(tokens["sc"], dtype=np.float64)
    if conf.size == 0:
        return {**dict.fromkeys(SCORES, float("nan")), "length": 0.0}
    g = groups(conf, knobs.window)
    bottom = max(1, int(g.size * knobs.bottom_fraction))
    return {"mean_logprob": float(-lp.mean()),
            "conf_mean": float(-conf.mean()),
            "conf_lowest_group": float(-g.min()),
            "conf_bottom10": float(-np.sort(g)[:bottom].mean()),
            "conf_tail": float(-conf[-knobs.tail:].mean()),
            "self_certainty": float(-sc.mean()),
            "length": float(conf.size)}
