"""The CPU platform, where AdaRAS needs vLLM's or torch's internals: a
vLLM-CPU fix independent of steering (`patch_cpu_generator_rewind`), and
whether this CPU has native bf16 (`cpu_without_native_bf16`, torch's private
checks, the ones vLLM's CPU platform makes). Pinned by
tests/engine/test_vllm_seam.py and tests/api/test_serve_args.py."""

from __future__ import annotations


def cpu_without_native_bf16() -> bool:
    """Whether vLLM runs on an x86 CPU with neither AVX512-BF16 nor AMX tiles,
    where its bf16 is emulated (the checks vLLM's CPU platform makes on x86)."""
    import torch
    from vllm.platforms import CpuArchEnum, current_platform

    return (current_platform.is_cpu()
            and current_platform.get_cpu_architecture() == CpuArchEnum.X86
            and not (torch.cpu._is_avx512_bf16_supported()
                     or torch.cpu._is_amx_tile_supported()))


def patch_cpu_generator_rewind() -> None:
    """GPUModelRunner._prepare_inputs and ._bookkeeping_sync (workers), a fix
    for vLLM-CPU 0.32 independent of steering.

    vLLM samples a token after every prefill chunk, discards it for a partial
    prompt, and undoes the draw of a seeded request's generator with
    `generator.set_offset(...)` in `_bookkeeping_sync`. CPU generators have no
    offset ("CPU Generator does not use offset"), so stock vLLM-CPU dies on the
    first seeded request with a chunked prompt (the same bug as
    RBLN-SW/vllm-rbln#1025). For CPU generators this saves the state before
    sampling and restores it instead of the rewind.
    """
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_adaras_generator_fix", False):
        return
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_bookkeeping = GPUModelRunner._bookkeeping_sync

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = orig_prepare(self, scheduler_output, num_scheduled_tokens)
        batch = self.input_batch
        if batch.generators:  # the draws of discarded (partial-prefill) samples
            n = batch.num_reqs
            self._adaras_gen_states = {
                int(i): g.get_state() for i in np.flatnonzero(self.discard_request_mask.np[:n])
                if (g := batch.generators.get(int(i))) is not None and g.device.type == "cpu"}
        return out

    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_adaras_gen_states", None) or {}
        self._adaras_gen_states = None
        gens = self.input_batch.generators
        held = {i: gens.pop(i) for i in saved if i in gens}  # hidden from set_offset()
        try:
            return orig_bookkeeping(self, *args, **kwargs)
        finally:
            for i, g in held.items():
                g.set_state(saved[i])
                gens[i] = g

    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    GPUModelRunner._adaras_generator_fix = True
