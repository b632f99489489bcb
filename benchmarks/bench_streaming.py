"""The pipeline's streaming runner against the chunked one it replaced:
generated tokens/s of the same greedy jobs, side by side on one engine.

    python benchmarks/bench_streaming.py [--model smollm2-135m-instruct]
        [--dtype auto] [--requests 256] [--chunk 128] [--max-num-seqs 32]
        [--max-tokens 512] [--rounds 2] [--eager]

  streaming  `adaras.pipeline.llm.run_jobs`: at most --chunk unfinished
             requests in the engine, refilled as they finish, answers handed
             over in job order as they complete.
  chunked    one `llm.generate` per --chunk jobs (the runner before it): each
             chunk drains to its longest answer before the next one starts.

Real MATH validation prompts (the study's dev split), greedy, answers of their
natural lengths up to --max-tokens: the tail of each chunk, where the batch
thins out, is what streaming removes, so the gain grows with the spread of
answer lengths and shrinks as --chunk grows past --max-num-seqs. The two run
in alternating order over --rounds with the prefix cache reset before each;
the best round of each is compared (interference only slows a run).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--dataset", default="data/math/validation.jsonl")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="no torch.compile (a faster start)")
    args = ap.parse_args()

    from vllm import SamplingParams

    from adaras.pipeline.data import build_messages, load_distinct
    from adaras.pipeline.llm import (
        EngineOptions,
        Job,
        close_engines,
        open_engine,
        prompt_ids,
        run_jobs,
    )

    llm = open_engine(EngineOptions(model=args.model, dtype=args.dtype,
                                    max_num_seqs=args.max_num_seqs,
                                    max_model_len=args.max_tokens + 1024,
                                    extra={"enforce_eager": True} if args.eager else {}))
    tok = llm.get_tokenizer()
    problems, _ = load_distinct(args.dataset, args.requests, seed=7)
    prompts = [prompt_ids(tok, build_messages(p)) for p in problems]

    def params():
        return SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def streaming() -> int:
        got: list[int] = []
        run_jobs(llm, [Job(str(i), p, params()) for i, p in enumerate(prompts)],
                 lambda done: got.extend(len(o.outputs[0].token_ids) for _, o, _ in done),
                 "streaming", chunk=args.chunk)
        return sum(got)

    def chunked() -> int:
        n = 0
        for i in range(0, len(prompts), args.chunk):
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts[i:i + args.chunk]],
                                params(), use_tqdm=False)
            n += sum(len(o.outputs[0].token_ids) for o in outs)
        return n

    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], SamplingParams(max_tokens=8),
                 use_tqdm=False)  # warm up
    ways = {"streaming": streaming, "chunked": chunked}
    best: dict[str, tuple[float, int, float]] = {}
    for r in range(args.rounds):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            tokens = ways[name]()
            dt = time.perf_counter() - t0
            print(f"round {r} {name:9s}: {tokens} tokens in {dt:.1f} s = {tokens / dt:.1f} "
                  "generated tok/s", flush=True)
            if tokens / dt > best.get(name, (0.0,))[0]:
                best[name] = (tokens / dt, tokens, dt)
    print(f"\n{args.requests} requests, chunk {args.chunk}, max_num_seqs {args.max_num_seqs}, "
          f"max_tokens {args.max_tokens}, model {args.model} ({args.dtype}"
          f"{', eager' if args.eager else ''})\n")
    print("| runner | generated tokens | seconds | generated tok/s (best of rounds) |\n"
          "|---|---|---|---|")
    for name, (rate, tokens, dt) in best.items():
        print(f"| {name} | {tokens} | {dt:.1f} | {rate:.1f} |")
    print(f"\nstreaming / chunked: {best['streaming'][0] / best['chunked'][0]:.3f}")
    close_engines()


if __name__ == "__main__":
    main()
