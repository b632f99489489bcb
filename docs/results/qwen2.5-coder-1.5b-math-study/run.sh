#!/bin/bash
# Efficacy v2 (issue 18): Qwen2.5-Coder-1.5B-Instruct on MATH, AdaRAS at the
# reference implementation's own dose. Every stage runs through the steered
# vLLM engine, is resumable (run it again), and records its arguments,
# versions and throughput in $RUN/manifest.json. See README.md for the design.
# Run it in the background, detached, one stage at a time:
#   setsid bash docs/results/qwen2.5-coder-1.5b-math-study/run.sh pilot > pilot.log 2>&1 &
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../../.."  # the repository root: every path below is relative to it
RUN=${RUN:-runs/math-study}
A="python3 -m adaras.cli"
MODEL="--model qwen2.5-coder-1.5b-instruct"
ENGINE="--max-num-seqs ${WIDTH:-64} --chunk ${CHUNK:-256} --max-model-len 5120 --kv-cache-gib 6"
MATH=data/math

# The whole script is one function, parsed before it runs, so editing this file
# while a stage runs cannot change what the running shell does next.
main() {
case "${1:-}" in
pilot)  # stage 0: two candidate tasks, baseline only, 40 problems each
  # (two runs: a stage never reuses another stage's problems within one run)
  $A eval --run $RUN-pilot-a $MODEL --dataset $MATH/validation.jsonl --problems 40 \
     --modes baseline --max-tokens 4096 --stage pilot $ENGINE
  $A eval --run $RUN-pilot-b $MODEL --dataset $MATH/validation.jsonl --option level=4,5 \
     --problems 40 --modes baseline --max-tokens 4096 --stage pilot $ENGINE
  ;;
stage1)  # traces, the reference recipe's neurons (+ the paired recipe), both heads
  $A collect --run $RUN $MODEL --dataset $MATH/train.jsonl --problems 320 --probe 64 \
     --samples 8 --temperature 0.7 --top-p 0.95 --max-tokens 1280 $ENGINE
  $A identify --run $RUN --recipe reference --k 50 --alpha 0.3 $ENGINE
  $A identify --run $RUN --k 50 --alpha 0.3 $ENGINE
  $A train-predictor --run $RUN --profile $RUN/identify-reference/profile.safetensors $ENGINE
  $A train-predictor --run $RUN --target answer $ENGINE
  ;;
dev)  # stage 2: 80 validation problems; the confirm run's threshold and MDE, the grid
  $A eval --run $RUN --dataset $MATH/validation.jsonl --problems 80 --stage dev \
     --modes baseline,always,adaptive --alphas 0.1,0.5,1 --answer-probe \
     --profile $RUN/train-answer-probe/profile.safetensors --max-tokens 1280 $ENGINE
  ;;
confirm)  # stage 3: the 500 MATH-500 problems, registered in the manifest first
  TH=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['configs']['adaptive']['youden_threshold'])" "$RUN/dev/results.json")
  $A eval --run $RUN --dataset $MATH/test.jsonl --problems 500 --stage confirm \
     --modes baseline,always,minus,random,adaptive,noise --noise-problems 200 \
     --threshold "$TH" --primary always --register "$HERE/confirm-registration.json" \
     --answer-probe --profile $RUN/train-answer-probe/profile.safetensors \
     --max-tokens 1280 $ENGINE
  ;;
best-of-n)  # the answer probe's best of n on the first 100 confirm problems
  $A best-of-n --run $RUN --profile $RUN/train-answer-probe/profile.safetensors \
     --problems-from confirm --problems 100 --samples 8 --ks 4,8 --temperature 0.7 \
     --top-p 0.95 --max-tokens 1280 $ENGINE
  ;;
humaneval)  # transfer: the same profile and dose on HumanEval (all 164)
  $A eval --run $RUN --dataset humaneval --problems 164 --stage humaneval \
     --modes baseline,always \
     --profile $RUN/train-answer-probe/profile.safetensors --max-tokens 1280 $ENGINE
  ;;
bundle)  # the served Qwen profile: stage 1's most complete profile, renamed, recorded here
  python3 - "$RUN" "$HERE/stage1/profile.safetensors" <<'PY'
import shutil, sys
from pathlib import Path
from adaras.profile import SteeringProfile
run, out = Path(sys.argv[1]), Path(sys.argv[2])
src = next((run / s / "profile.safetensors" for s in ("train-answer-probe", "train-predictor")
            if (run / s / "profile.safetensors").exists()), None)
if src is None:
    sys.exit(f"{run}: no trained profile yet (run.sh stage1)")
prof = SteeringProfile.load(src)
prof.name = "qwen2.5-coder-math"
prof.provenance = {**prof.provenance, "bundled_from": f"{src.parent.name} of the MATH study",
                   "efficacy": "docs/results/qwen2.5-coder-1.5b-math-study/README.md"}
prof.save(out)
shutil.copyfile(out, "server/adaras/profiles/qwen2.5-coder-1.5b-instruct.safetensors")
print(f"bundled {src} as {prof.name}: prompt head {prof.predictor is not None}, "
      f"answer head {prof.answer_predictor is not None}")
PY
  ;;
*)
  echo "usage: run.sh pilot|stage1|dev|confirm|best-of-n|humaneval|bundle" >&2; exit 2 ;;
esac
}
main "$@"; exit $?
