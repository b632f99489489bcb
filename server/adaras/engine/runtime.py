"""Worker-side steering state: loaded profiles, per-request decisions, and the
per-step context that the steered MLPs read.

One `SteeringRuntime` lives in each worker process (one per TP rank). Before
every forward the model runner hook calls `begin_step`, which turns the
persistent batch into

  * `row_slot`   int32 [T]        0 = row not steered, s > 0 = slot s
  * `steer_idx`  int32 [S, L, K]  local (this rank's shard) neuron columns, -1 pad
  * `steer_val`  fp32  [S, L, K]  alpha * delta, 0 pad (slot 0 is all pad)
  * `feat_rows`  int64 [R]        prompt rows of adaptive requests, for the predictor
  * `feat_idx`   int32 [L, F]     local columns of predictor features, -1 = elsewhere

A slot is one distinct (profile, alpha) pair in the batch, so any number of
requests with different profiles and alphas share one forward. After the
forward, `end_step` streams the gathered features into each adaptive request's
attention-pooling state and, when its prompt is complete, decides whether its
decode steps are steered.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from adaras.engine.config import (
    CAPTURE_KEY,
    PROFILES_ENV,
    CaptureRequest,
    parse_capture,
    parse_profiles_env,
)
from adaras.predictor import FailurePredictor, PoolState
from adaras.profile import ModelShape, SteeringProfile, file_version
from adaras.steering import (
    FINGERPRINT_KEY,
    STEERING_KEY,
    Resolved,
    SteeringConfigError,
    resolve,
    steering_from_extra_args,
    unknown_profile,
)
from steering_kernels.steer_plan import FeaturePlan, SteerPlan, plan_features, plan_sparse_steer

logger = logging.getLogger("adaras.engine")

DEFAULT_PROFILE_ENV = "ADARAS_DEFAULT_PROFILE"
MAX_REPORTS = 65536
RETIRE_GRACE_S = 300.0


_SUFFIX = re.compile(r"-[0-9a-f]{8}$")
_CHILD = re.compile(r"^\d+_")


def request_base_id(engine_id: str) -> str:
    """An engine request id without what the engine added: vLLM appends
    `-<8 hex>` to make ids unique and prefixes `<i>_` for the n > 1 children."""
    return _CHILD.sub("", _SUFFIX.sub("", engine_id))


def belongs_to(engine_id: str, frontend_id: str) -> bool:
    """Whether an engine request was made for `frontend_id`: the same id, or a
    sub-request of it (the OpenAI server adds `-<prompt index>` or `_<i>`)."""
    base = request_base_id(engine_id)
    return base == frontend_id or base.startswith((frontend_id + "-", frontend_id + "_"))


def put_bounded(store: OrderedDict, key: str, value) -> None:
    """Insert, dropping the oldest entries beyond MAX_REPORTS (results nobody pops)."""
    store[key] = value
    while len(store) > MAX_REPORTS:
        store.popitem(last=False)


def pop_belonging(store: OrderedDict, frontend_ids: list[str]) -> dict:
    """Remove and return the entries whose engine request id belongs to one of
    `frontend_ids` (see `belongs_to`)."""
    return {rid: store.pop(rid) for rid in list(store)
            if any(belongs_to(rid, w) for w in frontend_ids)}


@dataclass(eq=False)  # hashed by identity: a reloaded profile is a new key
class LoadedProfile:
    """A profile laid out for this rank's shard of the MLP neurons."""

    profile: SteeringProfile
    version: str  # sha256 of the file: identifies this exact profile across processes
    idx: torch.Tensor  # int32 [L, Kp] local columns, -1 pad
    delta: torch.Tensor  # fp32 [L, Kp]
    feat_idx: torch.Tensor | None  # int32 [L, F] local column of feature f if in layer l here, else -1

    @classmethod
    def build(cls, profile: SteeringProfile, version: str, num_layers: int,
              shard: tuple[int, int], device: torch.device) -> LoadedProfile:
        start, end = shard
        per_layer = [[] for _ in range(num_layers)]
        for layer, neuron, d in zip(profile.layers.tolist(), profile.neurons.tolist(),
                                    profile.delta.tolist()):
            if start <= neuron < end:
                per_layer[layer].append((neuron - start, d))
        kp = max((len(x) for x in per_layer), default=0)
        idx = torch.full((num_layers, kp), -1, dtype=torch.int32)
        delta = torch.zeros((num_layers, kp), dtype=torch.float32)
        for layer, items in enumerate(per_layer):
            for j, (col, d) in enumerate(sorted(items)):
                idx[layer, j] = col
                delta[layer, j] = d
        feat_idx = None
        if profile.predictor is not None:
            fl = profile.predictor.feature_layers.tolist()
            fn = profile.predictor.feature_neurons.tolist()
            feat_idx = torch.full((num_layers, len(fl)), -1, dtype=torch.int32)
            for f, (layer, neuron) in enumerate(zip(fl, fn)):
                if start <= neuron < end:
                    feat_idx[layer, f] = neuron - start
            feat_idx = feat_idx.to(device)
        return cls(profile, version, idx.to(device), delta.to(device), feat_idx)


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
    p_fail: float | None = None
    applied: bool = False  # decode steps are steered
    error: str | None = None

    @property
    def alpha(self) -> float:
        return self.steering.alpha

    def report(self) -> dict:
        return self.steering.report(self.p_fail, self.applied, self.error)


@dataclass
class CaptureState:
    """Running capture of one request's prompt activations (this rank's shard)."""

    spec: CaptureRequest
    feat_idx: torch.Tensor | None  # int32 [L, F] local columns, -1 = elsewhere
    total: torch.Tensor | None = None  # fp32 [L, I_shard] sum over positions >= mean_from
    count: int = 0
    next_pos: int = 0  # prompt positions already recorded (recomputation skips them)
    tokens: list[torch.Tensor] = field(default_factory=list)  # fp32 [t, F] chunks

    def result(self) -> dict:
        """Arrays travel as raw float32 bytes + shape (RPC turns arrays into lists)."""
        out: dict = {"count": self.count}
        if self.total is not None:
            mean = (self.total / max(self.count, 1)).float().cpu()  # [L, I_shard]
            out["mean"] = (mean.numpy().tobytes(), list(mean.shape))
        if self.spec.features is not None:
            F = len(self.spec.features)
            tokens = torch.cat(self.tokens) if self.tokens else torch.zeros(0, F)  # [T, F]
            out["tokens"] = (tokens.float().numpy().tobytes(), list(tokens.shape))
        return out


@dataclass
class StepContext:
    row_slot: torch.Tensor | None = None  # int32 [T]
    steer_idx: torch.Tensor | None = None  # int32 [S, L, K]
    steer_val: torch.Tensor | None = None  # fp32 [S, L, K]
    feat_rows: torch.Tensor | None = None  # int64 [R]
    feat_idx: torch.Tensor | None = None  # int32 [L, F]
    plan: SteerPlan | None = None  # per-layer flat indices/values of the sparse add
    feat_plan: FeaturePlan | None = None  # per-layer feature columns
    feats: torch.Tensor | None = None  # fp32 [R, F], filled layer by layer
    # (req_id, rows slice into feats, feature slice, prompt positions folded after
    # this step, prompt completes this step)
    spans: list[tuple[str, slice, slice, int, bool]] = field(default_factory=list)
    # activation capture (offline pipeline); read before steering is added
    cap_rows: torch.Tensor | None = None  # int64 [Rm] rows that enter a mean
    cap_seg: torch.Tensor | None = None  # int64 [Rm] which capturing request each row is
    cap_sum: torch.Tensor | None = None  # fp32 [L, Nm, I_shard]
    cap_tok_rows: torch.Tensor | None = None  # int64 [Rt]
    cap_feats: torch.Tensor | None = None  # fp32 [Rt, F_all]
    cap_feat_plan: FeaturePlan | None = None
    # (req_id, mean segment or -1, token rows slice, feature slice, rows in mean,
    # prompt positions recorded after this step, done)
    cap_spans: list[tuple[str, int, slice, slice, int, int, bool]] = field(default_factory=list)
    hooked: int = 0  # steering-op calls that saw this context (the start-up probe reads it)


# The step context of the forward in progress, like vLLM's own forward context:
# set by begin_step, read by the steered MLPs' op, cleared by end_step. The
# runtime itself hangs off the model runner (get_runtime).
_CURRENT: StepContext | None = None


def current() -> StepContext | None:
    return _CURRENT


class SteeringRuntime:
    def __init__(self, shape: ModelShape, tp_rank: int, tp_size: int, device: torch.device):
        if shape.intermediate_size % tp_size:
            raise ValueError(f"intermediate_size {shape.intermediate_size} not divisible by TP {tp_size}")
        self.shape = shape
        self.tp_rank, self.tp_size = tp_rank, tp_size
        shard = shape.intermediate_size // tp_size
        self.shard = (tp_rank * shard, (tp_rank + 1) * shard)
        self.device = device
        self.profiles: dict[str, LoadedProfile] = {}
        self.versions: dict[str, LoadedProfile] = {}  # version -> profile, incl. retired
        self.retired: dict[str, float] = {}  # version -> when it was replaced/unloaded
        self.default_profile: str | None = os.environ.get(DEFAULT_PROFILE_ENV) or None
        self.requests: dict[str, RequestState] = {}
        self.reports: OrderedDict[str, dict] = OrderedDict()
        self.captures: dict[str, CaptureState] = {}
        self.capture_results: OrderedDict[str, dict] = OrderedDict()
        self._capture_cols: dict[tuple, torch.Tensor] = {}
        self._table_key: tuple | None = None
        self._plan_cache: tuple | None = None  # (tables, row_slot array, row_slot tensor, plan)
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._feat_key: tuple | None = None
        self._feat_idx: torch.Tensor | None = None
        self.hooked_layers = 0  # steering-op calls with work to do, ever
        for name, path in parse_profiles_env(os.environ.get(PROFILES_ENV)).items():
            self.load_profile(name, path)

    # ---- profiles -------------------------------------------------------
    def load_profile(self, name: str, path: str) -> dict:
        """Load (or atomically replace) `name`. Requests already admitted keep
        the profile object they started with."""
        profile = SteeringProfile.load(path, expect=self.shape)
        profile.name = name
        loaded = LoadedProfile.build(profile, file_version(path), self.shape.num_layers,
                                     self.shard, self.device)
        self._retire(self.profiles.get(name))
        self.profiles[name] = loaded
        self.versions[loaded.version] = loaded
        if self.default_profile is None:
            self.default_profile = name
        logger.info("adaras: loaded profile %s (K=%d, version %s) from %s",
                    name, profile.k, loaded.version, path)
        return {**profile.summary(), "version": loaded.version}

    def unload_profile(self, name: str) -> bool:
        loaded = self.profiles.pop(name, None)
        self._retire(loaded)
        if self.default_profile == name:
            self.default_profile = next(iter(self.profiles), None)
        return loaded is not None

    def set_default_profile(self, name: str | None) -> None:
        if name is not None and name not in self.profiles:
            raise ValueError(f"unknown profile {name!r}")
        self.default_profile = name

    def _retire(self, loaded: LoadedProfile | None) -> None:
        """Keep a replaced profile reachable by version for requests that were
        admitted by the frontend before the swap but reach the worker after."""
        now = time.monotonic()
        if loaded is not None:
            self.retired[loaded.version] = now
        in_use = {s.profile.version for s in self.requests.values() if s.profile}
        current = {p.version for p in self.profiles.values()}
        for version, since in list(self.retired.items()):
            if version in current:
                del self.retired[version]
            elif now - since > RETIRE_GRACE_S and version not in in_use:
                del self.retired[version]
                self.versions.pop(version, None)

    # ---- requests -------------------------------------------------------
    def _new_request(self, req_id: str, sampling_params) -> RequestState | None:
        extra = getattr(sampling_params, "extra_args", None) if sampling_params else None
        try:
            config = steering_from_extra_args(extra)
        except SteeringConfigError as e:  # validated in the frontend; belt and braces
            self._put_report(req_id, RequestState(Resolved(), None, error=str(e)))
            return None
        if not config.active:
            if extra and STEERING_KEY in extra:  # explicit "off": still report it
                self._put_report(req_id, RequestState(Resolved(), None))
            return None
        name = config.profile or self.default_profile
        version = (extra or {}).get(FINGERPRINT_KEY)
        loaded = self.versions.get(version) if version else None
        if loaded is None:
            loaded = self.profiles.get(name) if name else None
        if loaded is None:
            unknown = Resolved(config.mode, name, config.alpha, config.threshold)
            self._put_report(req_id, RequestState(unknown, None,
                                                  error=str(unknown_profile(name, self.profiles))))
            return None
        prof = loaded.profile
        state = RequestState(
            resolve(config, profile=prof.name, default_alpha=prof.default_alpha,
                    profile_threshold=prof.threshold, neurons=prof.k, version=loaded.version),
            loaded, steer_prompt=prof.steered_prompt_positions if config.mode == "always" else 0)
        if config.mode == "always":
            state.applied = True
        elif prof.predictor is None:
            state.error = f"profile {name!r} has no failure predictor; adaptive mode cannot gate"
        else:
            state.pool = prof.predictor.init_state()
        self._put_report(req_id, state)
        return state

    def _put_report(self, req_id: str, state: RequestState) -> None:
        put_bounded(self.reports, req_id, state.report())

    def pop_reports(self, req_ids: list[str] | None = None) -> dict[str, dict]:
        """Reports keyed by engine request id; with `req_ids`, only those that
        belong to one of these frontend ids (see `request_base_id`)."""
        if req_ids is None:
            out, self.reports = dict(self.reports), OrderedDict()
            return out
        return pop_belonging(self.reports, req_ids)

    def release(self, req_id: str) -> None:
        """Forget a request that finished or was aborted (its report stays
        until popped). Called where vLLM drops the request's state, which
        happens on every step, including the empty one before going idle."""
        self.requests.pop(req_id, None)
        self.captures.pop(req_id, None)

    def stats(self) -> dict:
        """Sizes of the per-request tables (all 0 when idle and drained)."""
        return {"requests": len(self.requests), "captures": len(self.captures),
                "reports": len(self.reports), "capture_results": len(self.capture_results),
                "profiles": sorted(self.profiles), "versions": len(self.versions),
                "hooked_layers": self.hooked_layers}

    # ---- per step -------------------------------------------------------
    def begin_step(self, req_ids: list[str], req_id_to_index: dict[str, int],
                   num_scheduled: np.ndarray, num_computed: np.ndarray, num_prompt: np.ndarray,
                   new_requests: list[tuple[str, object]] = ()) -> StepContext | None:
        """Build the step's context. Python work is per *steered* request only:
        unsteered requests never enter `self.requests`.

        Prompt features are folded by position: a request that vLLM preempted
        and recomputes from token 0 skips the positions it already folded, so
        its p_fail and captures equal those of an uninterrupted run."""
        global _CURRENT
        for rid, sampling_params in new_requests:
            state = self._new_request(rid, sampling_params)
            if state is not None:
                self.requests[rid] = state
            self._new_capture(rid, sampling_params)
        if not self.requests and not self.captures:
            _CURRENT = None
            return None
        ends = np.cumsum(num_scheduled[: len(req_ids)])  # token offset after request i
        slots: dict[tuple[LoadedProfile, float], int] = {}
        row_slot = None
        spans = []
        feat_profiles: dict[LoadedProfile, int] = {}
        feat_rows: list[np.ndarray] = []
        n_feat_rows = 0
        for rid, state in self.requests.items():
            i = req_id_to_index.get(rid)
            if i is None or i >= len(req_ids):
                continue  # not scheduled this step
            n = int(num_scheduled[i])
            if n == 0:
                continue
            start = int(ends[i]) - n
            computed, prompt = int(num_computed[i]), int(num_prompt[i])
            # Steered rows: positions >= the prompt length, or >= prompt - 1 when
            # the profile steers the last prompt position too (all: from 0).
            first_steered = 0 if state.steer_prompt < 0 else prompt - state.steer_prompt
            first_decode = max(first_steered - computed, 0)
            if state.applied and first_decode < n:
                # Keyed by the profile object the request started with, so a
                # reload or unload never changes a request in flight.
                slot = slots.setdefault((state.profile, state.alpha), len(slots) + 1)
                if row_slot is None:
                    row_slot = np.zeros(int(ends[-1]), dtype=np.int32)
                row_slot[start + first_decode: start + n] = slot
            if state.pool is not None and state.p_fail is None and computed < prompt:
                m = min(n, prompt - computed)
                first = min(max(state.pool_pos - computed, 0), m)  # > 0 only when recomputing
                if first < m:  # else: all folded before a preemption (and not the last chunk)
                    feat_profiles.setdefault(state.profile, len(feat_profiles))
                    feat_rows.append(np.arange(start + first, start + m))
                    spans.append((rid, slice(n_feat_rows, n_feat_rows + m - first),
                                  state.profile, computed + m, computed + n >= prompt))
                    n_feat_rows += m - first
        ctx = StepContext()
        if self.captures:
            self._plan_captures(ctx, req_ids, req_id_to_index, num_scheduled, num_computed,
                                num_prompt, ends)
        if row_slot is None and not spans and not ctx.cap_spans:
            _CURRENT = None
            return None
        if row_slot is not None:
            tables = self._slot_tables(tuple(slots))
            prev = self._plan_cache
            if prev is not None and prev[0] is tables and np.array_equal(prev[1], row_slot):
                ctx.row_slot, ctx.plan = prev[2], prev[3]  # steady decode: same rows, same slots
            else:
                ctx.row_slot = torch.from_numpy(row_slot).to(self.device)
                ctx.plan = plan_sparse_steer(ctx.row_slot, *tables, self.shard[1] - self.shard[0])
                self._plan_cache = (tables, row_slot, ctx.row_slot, ctx.plan)
            ctx.steer_idx, ctx.steer_val = tables
        if spans:
            ctx.feat_idx, ctx.feat_plan, offsets = self._feature_table(tuple(feat_profiles))
            ctx.feat_rows = torch.from_numpy(np.concatenate(feat_rows)).to(self.device)
            ctx.feats = torch.zeros(n_feat_rows, ctx.feat_idx.shape[1], device=self.device)
            ctx.spans = [(rid, rows, offsets[p], pos, done) for rid, rows, p, pos, done in spans]
        _CURRENT = ctx
        return ctx

    def _slot_tables(self, keys: tuple[tuple[LoadedProfile, float], ...]):
        # Cached by identity: the same batch composition reuses its tables.
        ident = tuple((id(p), a) for p, a in keys)
        if ident != self._table_key:
            L = self.shape.num_layers
            k = max(p.idx.shape[1] for p, _ in keys)
            idx = torch.full((len(keys) + 1, L, k), -1, dtype=torch.int32, device=self.device)
            val = torch.zeros((len(keys) + 1, L, k), dtype=torch.float32, device=self.device)
            for s, (p, alpha) in enumerate(keys, start=1):
                kp = p.idx.shape[1]
                idx[s, :, :kp] = p.idx
                val[s, :, :kp] = p.delta * alpha
            self._table_key, self._tables, self._table_refs = ident, (idx, val), keys
        return self._tables

    def _feature_table(self, profiles: tuple[LoadedProfile, ...]):
        offsets, o = {}, 0
        for p in profiles:
            offsets[p] = slice(o, o + p.feat_idx.shape[1])
            o += p.feat_idx.shape[1]
        ident = tuple(id(p) for p in profiles)
        if ident != self._feat_key:
            self._feat_key, self._feat_refs = ident, profiles
            self._feat_idx = torch.cat([p.feat_idx for p in profiles], dim=1)
            self._feat_plan = plan_features(self._feat_idx, self.shard[1] - self.shard[0])
        return self._feat_idx, self._feat_plan, offsets

    # ---- capture ----------------------------------------------------------
    def _new_capture(self, req_id: str, sampling_params) -> None:
        extra = getattr(sampling_params, "extra_args", None) if sampling_params else None
        if not extra or CAPTURE_KEY not in extra:
            return
        try:
            spec = parse_capture(extra[CAPTURE_KEY])
            if spec is None:
                return
            feat_idx = self._capture_columns(spec.features) if spec.features else None
        except ValueError as e:  # validated in the frontend; belt and braces
            put_bounded(self.capture_results, req_id, {"error": str(e)})
            return
        self.captures[req_id] = CaptureState(spec, feat_idx)

    def _capture_columns(self, features: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """int32 [L, F] local columns of `features` (cached: the pipeline sends
        one feature list with many requests)."""
        if features in self._capture_cols:
            return self._capture_cols[features]
        L, I = self.shape.num_layers, self.shape.intermediate_size
        start, end = self.shard
        idx = torch.full((L, len(features)), -1, dtype=torch.int32)
        for f, (layer, neuron) in enumerate(features):
            if layer >= L or neuron >= I:
                raise ValueError(f"{CAPTURE_KEY}.features: ({layer}, {neuron}) is outside the "
                                 f"model ({L} layers x {I} neurons)")
            if start <= neuron < end:
                idx[layer, f] = neuron - start
        if len(self._capture_cols) > 16:
            self._capture_cols.clear()
        self._capture_cols[features] = idx = idx.to(self.device)
        return idx

    def _plan_captures(self, ctx: StepContext, req_ids, req_id_to_index, num_scheduled,
                       num_computed, num_prompt, ends) -> None:
        mean_rows, mean_seg, tok_rows = [], [], []
        tok_sets: dict[tuple, tuple[torch.Tensor, slice]] = {}  # features -> (idx, cols)
        n_tok, n_seg, n_feat = 0, 0, 0
        for rid, cap in self.captures.items():
            i = req_id_to_index.get(rid)
            if i is None or i >= len(req_ids) or int(num_scheduled[i]) == 0:
                continue
            n = int(num_scheduled[i])
            start = int(ends[i]) - n
            computed, prompt = int(num_computed[i]), int(num_prompt[i])
            m = max(min(n, prompt - computed), 0)  # prompt rows this step
            skip = min(max(cap.next_pos - computed, 0), m)  # recorded before a preemption
            seg, in_mean = -1, 0
            if cap.spec.mean_from is not None:
                first = max(cap.spec.mean_from - computed, skip)
                if first < m:
                    seg, in_mean = n_seg, m - first
                    mean_rows.append(np.arange(start + first, start + m))
                    mean_seg.append(np.full(in_mean, n_seg))
                    n_seg += 1
            rows, cols = slice(0, 0), slice(0, 0)
            if cap.feat_idx is not None:
                until = prompt if cap.spec.tokens_until is None else cap.spec.tokens_until
                t = max(min(m, until - computed), 0)
                if t > skip:
                    key = cap.spec.features
                    if key not in tok_sets:
                        F = cap.feat_idx.shape[1]
                        tok_sets[key] = (cap.feat_idx, slice(n_feat, n_feat + F))
                        n_feat += F
                    cols = tok_sets[key][1]
                    tok_rows.append(np.arange(start + skip, start + t))
                    rows = slice(n_tok, n_tok + t - skip)
                    n_tok += t - skip
            ctx.cap_spans.append((rid, seg, rows, cols, in_mean, max(computed + m, cap.next_pos),
                                  computed + n >= prompt))
        if n_seg:
            I_shard = self.shard[1] - self.shard[0]
            ctx.cap_rows = torch.from_numpy(np.concatenate(mean_rows)).to(self.device)
            ctx.cap_seg = torch.from_numpy(np.concatenate(mean_seg)).to(self.device)
            ctx.cap_sum = torch.zeros(self.shape.num_layers, n_seg, I_shard, device=self.device)
        if n_tok:
            feat_idx = torch.cat([idx for idx, _ in tok_sets.values()], dim=1)  # [L, F_all]
            ctx.cap_feat_plan = plan_features(feat_idx, self.shard[1] - self.shard[0])
            ctx.cap_tok_rows = torch.from_numpy(np.concatenate(tok_rows)).to(self.device)
            ctx.cap_feats = torch.zeros(n_tok, n_feat, device=self.device)

    def _gathered(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-token feature values [R, F] as fp32 on the CPU. Each rank gathered
        only the features in its neuron shard (zeros elsewhere): sum the ranks."""
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce
            feats = tensor_model_parallel_all_reduce(feats)
        return feats.float().cpu()

    def _end_captures(self, ctx: StepContext) -> None:
        feats = self._gathered(ctx.cap_feats) if ctx.cap_feats is not None else None
        for rid, seg, rows, cols, in_mean, pos, done in ctx.cap_spans:
            cap = self.captures.get(rid)
            if cap is None:
                continue
            cap.next_pos = pos
            if seg >= 0:
                part = ctx.cap_sum[:, seg]  # [L, I_shard]
                cap.total = part.clone() if cap.total is None else cap.total + part
                cap.count += in_mean
            if rows.stop > rows.start:
                cap.tokens.append(feats[rows, cols])
            if done:
                if cap.total is None and cap.spec.mean_from is not None:
                    cap.total = torch.zeros(self.shape.num_layers, self.shard[1] - self.shard[0])
                put_bounded(self.capture_results, rid, cap.result())
                del self.captures[rid]

    def pop_captures(self, req_ids: list[str]) -> dict[str, dict]:
        """Finished captures of requests that belong to these frontend ids,
        keyed by engine request id. `mean` is this rank's neuron shard."""
        return pop_belonging(self.capture_results, req_ids)

    def end_step(self) -> None:
        """After the forward: feed gathered features to the predictors, and
        fold captured activations into their requests."""
        global _CURRENT
        ctx, _CURRENT = _CURRENT, None
        if ctx is None:
            return
        self.hooked_layers += ctx.hooked
        if ctx.cap_spans:
            self._end_captures(ctx)
        if not ctx.spans:
            return
        feats = self._gathered(ctx.feats)
        for rid, rows, cols, pos, done in ctx.spans:
            state = self.requests.get(rid)
            if state is None or state.pool is None:
                continue
            predictor: FailurePredictor = state.profile.profile.predictor
            state.pool = predictor.update(state.pool, feats[rows, cols])
            state.pool_pos = pos
            if done:
                state.p_fail = predictor.finish(state.pool)
                state.applied = state.p_fail >= state.steering.threshold
                state.pool = None
                self._put_report(rid, state)


def get_runtime(runner, create: bool = True) -> SteeringRuntime | None:
    """The worker's runtime, held by its model runner (`runner.adaras_runtime`)
    and created on first use from the runner's model; None when `create` is
    False and the runner has none yet."""
    rt = getattr(runner, "adaras_runtime", None)
    if rt is None and create:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )
        shape = ModelShape.from_hf_config(runner.model_config.hf_config)
        rt = runner.adaras_runtime = SteeringRuntime(
            shape, get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
            runner.device)
    return rt
