"""`adaras capture-validation`: a profile's heads and the logprob confidences
read again, by teacher forcing, on the validation split its heads were fit
with, in the engine's dtype: the data every knob of a held-out measurement
is fixed on before any held-out answer exists (calibration map, DeepConf
window and tail, combined score, early-stop bounds).

For every validation trace of collect's answers (the answer head's split,
`train.split_by_problem` with the default TrainArgs) the engine prefills
prompt + answer once with the answer head's features captured and the top-k
`prompt_logprobs` on, and for every validation problem of the prompt head's
split (`train.split_problems` on the greedy labels) the prompt with the
prompt head's features. Output in <run>/<stage>/: traces.jsonl (key,
problem, greedy, label, finished, tokens, answer_logit,
the head's running logit after every 64 answer tokens, confidence arrays)
and prompts.jsonl (problem, label, prompt_logit). Resumable per chunk.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaras import confidence
from adaras.pipeline.grade import counts_as_correct, is_cut
from adaras.pipeline.llm import EngineOptions, Job, open_engine, run_captures, vocab_size
from adaras.pipeline.run import Run, append_jsonl, read_jsonl
from adaras.pipeline.train import TrainArgs, split_by_problem, split_problems
from adaras.profile import SteeringProfile

RUNNING_EVERY = 64  # answer tokens between two readings of the running answer probability


@dataclass
class ValidationArgs:
    traces: str  # folder with collect's greedy.jsonl(.gz) and samples.jsonl(.gz)
    profile: str  # the profile whose heads are read
    logprobs: int = confidence.TOP_K
    limit: int | None = None  # the first N traces only (to measure the cost)
    stage: str = "validation"


def read_rows(folder: Path, name: str) -> list[dict]:
    """collect's <name>.jsonl, or its committed gzip copy."""
    plain, packed = folder / f"{name}.jsonl", folder / f"{name}.jsonl.gz"
    if plain.exists():
        return read_jsonl(plain)
    if packed.exists():
        with gzip.open(packed, "rt") as f:
            return [json.loads(line) for line in f if line.strip()]
    # stage 1's committed copies are named collect-<name>.jsonl.gz
    with gzip.open(folder / f"collect-{name}.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def validation_traces(folder: Path) -> tuple[list[dict], list[dict]]:
    """(answer traces of the answer head's validation split, greedy rows of
    the prompt head's validation problems), exactly as train-predictor split them."""
    greedy_rows = read_rows(folder, "greedy")
    traces = []
    for name, rows in (("greedy", greedy_rows), ("samples", read_rows(folder, "samples"))):
        for r in rows:
            ids = r["completion_ids"]
            if len(ids) < 2:
                continue
            traces.append({"key": r["key"], "problem": r["problem"], "greedy": name == "greedy",
                           "prompt": r["prompt"], "completion": ids,
                           "label": int(not counts_as_correct(r)), "finished": not is_cut(r)})
    labels = {r["problem"]: int(not counts_as_correct(r)) for r in greedy_rows}
    val = split_by_problem(traces, labels, TrainArgs())["val"]
    # The splits are stratified by label, so they depend on the labels the head was
    # trained with. The answer head was split on the cut rule's labels (a cut answer is
    # wrong), as today. The prompt head of stage 1 (2026-12-03) was split on the
    # grader's verdict alone, before the cut rule reached train-predictor (2026-12-04);
    # 2 of its 320 labels differ, which moves 86 problems between its splits, so its
    # validation problems are drawn as it drew them. (Its calibration is fit on the cut
    # rule's labels, the registered ones; no validation problem is one of the 2.)
    y = np.array([int(not r["correct"]) for r in greedy_rows])
    args = TrainArgs()
    prompt_val = split_problems(y, args.val_fraction, args.test_fraction, args.seed)["val"]
    return [traces[i] for i in val], [greedy_rows[i] for i in prompt_val]


@torch.no_grad()
def head_logit(head, x: np.ndarray) -> float:
    """The head's raw logit (before the sigmoid) on one sequence's features [T, F]."""
    return float(head._head(head.pool(torch.from_numpy(np.ascontiguousarray(x))), dropout=False))


def features_of(head) -> list[list[int]]:
    return [[int(a), int(b)] for a, b in zip(head.feature_layers, head.feature_neurons)]


def capture_validation(run: Run, args: ValidationArgs, engine: EngineOptions) -> Path:
    from vllm import SamplingParams

    profile = SteeringProfile.load(args.profile)
    if profile.answer_predictor is None or profile.predictor is None:
        raise ValueError(f"{args.profile} needs both heads (prompt and answer)")
    with run.stage(args.stage, {**vars(args), "engine": engine.to_dict()}) as out:
        traces, prompts = validation_traces(Path(args.traces))
        if args.limit is not None:
            traces, prompts = traces[:args.limit], prompts[:0]
        done_t = {r["key"] for r in read_jsonl(out / "traces.jsonl")}
        done_p = {r["problem"] for r in read_jsonl(out / "prompts.jsonl")}
        answer, prompt_head = profile.answer_predictor, profile.predictor
        by_key = {t["key"]: t for t in traces}
        jobs = [Job(t["key"], t["prompt"] + t["completion"], SamplingParams(
                    max_tokens=1, temperature=0.0, prompt_logprobs=args.logprobs,
                    extra_args={"adaras_capture": {"features": features_of(answer)}}))
                for t in traces if t["key"] not in done_t]
        jobs += [Job(f"prompt|{r['problem']}", r["prompt"], SamplingParams(
                     max_tokens=1, temperature=0.0,
                     extra_args={"adaras_capture": {"features": features_of(prompt_head)}}))
                 for r in prompts if r["problem"] not in done_p]
        labels = {r["problem"]: int(not counts_as_correct(r)) for r in prompts}
        if not jobs:
            return out
        llm = open_engine(engine, run)
        vocab = vocab_size(llm)

        def on_done(results):
            rows_t, rows_p = [], []
            for job, cap in results:
                if job.key.startswith("prompt|"):
                    problem = job.key.split("|", 1)[1]
                    rows_p.append({"problem": problem, "label": labels[problem],
                                   "prompt_logit": head_logit(prompt_head, cap["tokens"])})
                    continue
                t = by_key[job.key]
                start, n = len(t["prompt"]), len(t["completion"])
                lps = cap["prompt_logprobs"][start:start + n]
                rows_t.append({
                    "key": t["key"], "problem": t["problem"], "greedy": t["greedy"],
                    "label": t["label"], "finished": t["finished"], "tokens": n,
                    # the head reads every generated token but the last, as trained
                    "answer_logit": head_logit(answer, cap["tokens"][start:start + n - 1]),
                    # the running value an online rule would see: after 64, 128, ... tokens
                    "running_logits": [head_logit(answer, cap["tokens"][start:start + m])
                                       for m in range(RUNNING_EVERY, n - 1, RUNNING_EVERY)],
                    "confidence": confidence.from_vllm(t["completion"], lps, vocab,
                                                       args.logprobs)})
            append_jsonl(out / "traces.jsonl", rows_t)
            append_jsonl(out / "prompts.jsonl", rows_p)

        record = run.throughput_recorder("capture")
        record(run_captures(llm, jobs, on_done, f"validation: {len(jobs)} captures",
                            chunk=engine.chunk, on_progress=record, keep_prompt_logprobs=True))
    return out
