"""Which batch width decodes fastest: generated tokens/s of the pipeline's engine
at several numbers of requests in flight, on one engine.

    python benchmarks/bench_batch_width.py [--model qwen2.5-coder-1.5b-instruct]
        [--widths 16,32,64,96] [--max-tokens 256] [--rounds 2]

The pipeline's generating stages keep up to `--chunk` requests in the engine
with `--max-num-seqs` of them running (`adaras.pipeline.llm.run_jobs`, on
`open_engine`'s engine, every core bound). This starts one such engine with max_num_seqs = the largest width and,
for each width W, generates W real GSM-style chat prompts at once, greedy,
`ignore_eos`, exactly --max-tokens tokens each (so every width does the same
work per request). Widths are run in a rotating order over --rounds, and the
best round is reported (interference on a shared machine only slows a run).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--widths", default="16,32,64,96")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]

    from vllm import SamplingParams

    from adaras.pipeline.data import build_messages, load_distinct
    from adaras.pipeline.llm import EngineOptions, close_engines, open_engine, prompt_ids

    llm = open_engine(EngineOptions(model=args.model, max_num_seqs=max(widths)))
    tok = llm.get_tokenizer()
    problems, _ = load_distinct("rg:gsm_symbolic", max(widths), seed=7)
    prompts = [{"prompt_token_ids": prompt_ids(tok, build_messages(p))} for p in problems]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8), use_tqdm=False)  # warm up
    best: dict[int, float] = {}
    for r in range(args.rounds):
        for w in widths[r % len(widths):] + widths[:r % len(widths)]:
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = llm.generate(prompts[:w], params, use_tqdm=False)
            dt = time.perf_counter() - t0
            rate = sum(len(o.outputs[0].token_ids) for o in outs) / dt
            best[w] = max(best.get(w, 0.0), rate)
            print(f"round {r} width {w:4d}: {rate:7.1f} generated tok/s ({dt:.1f} s)", flush=True)
    top = max(best.values())
    print("\n| requests in flight | generated tok/s (best of rounds) | vs best |\n|---|---|---|")
    for w in widths:
        print(f"| {w} | {best[w]:.1f} | {best[w] / top:.2f} |")
    close_engines()


if __name__ == "__main__":
    main()
