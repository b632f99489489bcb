"""Steered versions of vLLM's Qwen3, Qwen2 and Llama causal LMs.

Each class subclasses the stock one and wraps every decoder layer's
`mlp.act_fn` (SiluAndMul, no parameters, so weight loading is untouched) in a
`SteeredActivation`:

    a = act_fn(gate_up)                      # stock op: unsteered rows stay bitwise stock
    torch.ops.vllm.adaras_steer_(a, gate_up, l)   # a[r, idx] += alpha * delta, gather features

`steer_` is an opaque custom op, so vLLM's torch.compile sees one node and the
per-step state (which rows, which profile, which alpha) is read at run time
from the worker's `StepContext` (adaras.engine.step), never baked into the graph.

Steps with nothing to steer or gather run a second compiled graph without the
op: the *plain twin* (`plain_twin`), a module of a subclass of the stock
backbone that shares every submodule and weight, compiled by vLLM's own
`support_torch_compile` while `SteeredActivation` leaves the op out of the
trace. So such a step runs exactly stock vLLM's graph, with no extra call per
layer. Both graphs are ready before serving starts: vLLM's warm-up forward
compiles (or loads) the steered graph, and the twin is loaded from vLLM's
compile cache when it is there (`load_compiled`, without running it) or
compiled by running that warm-up batch once more.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.utils.torch_utils import direct_register_custom_op

from adaras.engine import step
from adaras.engine.seam.compile_cache import load_compiled, own_compile_key, renamed
from steering_kernels import HAS_TRITON, apply_sparse_steer_, sparse_steer_
from steering_kernels.steer_plan import apply_steer_plan_, gather_planned_features_

CUDA_GRAPHS_ENV = "ADARAS_CUDA_GRAPHS"  # "piecewise": allow vLLM's piecewise CUDA graphs
PLAIN_GRAPH_ENV = "ADARAS_PLAIN_GRAPH"  # "0": no second graph (see _Steered)
_TRACE_OP = True  # False while the plain twin runs: its trace leaves the op out


@contextlib.contextmanager
def _without_op():
    global _TRACE_OP
    _TRACE_OP = False
    try:
        yield
    finally:
        _TRACE_OP = True


def _steer_(act: torch.Tensor, gate_up: torch.Tensor, layer: int) -> None:
    # act: [T, I] = vLLM's silu_and_mul(gate_up), T possibly padded past the
    # step's tokens (their slot is 0); gate_up: [T, 2*I]
    step.STATS.op_calls += 1
    ctx = step.current()
    kernels = step.kernel_path()
    if kernels is not None:  # the same launches every step: a graph can replay them
        if ctx is not None:
            ctx.hooked += 1
        step.launch_kernels_(act, gate_up, layer, kernels)  # capture, gather, steer
        return
    if ctx is None:
        return
    ctx.hooked += 1
    _capture(act, gate_up, layer, ctx)
    if ctx.feats is not None:  # prompt rows of adaptive requests -> predictor features
        gather_planned_features_(ctx.feats, gate_up, ctx.feat_rows, ctx.feat_plan, layer)
    if ctx.steered:
        add_steering_(act, ctx, layer)


def _capture(act: torch.Tensor, gate_up: torch.Tensor, layer: int, ctx: step.StepContext) -> None:
    # the CPU path's capture (the kernel path's runs in launch_kernels_)
    if ctx.cap_sum is not None:  # capture reads the activation before steering
        ctx.cap_sum[layer].index_add_(0, ctx.cap_seg, act.index_select(0, ctx.cap_rows).float())
    if ctx.cap_feats is not None:
        gather_planned_features_(ctx.cap_feats, gate_up, ctx.cap_tok_rows, ctx.cap_feat_plan,
                                 layer)


def add_steering_(act: torch.Tensor, ctx: step.StepContext, layer: int) -> None:
    """act[r, c] += alpha * delta at the RCN columns of each steered row.

    CPU: the step's flat plan (1-2 ops per layer). CUDA: a Triton program per
    row that reads the step buffers in place (stable addresses, no host sync)
    and touches only steered rows' RCN columns, so unsteered rows keep vLLM's
    own silu_and_mul output bit for bit. Without Triton: the torch twin."""
    if ctx.plan is not None and act.is_contiguous():
        apply_steer_plan_(act, ctx.plan, layer)
        return
    buf = ctx.buffers
    row_slot = buf.row_slot[: act.shape[0]]  # [T]
    idx, val = buf.steer_idx[:, layer], buf.steer_val[:, layer]  # [S_max, K_max] views
    if act.is_cuda and HAS_TRITON:
        sparse_steer_(act, row_slot, idx, val)
    else:
        apply_sparse_steer_(act, row_slot, idx, val)


def _steer_fake(act: torch.Tensor, gate_up: torch.Tensor, layer: int) -> None:
    return None


direct_register_custom_op("adaras_steer_", _steer_, mutates_args=["act"], fake_impl=_steer_fake)


class SteeredActivation(nn.Module):
    """`act_fn` (vLLM's own op) followed by this layer's steering. Holds no parameters."""

    def __init__(self, act_fn: nn.Module, layer: int):
        super().__init__()
        self.act_fn = act_fn
        self.layer = layer

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: [T, 2*I] -> act: [T, I]
        act = self.act_fn(gate_up)
        if _TRACE_OP:  # read while tracing: a constant of each compiled graph
            torch.ops.vllm.adaras_steer_(act, gate_up, self.layer)
        return act


def check_supported(vllm_config) -> None:
    """Refuse configurations where steering would silently not happen.

    Pipeline parallelism splits the layers across processes; the worker
    runtime plans and gathers predictor features per process, so a stage would
    decide on a part of the features (untested, refused).

    CUDA graphs replay the kernels captured at warm-up. On the kernel path the
    op's launches depend on buffer contents only (`step.launch_kernels_`), so
    a piecewise graph with the op inside a piece should replay steering
    correctly, but that has not run on a GPU: piecewise graphs are refused
    unless ADARAS_CUDA_GRAPHS=piecewise (for users whose
    scripts/gpu_e2e_check.py passed), and full graphs always are. The CPU
    backend never uses CUDA graphs.
    """
    from vllm.config import CUDAGraphMode

    parallel = getattr(vllm_config, "parallel_config", None)
    pp = getattr(parallel, "pipeline_parallel_size", 1)
    if pp > 1:
        raise ValueError(
            f"AdaRAS steering does not support pipeline parallelism (pipeline_parallel_size={pp}): "
            "the predictor needs every layer's features in one process; use "
            "--tensor-parallel-size instead, or set ADARAS_PLUGIN=0 to serve unsteered")
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return
    if mode == CUDAGraphMode.PIECEWISE and os.environ.get(CUDA_GRAPHS_ENV) == "piecewise":
        return  # the user's opt-in, after scripts/gpu_e2e_check.py passed on their GPU
    raise ValueError(
        f"AdaRAS steering does not support CUDA graphs yet (cudagraph_mode={mode.name}): "
        "start vLLM with --enforce-eager, or set ADARAS_PLUGIN=0 to serve unsteered "
        f"(piecewise graphs are opt-in with {CUDA_GRAPHS_ENV}=piecewise once "
        "scripts/gpu_e2e_check.py passes on your GPU)")


def wrap_mlps(model: nn.Module) -> int:
    """Wrap `mlp.act_fn` of every local decoder layer; returns how many."""
    n = 0
    for layer_idx, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not hasattr(mlp, "act_fn"):
            continue  # PPMissingLayer on other pipeline stages
        if not isinstance(mlp.act_fn, SteeredActivation):
            mlp.act_fn = SteeredActivation(mlp.act_fn, layer_idx)
            n += 1
    return n


def plain_twin(model: nn.Module) -> nn.Module:
    """The backbone `model` again, over the same submodules and weights, as a
    separately compiled module whose graph has no steering op.

    Its class is `renamed` from the stock backbone (Qwen2Model, ...) and is
    decorated with vLLM's `support_torch_compile` and the stock dynamic
    dimensions, so its graph has its own compile-cache entry. Where vLLM does
    not compile the backbone (eager), the backbone itself is returned: the op
    is then skipped by a Python check per layer."""
    if getattr(model, "do_not_compile", True):
        return model
    from vllm.compilation.backends import set_model_tag
    from vllm.compilation.decorators import support_torch_compile

    name = f"AdarasPlain{type(model).__name__}"

    def __init__(self, *, vllm_config, prefix: str = "", twin_of: nn.Module):
        nn.Module.__init__(self)
        for key, value in twin_of.__dict__.items():
            self.__dict__[key] = dict(value) if key in ("_modules", "_parameters",
                                                         "_buffers") else value
        # the decorator's __init__ then resets the compile state for this module

    cls = renamed(type(model), name)
    cls.__init__ = __init__
    cls = support_torch_compile(dynamic_arg_dims=model._dynamic_arg_dims)(cls)
    with set_model_tag(name):  # VllmBackend's cache directory, where it is used
        return cls(vllm_config=model.vllm_config, twin_of=model)


class _Steered:
    """The steered causal LM's own part: wrapped MLPs, and a forward that runs
    the plain twin when no row of the step is steered or gathered."""

    def _init_steering(self) -> None:
        """ADARAS_PLAIN_GRAPH=0 keeps one compiled graph: the first start
        compiles once instead of twice, and every forward calls the op in
        every layer (it returns at once when nothing is steered)."""
        wrap_mlps(self)
        if os.environ.get(PLAIN_GRAPH_ENV, "1") == "0":
            twin, kind = None, "disabled"
        else:
            twin = plain_twin(self.model)
            kind = "eager" if twin is self.model else "compiled"
        own_compile_key(self.model)  # after the twin, which is made from the stock class
        # not a submodule: its weights are the backbone's, loaded once
        object.__setattr__(self, "plain_model", twin)
        self._adaras_warm = twin is self.model  # eager: one model, nothing more to compile
        step.STATS.plain_graph = kind

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        args = (input_ids, positions, intermediate_tensors, inputs_embeds)
        if step.current() is not None:
            step.STATS.forwards_steered += 1
            return self.model(*args)
        step.STATS.forwards_plain += 1
        if self.plain_model is None:  # one graph: the op is called and returns at once
            return self.model(*args)
        if not self._adaras_warm:  # first forward (vLLM's start-up run): both graphs
            self._adaras_warm = True
            out = self.model(*args)
            if load_compiled(self.plain_model):
                step.STATS.plain_graph_from = "loaded"
                return out
            step.STATS.plain_graph_from = "compiled"
        with _without_op():
            return self.plain_model(*args)


class SteeredQwen3ForCausalLM(_Steered, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        check_supported(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_steering()


class SteeredQwen2ForCausalLM(_Steered, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        check_supported(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_steering()


class SteeredLlamaForCausalLM(_Steered, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        check_supported(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._init_steering()
