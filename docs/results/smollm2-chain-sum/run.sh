#!/bin/bash
# The SmolLM2-135M-Instruct run recorded in docs/results/smollm2-chain-sum/.
# chain_sum with two one-digit terms has 200 distinct problems: 120 build the
# profile and the predictor, 70 of the other 80 evaluate it.
set -euo pipefail
RUN=${RUN:-runs/smollm2-chain-sum}
DATA=(--dataset rg:chain_sum --option min_terms=2 --option max_terms=2
      --option min_digits=1 --option max_digits=1 --option allow_negation=false)
A="python3 -m adaras.cli"
$A collect --run $RUN --model smollm2-135m-instruct "${DATA[@]}" --problems 120 --probe 32 --samples 8 --temperature 1.0 --max-tokens 256
$A identify --run $RUN --k 50 --alpha 0.3
for s in no-polarity no-ranking random; do $A identify --run $RUN --k 50 --alpha 0.3 --selection $s; done
$A train-predictor --run $RUN
$A train-predictor --run $RUN --target answer   # the answer head (added later; see README)
$A eval --run $RUN "${DATA[@]}" --problems 70 --seed 1 --max-tokens 256 \
   --alphas 0.1,0.3,0.5,0.7,1.0 --ks 10,25,50 \
   --ablation no-polarity=$RUN/identify-no-polarity/profile.safetensors \
   --ablation no-ranking=$RUN/identify-no-ranking/profile.safetensors
$A eval --run $RUN --dataset humaneval --problems 164 --modes baseline,always,adaptive --max-tokens 384 --stage eval-humaneval
