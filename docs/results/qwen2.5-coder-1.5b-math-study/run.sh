#!/bin/bash
# Efficacy v2 (issue 18): Qwen2.5-Coder-1.5B-Instruct on MATH, AdaRAS at the
# reference implementation's own dose. Every stage runs through the steered
# vLLM engine, is resumable (run it again), and records its arguments,
# versions and throughput in $RUN/manifest.json. See README.md for the design.
# Run it in the background, detached, one stage at a time:
#   setsid bash docs/results/qwen2.5-coder-1.5b-math-study/run.sh pilot > pilot.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root: every path below is relative to it
HERE=${STUDY:-docs/results/qwen2.5-coder-1.5b-math-study}  # where results are committed
RUN=${RUN:-runs/math-study}
# Stage 1's profile with both heads, as committed (the run folder does not outlive a
# session on every machine): `bundle` wrote it from $RUN/train-answer-probe.
PROFILE=$HERE/stage1/profile.safetensors
A="python3 -m adaras.cli"
MODEL="--model qwen2.5-coder-1.5b-instruct"
ENGINE="--max-num-seqs ${WIDTH:-64} --chunk ${CHUNK:-256} --max-model-len 5120 --kv-cache-gib 6"
MATH=data/math

# An eval stage's finished answers outlive the run folder as $HERE/<stage>/
# generations.jsonl.gz (`run.sh save <stage>`); a stage restores them before it
# starts, so it resumes where the last saved chunk ended, on any machine.
restore() {
  local gz=$HERE/$1/generations.jsonl.gz
  if [[ -f $gz && ! -s $RUN/$1/generations.jsonl ]]; then
    mkdir -p "$RUN/$1" && gunzip -c "$gz" > "$RUN/$1/generations.jsonl"
    echo "restored $(wc -l < "$RUN/$1/generations.jsonl") answers of $1 from $gz"
  fi
}

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
  restore dev
  $A eval --run $RUN $MODEL --dataset $MATH/validation.jsonl --problems 80 --stage dev \
     --modes baseline,always,adaptive --alphas 0.1,0.5,1 --answer-probe \
     --profile $PROFILE --max-tokens 1280 $ENGINE
  ;;
confirm)  # stage 3: the 500 MATH-500 problems, registered in the manifest first
  restore confirm
  TH=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['configs']['adaptive']['youden_threshold'])" "$HERE/dev/results.json")
  $A eval --run $RUN $MODEL --dataset $MATH/test.jsonl --problems 500 --stage confirm \
     --modes baseline,always,minus,random,adaptive,noise --noise-problems 200 \
     --threshold "$TH" --primary always --register "$HERE/confirm-registration.json" \
     --answer-probe --profile $PROFILE \
     --max-tokens 1280 $ENGINE
  ;;
best-of-n)  # the answer probe's best of n on the first 100 confirm problems
  $A best-of-n --run $RUN $MODEL --profile $PROFILE \
     --problems-from confirm --problems 100 --samples 8 --ks 4,8 --temperature 0.7 \
     --top-p 0.95 --max-tokens 1280 $ENGINE
  ;;
humaneval)  # transfer: the same profile and dose on HumanEval (all 164)
  restore humaneval
  $A eval --run $RUN $MODEL --dataset humaneval --problems 164 --stage humaneval \
     --modes baseline,always \
     --profile $PROFILE --max-tokens 1280 $ENGINE
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
save)  # commit-ready copies of a stage's answers (finished or not) and, when done, results
  [[ -n ${2:-} && -s $RUN/$2/generations.jsonl ]] || { echo "save: no answers in $RUN/${2:-?}" >&2; exit 2; }
  mkdir -p "$HERE/$2"
  gzip -9 -n -c "$RUN/$2/generations.jsonl" > "$HERE/$2/generations.jsonl.gz"
  for f in problems.jsonl outcomes.jsonl results.json report.md accuracy.png; do
    if [[ -f $RUN/$2/$f ]]; then cp "$RUN/$2/$f" "$HERE/$2/"; fi
  done
  python3 -c "import json, sys; m = json.load(open(sys.argv[1]))['stages'][sys.argv[2]]
json.dump(m, open(sys.argv[3], 'w'), indent=2, sort_keys=True)" "$RUN/manifest.json" "$2" "$HERE/$2/manifest.json"
  echo "saved $(wc -l < "$RUN/$2/generations.jsonl") answers of $2 to $HERE/$2"
  ;;
restore)  # what each eval stage does first (here for a stage run by hand)
  restore "${2:?restore: which stage?}"
  ;;
*)
  echo "usage: run.sh pilot|stage1|dev|confirm|best-of-n|humaneval|bundle|save STAGE|restore STAGE" >&2
  exit 2 ;;
esac
}
main "$@"; exit $?
