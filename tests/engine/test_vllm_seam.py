"""Pins the vLLM symbols the plugin patches or relies on, so that a vLLM
upgrade that moves one fails here, not silently in production. Read from
vLLM's source (the test process has the plugin's patches installed)."""

from __future__ import annotations

import ast
import inspect

import pytest

from adaras.engine import seam


def stock_methods(module, cls: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(inspect.getsource(module))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}


def runner() -> dict[str, ast.FunctionDef]:
    import vllm.v1.worker.gpu_model_runner as mod

    return stock_methods(mod, "GPUModelRunner")


RUNNER_METHODS = {  # what the plugin wraps or relies on, with the leading parameters it uses
    "_prepare_inputs": ["self", "scheduler_output", "num_scheduled_tokens"],
    "execute_model": ["self", "scheduler_output"],
    "sample_tokens": ["self", "grammar_output"],
    "_bookkeeping_sync": ["self"],
    "_on_request_state_removed": ["self", "req_id", "req_state"],
    "_update_states": ["self", "scheduler_output"],
}


@pytest.mark.parametrize("name", sorted(RUNNER_METHODS))
def test_runner_methods_exist_with_the_parameters_we_use(name):
    methods = runner()
    assert name in methods, f"GPUModelRunner.{name} is gone"
    params = [a.arg for a in methods[name].args.args]
    assert params[:len(RUNNER_METHODS[name])] == RUNNER_METHODS[name]


def test_update_states_releases_through_the_hook_for_every_finished_request():
    source = ast.unparse(runner()["_update_states"])
    assert "for req_id in scheduler_output.finished_req_ids" in source
    assert "self._on_request_state_removed(req_id, req_state)" in source


def test_empty_steps_still_update_states():
    """The idle step carries the last finished ids: vLLM calls _update_states
    before it returns early on zero scheduled tokens."""
    source = ast.unparse(runner()["execute_model"])
    assert source.index("self._update_states(") < source.index("if not num_scheduled_tokens")


def test_bookkeeping_rewinds_generators_with_set_offset():
    """What cpu_generator_rewind works around; if vLLM stops calling
    set_offset there, the fix can go."""
    assert "set_offset" in ast.unparse(runner()["_bookkeeping_sync"])


def test_input_batch_fields_the_runtime_reads():
    from vllm.v1.worker.gpu_input_batch import InputBatch

    source = inspect.getsource(InputBatch)
    for field in ("self.req_ids", "self.req_id_to_index", "self.num_computed_tokens_cpu",
                  "self.num_prompt_tokens", "self.generators", "def num_reqs"):
        assert field in source, field


def test_runner_sizes_the_step_buffers_are_allocated_from():
    """get_runtime allocates the step buffers once from these maxima."""
    source = ast.unparse(runner()["__init__"])
    assert "self.max_num_tokens = scheduler_config.max_num_batched_tokens" in source
    assert "self.max_num_reqs = scheduler_config.max_num_seqs" in source


def test_frontend_worker_and_model_hooks_exist():
    import vllm.v1.engine.input_processor as ip
    from vllm.model_executor.models.qwen2 import Qwen2MLP
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    process = stock_methods(ip, "InputProcessor")["process_inputs"]
    assert [a.arg for a in process.args.args][:4] == ["self", "request_id", "prompt", "params"]
    assert inspect.isclass(WorkerWrapperBase)
    assert "self.act_fn = SiluAndMul()" in inspect.getsource(Qwen2MLP.__init__)


def test_openai_request_models_keep_unknown_fields_and_build_sampling_params():
    """seam.patch_openai_requests carries `steering` from the body's extra
    fields into extra_args: it needs `extra="allow"` and to_sampling_params."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for cls in (ChatCompletionRequest, CompletionRequest):
        assert cls.model_config.get("extra") == "allow", cls.__name__
        assert callable(getattr(cls, "to_sampling_params", None)), cls.__name__


def outside_the_seam():
    """(path relative to the package, parsed module) of every module of the
    package outside the seam package."""
    import pathlib

    import adaras

    root = pathlib.Path(adaras.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if "seam" not in path.relative_to(root).parts:
            yield path.relative_to(root), ast.parse(path.read_text())


def test_every_patch_lives_in_the_seam_package():
    """No module outside the seam package assigns to a vLLM class attribute."""
    offenders = []
    for path, tree in outside_the_seam():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                            and target.value.id in ("GPUModelRunner", "InputProcessor",
                                                    "WorkerWrapperBase", "ChatCompletionRequest",
                                                    "CompletionRequest", "SamplingParams"):
                        offenders.append(f"{path}:{node.lineno}")
    assert offenders == []


def test_prefix_cache_symbols_the_engine_core_patch_relies_on():
    """seam.patch_prefix_cache: the block hasher calls the extra-keys function
    by its module name, for every block; the cache lookup reads only the
    request's block hashes; and the request fields the patch reads exist."""
    import vllm.v1.core.block_pool as block_pool
    import vllm.v1.core.kv_cache_coordinator as coordinator
    import vllm.v1.core.kv_cache_manager as manager
    import vllm.v1.core.kv_cache_utils as utils
    import vllm.v1.request as request

    functions = {f.name: f for f in ast.parse(inspect.getsource(utils)).body
                 if isinstance(f, ast.FunctionDef)}
    extra = functions["generate_block_hash_extra_keys"]
    assert [a.arg for a in extra.args.args] == ["request", "start_token_idx", "end_token_idx",
                                                "start_mm_idx"]
    assert "generate_block_hash_extra_keys(" in ast.unparse(functions["get_request_block_hasher"])
    lookup = ast.unparse(stock_methods(manager, "KVCacheManager")["get_computed_blocks"])
    assert "find_longest_cache_hit(request.block_hashes" in lookup
    assert "return (self.empty_kv_cache_blocks, 0, 0)" in lookup \
        or "return self.empty_kv_cache_blocks, 0, 0" in lookup
    init = ast.unparse(stock_methods(request, "Request")["__init__"])
    for field in ("self.num_prompt_tokens", "self.num_preemptions", "self.block_hashes",
                  "self.sampling_params"):
        assert field in init, field
    pool = ast.unparse(stock_methods(block_pool, "BlockPool")["__init__"])
    assert "self.hash_block_size = hash_block_size" in pool
    assert "self.block_pool = BlockPool(" in inspect.getsource(coordinator)


def test_compile_symbols_the_plain_twin_relies_on():
    """models.plain_twin: vLLM's compile decorator keeps the dynamic dims and
    the no-compile flag on the instance, keys its AOT cache by the forward's
    qualified name, finds the compiled code by the class's forward, and
    decorates a subclass of an already decorated backbone again."""
    import vllm.compilation.decorators as decorators
    import vllm.compilation.wrapper as wrapper
    from vllm.compilation.backends import set_model_tag  # noqa: F401

    source = inspect.getsource(decorators)
    assert "self._dynamic_arg_dims = dynamic_arg_dims" in source
    assert "self.do_not_compile = (" in source
    assert "TorchCompileWithNoGuardsWrapper in cls.__bases__" in source
    assert "fn.__qualname__" in inspect.getsource(decorators._model_hash_key)
    assert "_model_hash_key(self.forward)" in source
    original = ast.unparse(stock_methods(wrapper, "TorchCompileWithNoGuardsWrapper")
                           ["original_code_object"])
    assert "self.__class__.forward.__code__" in original


def test_compile_cache_symbols_the_restart_fix_relies_on():
    """seam.patch_compile_cache: vLLM loads an AOT artifact with torch's
    `load_compiled_function` and then calls `finalize_loading` on its
    compiled function, which torch's bundled Inductor callable (the CPU
    backend's) does not define: the seam adds it. If torch or vLLM change
    either side, this fails and the patch is to be reviewed."""
    import vllm.compilation.decorators as decorators
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    from torch._inductor import cpu_vec_isa
    from torch._inductor.cpp_builder import get_cpp_compiler  # noqa: F401

    load = inspect.getsource(decorators._try_load_aot_compiled_fn)
    assert "torch.compiler.load_compiled_function(" in load
    assert "loaded_fn._artifacts.compiled_fn.finalize_loading(model.vllm_config)" in load
    assert "_try_load_aot_compiled_fn(self, aot_compilation_path)" in inspect.getsource(
        decorators)
    # seam.compile_cache.aot_artifact / load_compiled compute the artifact's path and install
    # a loaded graph as the decorator's __call__ does
    call = inspect.getsource(decorators)
    for line in ("factors: list[str] = aot_compile_hash_factors(self.vllm_config)",
                 "factors.append(_model_hash_key(self.forward))",
                 "hash_key = hashlib.sha256(str(factors).encode()).hexdigest()",
                 '"torch_aot_compile",', 'cache_dir = os.path.join(cache_dir, f"rank_{rank}_{dp_rank}")',
                 "dp_rank = self.vllm_config.parallel_config.data_parallel_index",
                 'aot_compilation_path = os.path.join(cache_dir, "model")',
                 'os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache',
                 "self.compilation_config.local_cache_dir = cache_dir",
                 "self.aot_compiled_fn = loaded_fn",
                 "self.was_aot_compile_fn_loaded_from_disk = True",
                 'if getattr(self, "aot_compiled_fn", None) is not None:'):
        assert line in call, line
    seam.patch_compile_cache()
    ours = BundledAOTAutogradSerializableCallable.finalize_loading
    assert ours.__module__ == "adaras.engine.seam.compile_cache", "torch now defines it: drop the patch"
    isa = inspect.getsource(cpu_vec_isa)
    assert "def check_build(self, code: str) -> bool:" in isa
    assert "return self.check_build(VecISA._avx_code)" in isa


@pytest.mark.parametrize("module,cls", [("qwen2", "Qwen2ForCausalLM"),
                                        ("qwen3", "Qwen3ForCausalLM"),
                                        ("llama", "LlamaForCausalLM")])
def test_stock_causal_lm_forward_only_calls_the_backbone(module, cls):
    """The steered classes replace forward with a choice between two backbones
    and nothing else: the stock forward must do nothing but call self.model."""
    import importlib

    mod = importlib.import_module(f"vllm.model_executor.models.{module}")
    forward = stock_methods(mod, cls)["forward"]
    assert [a.arg for a in forward.args.args] == ["self", "input_ids", "positions",
                                                  "intermediate_tensors", "inputs_embeds"]
    calls = [n for n in ast.walk(forward) if isinstance(n, ast.Call)]
    assert [ast.unparse(c.func) for c in calls] == ["self.model"]


def test_report_channel_symbols():
    """What reports.py and the seam's report patches rely on, hop by hop."""
    import dataclasses
    import pickle

    import vllm.v1.engine.output_processor as op
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

    # worker -> engine core: a plain dataclass (an extra attribute survives pickling)
    out = ModelRunnerOutput(req_ids=["r"], req_id_to_index={"r": 0})
    assert dataclasses.is_dataclass(out) and hasattr(out, "__dict__")
    out.adaras_reports = {"r": {"applied": True}}
    assert pickle.loads(pickle.dumps(out)).adaras_reports == {"r": {"applied": True}}
    assert "self._model_runner_output = model_runner_output" in \
        inspect.getsource(AsyncGPUModelRunnerOutput.__init__)
    # engine core: update_from_output's outputs carry a mutable kv_transfer_params dict
    params = list(inspect.signature(Scheduler.update_from_output).parameters)
    assert params[:3] == ["self", "scheduler_output", "model_runner_output"]
    assert "outputs" in EngineCoreOutputs.__struct_fields__
    eco = EngineCoreOutput(request_id="r", new_token_ids=[])
    eco.kv_transfer_params = {"adaras_report": {}}
    assert "kv_transfer_params" in EngineCoreOutput.__struct_fields__
    # frontend: the output processor's request states and their choice identity
    stock = stock_methods(op, "OutputProcessor")  # the test process runs the patched ones
    src = ast.unparse(stock["process_outputs"])
    assert "self.request_states.get(req_id)" in src
    assert "engine_core_output.kv_transfer_params" in src
    state = stock_methods(op, "RequestState")
    init = ast.unparse(state["__init__"])
    for field in ("self.external_req_id = ", "self.parent_req = ", "self.request_index = "):
        assert field in init
    assert "CompletionOutput" in ast.unparse(state["_new_completion_output"])


def test_the_openai_server_names_requests_after_the_x_request_id_header():
    """The steering middleware sets X-Request-Id to its own key and finds the
    reports under `chatcmpl-<key>` and `cmpl-<key>-<prompt index>`."""
    import vllm.entrypoints.openai.chat_completion.serving as chat
    import vllm.entrypoints.openai.completion.serving as completion
    import vllm.entrypoints.serve.engine.serving as base

    assert 'raw_request.headers.get("X-Request-Id")' in inspect.getsource(base)
    assert 'f"chatcmpl-{self._base_request_id(raw_request' in inspect.getsource(chat)
    src = inspect.getsource(completion)
    assert 'f"cmpl-{self._base_request_id(raw_request' in src
    assert 'request_id_item = f"{request_id}-{i}"' in src


def test_no_private_vllm_or_torch_call_and_no_class_swap_outside_the_seam():
    """Issue 32: every call of a private vLLM or torch function (a `_name`
    attribute of a vllm/torch module or class) and every `obj.__class__ = ...`
    is in the seam package."""
    offenders = []
    for path, tree in outside_the_seam():
        vendor = {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.Import) for a in n.names
                  if a.name.split(".")[0] in ("vllm", "torch")}
        vendor |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and (n.module or "").split(".")[0] in ("vllm", "torch") for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Attribute) and t.attr == "__class__" for t in node.targets):
                offenders.append(f"{path}:{node.lineno} swaps __class__")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr.startswith("_") and not node.func.attr.startswith("__")):
                base = node.func.value
                while isinstance(base, ast.Attribute):  # torch.cpu._x: the chain's root
                    base = base.value
                if isinstance(base, ast.Name) and base.id in vendor:
                    offenders.append(f"{path}:{node.lineno} calls "
                                     f"{ast.unparse(node.func)}")
    assert offenders == []
