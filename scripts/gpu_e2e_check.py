"""End-to-end check for GPU users who have vLLM: steering under vLLM's
piecewise CUDA graphs gives the tokens of `--enforce-eager`.

    python3 scripts/gpu_e2e_check.py [--model Qwen/Qwen3-0.6B] [--profile p.safetensors]

It starts the model twice on one GPU (eager, then with piecewise CUDA graphs
and ADARAS_CUDA_GRAPHS=piecewise), runs the same greedy batch on both
(unsteered, `always` at two alphas, `adaptive` when the profile has a
predictor, short and chunked prompts, batch sizes that hit several captured
sizes) and compares token ids and reports. Without --profile it writes a
random profile for the model (K=64, seeded), which is enough to show that
steering is replayed, not frozen: its steered tokens must differ from the
unsteered ones, and equal eager's.

Exit status 0 and "PASS" when every output matches; 1 and "FAIL" with the
first difference otherwise; 0 and "SKIPPED" without a CUDA device or vLLM.
It has never run: this project's machines have no GPU with vLLM. Set
ADARAS_CUDA_GRAPHS=piecewise in production only after it passes on yours.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "What is 17 * 23? Think step by step.",
    "Write a haiku about tensor parallelism.",
] + [f"Count from {i} to {i + 12}, one number per line." for i in range(13)]


def skip(reason: str) -> int:
    print(f"SKIPPED gpu_e2e_check: {reason}")
    return 0


def random_profile(model: str, out: Path) -> Path:
    import torch
    import transformers

    from adaras.predictor import FailurePredictor
    from adaras.profile import ModelShape, SteeringProfile

    shape = ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(model))
    prof = SteeringProfile.random("e2e", shape, k=64, seed=0, scale=4.0, default_alpha=1.0)
    g = torch.Generator().manual_seed(1)
    flat = torch.randperm(shape.num_layers * shape.intermediate_size, generator=g)[:64]
    pred = FailurePredictor((flat // shape.intermediate_size).to(torch.int32),
                            (flat % shape.intermediate_size).to(torch.int32), hidden=16)
    with torch.no_grad():
        for p in pred.parameters():
            p.normal_(0.0, 0.5, generator=g)
    prof.predictor, prof.threshold = pred.eval(), 0.5
    prof.save(out)
    return out


def run(model: str, profile: Path, eager: bool, max_tokens: int) -> list[dict]:
    from vllm import LLM, SamplingParams

    from adaras.engine import load_profile, reports_of

    os.environ["ADARAS_CUDA_GRAPHS"] = "" if eager else "piecewise"
    llm = LLM(model, enforce_eager=eager, max_model_len=1024, max_num_batched_tokens=256,
              gpu_memory_utilization=0.35, seed=0, enable_prefix_caching=True,
              **({} if eager else {"compilation_config": {"cudagraph_mode": "PIECEWISE"}}))
    load_profile(llm, "e2e", str(profile))
    configs = [None, {"mode": "always", "profile": "e2e", "alpha": 1.0},
               {"mode": "always", "profile": "e2e", "alpha": 3.0},
               {"mode": "adaptive", "profile": "e2e"}]
    results = []
    for batch in (1, 4, len(PROMPTS)):  # several captured batch sizes
        params = [SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                 extra_args={"steering": c} if c else None)
                  for _ in range(batch) for c in configs]
        prompts = [p for p in PROMPTS[:batch] for _ in configs]
        outs = llm.generate(prompts, params, use_tqdm=False)
        reports = reports_of(outs)
        for o, c in zip(outs, [c for _ in range(batch) for c in configs]):
            rep = reports.get(o.request_id) or {}
            results.append({"batch": batch, "steering": c, "tokens": list(o.outputs[0].token_ids),
                            "applied": rep.get("applied"),
                            "p_fail": rep.get("failure_probability")})
    del llm
    gc.collect()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen/Qwen3-0.6B")
    ap.add_argument("--profile", type=Path, help="default: a seeded random profile")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("gpu_e2e_check.json"))
    args = ap.parse_args()
    try:
        import torch
        import vllm  # noqa: F401
    except Exception as e:
        return skip(f"vllm is not importable ({e})")
    if not torch.cuda.is_available():
        return skip("no CUDA device")
    profile = args.profile or random_profile(args.model, Path("gpu_e2e_check_profile.safetensors"))
    eager = run(args.model, profile, eager=True, max_tokens=args.max_tokens)
    graphs = run(args.model, profile, eager=False, max_tokens=args.max_tokens)
    args.out.write_text(json.dumps({"eager": eager, "piecewise": graphs}))
    for e, g in zip(eager, graphs):
        if (e["tokens"], e["applied"]) != (g["tokens"], g["applied"]) or (
                e["p_fail"] is not None and abs(e["p_fail"] - g["p_fail"]) > 1e-3):
            print(f"FAIL gpu_e2e_check: batch {e['batch']}, steering {e['steering']}: eager "
                  f"{e['tokens'][:12]}... (applied {e['applied']}, p_fail {e['p_fail']}) vs "
                  f"piecewise {g['tokens'][:12]}... (applied {g['applied']}, p_fail "
                  f"{g['p_fail']})")
            return 1
    unsteered = [r["tokens"] for r in eager if r["steering"] is None]
    steered = [r["tokens"] for r in eager if r["steering"] and r["steering"]["mode"] == "always"]
    if all(s in unsteered for s in steered):
        print("FAIL gpu_e2e_check: steering changed no output; the check proves nothing "
              "(use a stronger --profile)")
        return 1
    print(f"PASS gpu_e2e_check: {len(eager)} outputs under piecewise CUDA graphs equal "
          f"--enforce-eager's ({args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
