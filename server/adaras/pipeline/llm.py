"""The pipeline's `vllm.LLM`: how each stage opens the steered engine (one per
process and options, every core bound), hands it batches of jobs with
checkpoints, and meters its throughput. Every generation and every activation
capture goes through it, never through a Hugging Face generation loop."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass
class EngineOptions:
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    tensor_parallel_size: int = 1
    seed: int = 0
    kv_cache_gib: int = 4
    chunk: int = 256  # requests in the engine at once (run_jobs); a capture batch
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """What decides the results (recorded in the manifest); `chunk` only
        sets how often work is checkpointed, so it may change between resumes."""
        out = asdict(self)
        out.pop("chunk")
        return out


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn())


_ENGINES: dict[str, object] = {}


def cpu_binding(tp: int) -> str | None:
    """CPU vLLM's compute-thread binding for an offline run: all usable cores,
    split evenly over the TP ranks ("0-1" for one rank on two cores; "0|1" for
    two). vLLM's own default keeps one core for the frontend, which an offline
    batch run barely uses: on 2 cores SmolLM2 decodes 1308 tok/s with "0-1"
    against 920 tok/s with the default. None when the cores cannot be split."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per = len(cores) // tp if tp else 0
    if per < 1:
        return None
    groups = [cores[r * per:(r + 1) * per] for r in range(tp)]
    if any(g[-1] - g[0] != len(g) - 1 for g in groups):  # not contiguous: list them
        return "|".join(",".join(map(str, g)) for g in groups)
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


@contextmanager
def _env_defaults(values: dict[str, str | None]) -> Iterator[None]:
    """Set variables the user has not set, for the duration of the block."""
    added = [k for k, v in values.items() if v is not None and k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def engine_env(opts: EngineOptions) -> dict[str, str | None]:
    """The variables the pipeline's engine processes get unless the user set
    them: KV cache size, core binding, and ADARAS_CAPTURE_SLOTS = max_num_seqs
    (on the kernel path every request of a batch may capture a mean at once,
    so a pipeline never runs out of capture slots)."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(int(opts.kv_cache_gib)),
            "VLLM_CPU_OMP_THREADS_BIND": cpu_binding(opts.tensor_parallel_size),
            "ADARAS_CAPTURE_SLOTS": str(int(opts.max_num_seqs))}


def open_engine(opts: EngineOptions, run=None):
    """A vLLM `LLM` with the AdaRAS plugin active (the plugin registers itself
    through its entry point in every vLLM process). One engine per set of
    options and process: stages run in one process share it. With `run`
    (a pipeline.run.Run), the dtype the engine resolved (never "auto") goes
    into the running stage's manifest entry."""
    import json

    key = json.dumps(opts.to_dict(), sort_keys=True)
    if key not in _ENGINES:
        _ENGINES[key] = _new_engine(opts)
    if run is not None:
        run.record_engine_dtype(resolved_dtype(_ENGINES[key]))
    return _ENGINES[key]


def resolved_dtype(llm) -> str:
    """The dtype the engine runs in, e.g. "float32"."""
    return str(llm.llm_engine.model_config.dtype).removeprefix("torch.")


def vocab_size(llm) -> int:
    """The width of the engine's logits (what a logprob is normalized over)."""
    return int(llm.llm_engine.model_config.get_vocab_size())


def _new_engine(opts: EngineOptions):
    from vllm import LLM

    from adaras.engine import plugin
    from adaras.zoo import resolve_model

    plugin.register()
    with _env_defaults(engine_env(opts)):  # the engine processes spawned here inherit these
        llm = LLM(str(resolve_model(opts.model)), dtype=opts.dtype,
                  max_model_len=opts.max_model_len, max_num_seqs=opts.max_num_seqs,
                  tensor_parallel_size=opts.tensor_parallel_size, seed=opts.seed,
                  enable_prefix_caching=True, **opts.extra)
    return llm


def close_engines() -> None:
    while _ENGINES:
        _, llm = _ENGINES.popitem()
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt, exactly as the server's chat endpoint builds
    it (the model's chat template; a plain fallback for template-less models)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Job:
    key: str
    prompt: list[int]
    params: object  # vllm.SamplingParams


@dataclass
class Meter:
    """Engine throughput of one run_jobs/run_captures call (only the time
    spent in the engine, not in the caller's checkpoints), as recorded in the
    stage manifests."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        s = max(self.seconds, 1e-9)
        return {**asdict(self), "seconds": round(self.seconds, 2),
                "generated_tok_s": round(self.generated_tokens / s, 1),
                "prompt_tok_s": round(self.prompt_tokens / s, 1)}


def _in_chunks(llm, jobs: Sequence[Job], description: str, chunk: int, collect, meter: Meter):
    """Generate `jobs` `chunk` at a time under a progress bar; yields each
    chunk's (jobs, RequestOutputs, collect(llm, RequestOutputs)) and counts its
    work in `meter`."""
    with progress() as bar:
        task = bar.add_task(description, total=len(jobs))
        for i in range(0, len(jobs), chunk):
            part = jobs[i:i + chunk]
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": j.prompt} for j in part],
                                [j.params for j in part], use_tqdm=False)
            meter.seconds += time.perf_counter() - t0
            meter.requests += len(part)
            meter.prompt_tokens += sum(len(j.prompt) for j in part)
            meter.generated_tokens += sum(len(o.outputs[0].token_ids) for o in outs)
            yield part, outs, collect(llm, outs)
            bar.advance(task, len(part))


def run_jobs(llm, jobs: Sequence[Job], on_done: Callable[[list[tuple[Job, object, dict]]], None],
             description: str, chunk: int = 256, flush: int = 16,
             on_progress: Callable[[dict], object] | None = None) -> dict:
    """Generate `jobs`, keeping at most `chunk` unfinished requests in the
    engine (a waiting queue deep enough that the batch stays full), and call
    `on_done` with (job, RequestOutput, steering report) triples in job order,
    as soon as `flush` more of them have finished with every earlier job, so
    the caller checkpoints while the engine runs. Unlike one `llm.generate`
    per chunk, no batch drains waiting for a chunk's longest answer.
    Returns the throughput (Meter.to_dict()); `on_progress` gets it so far
    after each `on_done` (Run.throughput_recorder)."""
    from collections import deque

    from vllm.sampling_params import RequestOutputKind

    from adaras.engine import reports_of

    chunk = max(1, chunk)
    meter, queue = Meter(), deque(jobs)
    submitted: deque[str] = deque()  # request ids in job order, not yet handed over
    in_flight: dict[str, Job] = {}
    finished: dict[str, tuple[Job, object]] = {}
    engine = llm.llm_engine

    def ready() -> int:  # finished jobs with every earlier job finished too
        n = 0
        for rid in submitted:
            if rid not in finished:
                break
            n += 1
        return n

    def hand_over(n: int) -> None:
        done = [finished.pop(submitted.popleft()) for _ in range(n)]
        reports = reports_of([o for _, o in done])
        meter.requests += n
        meter.prompt_tokens += sum(len(j.prompt) for j, _ in done)
        meter.generated_tokens += sum(len(c.token_ids) for _, o in done for c in o.outputs)
        on_done([(j, o, reports.get(o.request_id, {})) for j, o in done])
        if on_progress is not None:
            on_progress(meter.to_dict())
        bar.advance(task, n)

    with progress() as bar:
        task = bar.add_task(description, total=len(queue))
        try:
            while queue or in_flight:
                t0 = time.perf_counter()
                while queue and len(in_flight) < chunk:
                    job = queue.popleft()
                    job.params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate
                    rid = f"adaras-job-{next(_REQUEST_IDS)}"
                    # rendered as LLM.generate does (vLLM 0.32 deprecates raw prompt dicts)
                    (prompt,) = engine.renderer.render_cmpl([{"prompt_token_ids": job.prompt}])
                    engine.add_request(rid, prompt, job.params)
                    in_flight[rid] = job
                    submitted.append(rid)
                for out in engine.step():
                    if out.finished and out.request_id in in_flight:
                        finished[out.request_id] = (in_flight.pop(out.request_id), out)
                if in_flight and not engine.has_unfinished_requests():
                    raise RuntimeError(f"the engine dropped {len(in_flight)} requests unfinished")
                meter.seconds += time.perf_counter() - t0
                if (n := ready()) and (n >= flush or not in_flight):
                    hand_over(n)
        finally:  # stopped early (an error, Ctrl-C): the engine keeps nothing of this call
            if in_flight:
                try:
                    engine.abort_request(list(in_flight))
                except Exception:  # noqa: BLE001 - a dead engine: keep the original error
                    pass
    return meter.to_dict()


_REQUEST_IDS = itertools.count()


def run_captures(llm, jobs: Sequence[Job], on_done: Callable[[list[tuple[Job, dict]]], None],
                 description: str, chunk: int = 32,
                 on_progress: Callable[[dict], object] | None = None,
                 keep_prompt_logprobs: bool = False) -> dict:
    """Teacher-forced activation capture: each job's prompt is prefilled once
    (max_tokens=1) with `extra_args["adaras_capture"]` set in its params.
    With `keep_prompt_logprobs`, each capture also carries the request's
    `prompt_logprobs` (its params must ask for them).
    Returns the throughput (Meter.to_dict()); `on_progress` as in run_jobs."""
    from adaras.engine import pop_captures

    meter = Meter()
    def collect(llm, outs):
        return pop_captures(llm, [o.request_id for o in outs])

    for part, outs, caps in _in_chunks(llm, jobs, description, chunk, collect, meter):
        results = []
        for j, o in zip(part, outs):
            cap = caps.get(o.request_id)
            if cap is None or "error" in cap:
                raise RuntimeError(f"capture of {j.key} failed: "
                                   f"{(cap or {}).get('error', 'no result from the engine')}")
            if keep_prompt_logprobs:
                cap = {**cap, "prompt_logprobs": o.prompt_logprobs}
            results.append((j, cap))
        on_done(results)
        if on_progress is not None:
            on_progress(meter.to_dict())
    return meter.to_dict()


def capture_params(spec: dict):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, extra_args={"adaras_capture": spec})
