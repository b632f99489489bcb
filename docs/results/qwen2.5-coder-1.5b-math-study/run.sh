#!/bin/bash
# Efficacy v2 (issues 18, 31, 33): Qwen2.5-Coder-1.5B-Instruct on MATH, AdaRAS at the
# reference implementation's own dose. Every stage runs through the steered
# vLLM engine, is resumable (run it again), and records its arguments,
# versions, CPU kind, resolved dtype and throughput in $RUN/manifest.json. See
# README.md for the design and its amendments (float32 from 2026-12-08 on).
# From the float32 amendment on, the remaining work is two stages:
#   validation  stage 1's validation split teacher-forced in float32 with top-20
#               prompt logprobs (the data the held-out knobs are fixed on)
#   heldout     the first 300 MATH-500 problems, greedy, float32: baseline (also the
#               answer probe's held-out greedy set), +S, -S at alpha 0.3, and the noise
#               floor (the baseline again on the first 100, another batch mix)
# `run.sh remaining` runs what is unfinished in that order in one background job, saved
# every SAVE_EVERY seconds (600), from a git worktree pinned at the registration commit:
#   git worktree add /tmp/study-pinned <registration commit>
#   RUN=$PWD/runs/math-study STUDY=$PWD/docs/results/qwen2.5-coder-1.5b-math-study \
#     setsid bash /tmp/study-pinned/docs/results/qwen2.5-coder-1.5b-math-study/run.sh remaining
# After changing this file or the pipeline, run
# `pytest -m slow -k smoke tests/test_study_script.py` (SMOKE=1, ~15 min) first.
set -euo pipefail
SCRIPT=$(realpath "$0")
cd "$(dirname "$0")/../../.."  # the repository root: every path below is relative to it
# The code of this checkout runs every stage, not whatever checkout pip installed: a
# stage started from a worktree pinned at its registration commit stays on that code
# while main changes (PYTHONPATH precedes the editable install; the engine's processes
# inherit it).
export PYTHONPATH="$PWD/server${PYTHONPATH:+:$PYTHONPATH}"
HERE=${STUDY:-docs/results/qwen2.5-coder-1.5b-math-study}  # where results are committed
RUN=${RUN:-runs/math-study}
# Stage 1's profile with both heads, as committed (the run folder does not outlive a
# session on every machine): `bundle` wrote it from $RUN/train-answer-probe.
PROFILE=$HERE/stage1/profile.safetensors
A="python3 -m adaras.cli"
MODEL="--model qwen2.5-coder-1.5b-instruct"
# float32 on either CPU kind (the 2026-12-08 amendment): results do not depend on whether
# the CPU has native bf16. KV cache: 64 answers of up to 1280 tokens fit in 6 GiB in float32.
DTYPE=${DTYPE:-float32}
ENGINE="--dtype $DTYPE --max-num-seqs ${WIDTH:-64} --chunk ${CHUNK:-256} --max-model-len 5120 --kv-cache-gib 6"
MATH=data/math
# The registered sizes. SMOKE=1 runs every stage's glue on SmolLM2 with a handful of
# problems and short answers (RUN and STUDY then default to a scratch folder).
N_DEV=80 N_CONFIRM=500 N_NOISE=200 N_BON=100 N_HE=164 SAMPLES=8 KS=4,8 MAXTOK=1280
N_HELDOUT=300 N_HELDOUT_NOISE=100  # issue 33's registration (2026-12-08)
REGISTRATION=$HERE/heldout-registration.json
if [[ ${SMOKE:-0} == 1 ]]; then
  RUN=${RUN_SMOKE:-/tmp/math-study-smoke} HERE=${STUDY:-$RUN/study}
  PROFILE=server/adaras/profiles/smollm2-135m-instruct.safetensors
  MODEL="--model smollm2-135m-instruct"
  ENGINE="--dtype $DTYPE --max-num-seqs 16 --chunk 16 --max-model-len 2048 --kv-cache-gib 2"
  N_DEV=6 N_CONFIRM=8 N_NOISE=3 N_BON=4 N_HE=3 SAMPLES=3 KS=2,3 MAXTOK=48
  N_HELDOUT=8 N_HELDOUT_NOISE=3
  REGISTRATION=docs/results/qwen2.5-coder-1.5b-math-study/heldout-registration.json  # as committed
fi

# Until 2026-12-08 the stages were registered in bf16 and ran on the AVX-512 kind only.
# The float32 amendment lets every stage run on either kind (float32 decodes about 5x
# faster than emulated bf16 on the AVX2 EPYC; benchmarks/bench_dtype.py). float32 is
# not bit-identical across kinds, so paired arms must run on one kind: each stage's
# manifest entry records the CPU of every attempt (`machines`) and the dtype that ran.
machine_check() {
  local isa=avx2
  if grep -qw avx512_bf16 "${CPUINFO:-/proc/cpuinfo}"; then isa=avx512_bf16
  elif grep -qw avx512f "${CPUINFO:-/proc/cpuinfo}"; then isa=avx512; fi
  echo "run.sh $1: $DTYPE on $(grep -m1 "model name" "${CPUINFO:-/proc/cpuinfo}" | cut -d: -f2 | xargs) ($isa)"
}

# An eval stage's finished answers outlive the run folder as $HERE/<stage>/*.jsonl.gz
# (`run.sh save <stage>`); a stage restores them (and the problems and outcomes that
# later stages read) before it starts, so it resumes where the last save ended, on
# any machine. Work already in the run folder is never overwritten.
restore() {
  local f
  for f in generations samples; do
    if [[ -f $HERE/$1/$f.jsonl.gz && ! -s $RUN/$1/$f.jsonl ]]; then
      mkdir -p "$RUN/$1" && gunzip -c "$HERE/$1/$f.jsonl.gz" > "$RUN/$1/$f.jsonl.tmp"
      mv "$RUN/$1/$f.jsonl.tmp" "$RUN/$1/$f.jsonl"  # whole, or not there
      echo "restored $(wc -l < "$RUN/$1/$f.jsonl") answers of $1 from $HERE/$1/$f.jsonl.gz"
    fi
  done
  for f in problems.jsonl outcomes.jsonl results.json; do
    if [[ -f $HERE/$1/$f && ! -f $RUN/$1/$f ]]; then mkdir -p "$RUN/$1" && cp "$HERE/$1/$f" "$RUN/$1/"; fi
  done
  # the stage's manifest entry: its arguments (a resumed stage refuses others) and
  # its registration (kept, with its date)
  if [[ -f $HERE/$1/manifest.json ]]; then
    python3 - "$HERE/$1/manifest.json" "$RUN/manifest.json" "$1" <<'PY'
import json, sys
from pathlib import Path
saved, path, stage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
manifest = json.loads(path.read_text()) if path.exists() else {"stages": {}}
if stage not in manifest["stages"]:
    manifest["stages"][stage] = json.loads(saved.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"restored the manifest entry of {stage} from {saved}")
PY
  fi
}

# Stage 1's problems, so eval's check that no later stage reuses a collect problem
# has them to check against on a machine without the run folder.
restore_collect() {
  if [[ -f $HERE/stage1/collect-problems.jsonl && ! -f $RUN/collect/problems.jsonl ]]; then
    mkdir -p "$RUN/collect" && cp "$HERE/stage1/collect-problems.jsonl" "$RUN/collect/problems.jsonl"
  fi
}

smoke_refuses() {
  if [[ ${SMOKE:-0} == 1 ]]; then echo "run.sh $1: not in SMOKE mode (it would write real results)" >&2; exit 2; fi
}

# Copy $1 over $2 by a rename, so that neither a reader nor a kill sees half a file;
# the temporary copy lies in the run folder $3, never beside the committed files.
put() {
  local tmp; tmp=$(mktemp "$3/.put.XXXXXX")
  if cp "$1" "$tmp" && mv "$tmp" "$2"; then return 0; fi
  rm -f "$tmp"; return 1
}

save() {
  local f n m had tmp entry status lock saved=0 kept=1
  [[ -d $RUN/$1 ]] || { echo "save: no answers in $RUN/$1" >&2; return 2; }
  mkdir -p "$HERE/$1"
  exec {lock}> "$RUN/$1/.save.lock"; flock "$lock"  # one save of a stage at a time
  # The manifest entry first: the answers counted below are then at least those whose
  # work its throughput counts, so a stage resumed from this save never counts twice.
  entry=$(mktemp "$RUN/$1/.entry.XXXXXX")
  status=$(python3 - "$RUN/manifest.json" "$1" "$entry" <<'PY'
import json, sys
entry = json.load(open(sys.argv[1]))["stages"][sys.argv[2]]
json.dump(entry, open(sys.argv[3], "w"), indent=2, sort_keys=True)
print(entry.get("status", ""))
PY
) || { rm -f "$entry"; echo "save: no manifest entry of $1 in $RUN" >&2; return 1; }
  for f in generations samples; do
    [[ -s $RUN/$1/$f.jsonl ]] || continue
    saved=1
    # Complete lines only (a running stage may be writing the last one), compressed
    # under $RUN, counted, then renamed over the saved copy, which is the durable one: a
    # save that fails or stops halfway leaves it as it was, and never shrinks it.
    n=$(wc -l < "$RUN/$1/$f.jsonl") had=0 tmp=$(mktemp "$RUN/$1/.$f.XXXXXX")
    if [[ -f $HERE/$1/$f.jsonl.gz ]]; then had=$(gunzip -c "$HERE/$1/$f.jsonl.gz" | wc -l); fi
    if ! head -n "$n" "$RUN/$1/$f.jsonl" | gzip -9 -n > "$tmp" || ! m=$(gunzip -c "$tmp" | wc -l)
    then
      rm -f "$tmp" "$entry"; echo "save: could not write $tmp" >&2; return 1
    fi
    if (( m < had )); then
      rm -f "$tmp"; kept=0
      echo "save: $RUN/$1/$f.jsonl holds $m answers, fewer than the $had in" \
           "$HERE/$1/$f.jsonl.gz: not replaced" >&2
      continue
    fi
    mv "$tmp" "$HERE/$1/$f.jsonl.gz"
    echo "saved $m answers of $1 to $HERE/$1/$f.jsonl.gz"
  done
  if [[ $saved != 1 ]]; then rm -f "$entry"; echo "save: no answers in $RUN/$1" >&2; return 2; fi
  if [[ $kept != 1 ]]; then rm -f "$entry"; return 0; fi  # the saved copies stay together
  mv "$entry" "$HERE/$1/manifest.json"
  for f in problems.jsonl outcomes.jsonl; do
    if [[ -f $RUN/$1/$f ]]; then put "$RUN/$1/$f" "$HERE/$1/$f" "$RUN/$1"; fi
  done
  if [[ $status == done ]]; then  # results only of a stage that finished
    for f in results.json report.md accuracy.png; do
      if [[ -f $RUN/$1/$f ]]; then put "$RUN/$1/$f" "$HERE/$1/$f" "$RUN/$1"; fi
    done
  fi
}

# A registration file ($1, under $HERE) is in git, unchanged, before its stage's first answer.
# (asked of the checkout that holds $HERE, which may not be the one running this script)
registration_committed() {
  git -C "$HERE" ls-files --error-unmatch "$1" > /dev/null 2>&1 \
    && git -C "$HERE" diff --quiet HEAD -- "$1"
}

# Run stage $1 in a child and save it every SAVE_EVERY seconds while it runs and
# once when it ends; the stage's exit status. Call it as a plain command, never in
# an if, || or && list: there bash would ignore set -e in the stage's child too.
run_saving() {
  (main "$1") &
  local pid=$! rc=0 last=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if (( SECONDS - last >= ${SAVE_EVERY:-600} )); then
      # in the background, so set -e still holds inside it; a failed save (or nothing
      # to save yet) does not stop the stage
      (save "$1") & wait $! || true
      last=$SECONDS
    fi
  done
  wait "$pid" || rc=$?
  (save "$1") & wait $! || true
  return $rc
}

# The whole script is one function, parsed before it runs, so editing this file
# while a stage runs cannot change what the running shell does next.
main() {
case "${1:-}" in
pilot)  # stage 0: two candidate tasks, baseline only, 40 problems each
  smoke_refuses pilot
  # (two runs: a stage never reuses another stage's problems within one run)
  $A eval --run $RUN-pilot-a $MODEL --dataset $MATH/validation.jsonl --problems 40 \
     --modes baseline --max-tokens 4096 --stage pilot $ENGINE
  $A eval --run $RUN-pilot-b $MODEL --dataset $MATH/validation.jsonl --option level=4,5 \
     --problems 40 --modes baseline --max-tokens 4096 --stage pilot $ENGINE
  ;;
stage1)  # traces, the reference recipe's neurons (+ the paired recipe), both heads
  smoke_refuses stage1
  $A collect --run $RUN $MODEL --dataset $MATH/train.jsonl --problems 320 --probe 64 \
     --samples 8 --temperature 0.7 --top-p 0.95 --max-tokens 1280 $ENGINE
  $A identify --run $RUN --recipe reference --k 50 --alpha 0.3 $ENGINE
  $A identify --run $RUN --k 50 --alpha 0.3 $ENGINE
  $A train-predictor --run $RUN --profile $RUN/identify-reference/profile.safetensors $ENGINE
  $A train-predictor --run $RUN --target answer $ENGINE
  ;;
dev)  # stage 2: 80 validation problems; the confirm run's threshold and MDE, the grid
  machine_check dev; restore_collect; restore dev
  $A eval --run $RUN $MODEL --dataset $MATH/validation.jsonl --problems $N_DEV --stage dev \
     --modes baseline,always,adaptive --alphas 0.1,0.5,1 --answer-probe \
     --profile $PROFILE --max-tokens $MAXTOK $ENGINE
  ;;
register)  # after dev (and `run.sh save dev`), before confirm: by README's stage-3 rules
  python3 - "$HERE/dev/results.json" "$HERE/confirm-registration.json" "$PROFILE" "$N_CONFIRM" "$N_NOISE" "$MAXTOK" <<'PY'
import json, sys, time
from adaras.pipeline.stats import min_detectable_effect
from adaras.profile import SteeringProfile
dev_path, out, profile = sys.argv[1:4]
n, noise, max_tokens = map(int, sys.argv[4:])
dev = json.load(open(dev_path))
plus, adaptive = dev["configs"]["always"], dev["configs"]["adaptive"]
threshold = adaptive.get("youden_threshold")
source = f"dev's Youden cut of prompt p_fail against dev baseline failure ({dev_path})"
if threshold is None:  # dev's baseline has one class: the rule's fallback
    threshold = SteeringProfile.load(profile).threshold
    source = f"the profile's stored threshold ({profile}): dev's baseline has one class"
discordant = (plus["fixed"] + plus["broken"]) / plus["problems"]
mde = min_detectable_effect(n, discordant)
reg = {
    "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "primary_test": "always (+S) vs baseline, exact McNemar, two-sided, level 0.05",
    "key_secondary": "always (+S) vs minus (-S), exact McNemar, two-sided",
    "dose": "alpha 0.3 on raw S (the reference implementation's strength), fixed in advance",
    "positions": "always/minus/random: the last prompt position and every decode step; "
                 "adaptive: decode steps only (it decides after prefill)",
    "arms": {"baseline": n, "always": n, "minus": n, "random": n, "adaptive": n, "noise": noise},
    "random_arm": "per layer as many random neurons as the profile steers there (none of its "
                  "own), carrying that layer's delta values shuffled: same depth, same norm",
    "adaptive_threshold": threshold,
    "adaptive_threshold_source": source,
    "mde_at_80_power": mde,
    "mde_source": f"dev's always-vs-baseline discordance: {plus['fixed']} fixed + "
                  f"{plus['broken']} broken of {plus['problems']}, at n = {n}",
    "max_tokens": max_tokens, "truncation": "a truncated answer counts as a failure",
    "also_reported_without": "data/math/near_duplicates.json (6 test problems with "
                             "near-duplicate siblings in train or validation)",
    "helps_rule": "helps = a gain on the primary with p < 0.05 and no loss on HumanEval "
                  "(always vs baseline, all 164) with p < 0.05; if it helps, the bundled "
                  "Qwen2.5-Coder-1.5B profile keeps these neurons and alpha 0.3 as its default "
                  "dose; if not, the README says plainly that steering did not help at the "
                  "paper's own dose",
    "answer_probe_goals": "answer AUROC >= 0.88 and ECE <= 0.05 on the baseline answers; "
                          "best-of-4 by the probe >= greedy + 5 points",
}
with open(out, "x") as f:  # a registration is written once
    json.dump(reg, f, indent=2)
print(f"{out}: threshold {threshold:.3f}, MDE {mde if mde is None else round(mde, 3)}")
PY
  ;;
confirm)  # stage 3: the 500 MATH-500 problems, registered in the manifest first
  machine_check confirm; restore_collect; restore dev; restore confirm
  TH=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['adaptive_threshold'])" "$HERE/confirm-registration.json")
  $A eval --run $RUN $MODEL --dataset $MATH/test.jsonl --problems $N_CONFIRM --stage confirm \
     --modes baseline,always,minus,random,adaptive,noise --noise-problems $N_NOISE \
     --threshold "$TH" --primary always --secondary always,minus \
     --also-without $MATH/near_duplicates.json --register "$HERE/confirm-registration.json" \
     --answer-probe --profile $PROFILE \
     --max-tokens $MAXTOK $ENGINE
  ;;
best-of-n)  # the answer probe's best of n on the first 100 confirm problems
  machine_check best-of-n; restore confirm; restore best-of-n
  $A best-of-n --run $RUN $MODEL --profile $PROFILE \
     --problems-from confirm --problems $N_BON --samples $SAMPLES --ks $KS \
     --temperature 0.7 --top-p 0.95 --max-tokens $MAXTOK $ENGINE
  ;;
humaneval)  # transfer: the same profile and dose on HumanEval (all 164)
  machine_check humaneval; restore humaneval
  $A eval --run $RUN $MODEL --dataset humaneval --problems $N_HE --stage humaneval \
     --modes baseline,always \
     --profile $PROFILE --max-tokens $MAXTOK $ENGINE
  ;;
validation)  # issue 31 item 2: stage 1's validation split, teacher-forced, float32
  machine_check validation; smoke_refuses validation
  $A capture-validation --run $RUN $MODEL --traces $HERE/stage1 --profile $PROFILE \
     --logprobs 20 --dtype $DTYPE --max-model-len 5120 --max-num-seqs 16 --chunk 16 --kv-cache-gib 4
  mkdir -p "$HERE/validation"
  gzip -9 -n -c "$RUN/validation/traces.jsonl" > "$RUN/validation/.traces.gz"
  mv "$RUN/validation/.traces.gz" "$HERE/validation/traces.jsonl.gz"
  put "$RUN/validation/prompts.jsonl" "$HERE/validation/prompts.jsonl" "$RUN/validation"
  python3 - "$RUN/manifest.json" "$HERE/validation" <<'PY'
import json, sys
from pathlib import Path
entry = json.load(open(sys.argv[1]))["stages"]["validation"]
out = Path(sys.argv[2])
(out / "manifest.json").write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
traces = sum(1 for _ in __import__("gzip").open(out / "traces.jsonl.gz", "rt"))
prompts = sum(1 for _ in open(out / "prompts.jsonl"))
(out / "results.json").write_text(json.dumps(
    {"traces": traces, "prompts": prompts, "engine_dtypes": entry.get("engine_dtypes"),
     "machines": entry.get("machines")}, indent=2) + "\n")
print(f"saved validation: {traces} traces, {prompts} prompts")
PY
  ;;
knobs)  # issue 31 item 2: the held-out knobs from the validation capture, by the registered rules
  python3 -m adaras.pipeline.knobs "$HERE/validation" --profile $PROFILE \
     --calibrated "$HERE/validation/profile-calibrated.safetensors"
  ;;
heldout)  # issues 31 and 33: the first 300 MATH-500 problems, greedy, float32
  machine_check heldout; restore_collect; restore heldout
  $A eval --run $RUN $MODEL --dataset $MATH/test.jsonl --problems $N_HELDOUT --stage heldout \
     --modes baseline,always,minus,noise --noise-problems $N_HELDOUT_NOISE \
     --primary always --secondary always,minus \
     --also-without $MATH/near_duplicates.json --register "$REGISTRATION" \
     --answer-probe --logprobs 20 --profile $PROFILE \
     --max-tokens $MAXTOK $ENGINE
  ;;
bundle)  # the served Qwen profile: stage 1's most complete profile, renamed, recorded here
  smoke_refuses bundle
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
remaining)  # every stage not finished (no results.json saved), in order, saved as it runs
  # (from the float32 amendment on: validation, then heldout; each records its CPU kind)
  # one at a time per run folder: the lock is held by every process of this one,
  # engine processes included
  mkdir -p "$RUN"; exec 9> "$RUN/.remaining.lock"
  flock -n 9 || { echo "run.sh remaining: another one holds $RUN/.remaining.lock" \
                       "(a stray engine? pgrep -af VLLM)" >&2; exit 4; }
  for s in validation heldout; do
    if [[ $s == validation && ${SMOKE:-0} == 1 ]]; then continue; fi  # no stage-1 traces there
    if [[ $s == heldout && ${SMOKE:-0} != 1 && ! -f $HERE/heldout/results.json ]] \
       && ! registration_committed heldout-registration.json; then
      echo "run.sh remaining: commit $HERE/heldout-registration.json before heldout runs" >&2
      exit 5
    fi
    if [[ -f $HERE/$s/results.json ]]; then
      echo "run.sh remaining: $s (results saved in $HERE/$s) is done"
    elif [[ $s == validation ]]; then
      echo "run.sh remaining: $s, $(date -u +%FT%TZ)"
      (main validation)
    else
      echo "run.sh remaining: $s, $(date -u +%FT%TZ)"
      run_saving "$s"
    fi
  done
  echo "run.sh remaining: every stage is done, $(date -u +%FT%TZ); commit $HERE"
  main verdict
  ;;
verdict)  # the registered rules applied to the saved results: $HERE/verdict.{json,md}
  python3 "$(dirname "$SCRIPT")/verdict.py" "$HERE"
  ;;
save)  # commit-ready copies of a stage's answers (finished or not) and, when done, results
  save "${2:?save: which stage?}"
  ;;
restore)  # what each eval stage does first (here for a stage run by hand)
  restore "${2:?restore: which stage?}"
  ;;
*)
  echo "usage: run.sh pilot|stage1|dev|register|confirm|best-of-n|humaneval|validation|knobs|heldout|remaining|verdict|bundle|save STAGE|restore STAGE" >&2
  exit 2 ;;
esac
}
main "$@"; exit $?
