#!/bin/bash
# The Qwen2.5-Coder-1.5B-Instruct run recorded here (one CPU core: about 40 minutes,
# plus 15 minutes for the alpha sweep).
set -euo pipefail
RUN=${RUN:-runs/qwen-gsm}
A="python3 -m adaras.cli"
$A collect --run $RUN --model qwen2.5-coder-1.5b-instruct --dataset rg:gsm_symbolic \
   --problems 80 --probe 10 --samples 6 --temperature 0.8 --max-tokens 512
$A identify --run $RUN --k 50 --alpha 0.3
$A train-predictor --run $RUN
$A eval --run $RUN --dataset rg:gsm_symbolic --problems 60 --seed 1 --max-tokens 512 \
   --modes baseline,always,adaptive,random
$A eval --run $RUN --dataset rg:gsm_symbolic --problems 60 --seed 1 --max-tokens 512 \
   --modes baseline --alphas 1.0,3.0 --stage eval-alpha
