#!/usr/bin/env bash
# The data-constrained law on our own runs (issue 18, part 2). Muennighoff et al.'s design at CPU
# scale: the same three shapes trained on fresh data (the whole stdlib training split, 12M
# tokens, never repeated) and on a 65,536-token slice of it (data.unique_tokens: 1,024 windows
# spread over the split) repeated up to 64 times. Fitted: every fresh run and the repeated runs
# of 4, 8 and 16 epochs. Held out (registered in prediction.md before these ran): the repeated
# runs of 32 and 64 epochs. Usage: bash run.sh [OUT_DIR] (default runs/data_constrained_cpu);
# then python docs/results/data_constrained_cpu/analyze.py OUT_DIR.
set -euo pipefail
OUT=${1:-runs/data_constrained_cpu}
S=${SCALING:-scaling}
U=65536
common="--experiment dense --set data.source=stdlib --set data.seq_len=128 --set data.batch_size=16
        --set optim.schedule=cosine --set optim.warmup_steps=25 --set eval_every=100000 --set log_every=50
        --set checkpoint_every=100000 --set progress=false"
# shape: d_model n_layers n_heads lr (lr = 1.126e-2 (N / 1.57e4)^-0.427, the tuned study's rule)
for shape in "32 2 2 9.3e-3" "48 2 3 6.6e-3" "64 2 4 5.1e-3"; do
  set -- $shape
  m="--set model.d_model=$1 --set model.n_layers=$2 --set model.n_heads=$3 --set optim.lr=$4"
  for D in 262144 524288 1048576 2097152; do
    $S train $common $m --set budget.tokens=$D --out "$OUT/fresh_d$1_D$D"
  done
  for D in 262144 524288 1048576 2097152 4194304; do
    $S train $common $m --set data.unique_tokens=$U --set budget.tokens=$D --out "$OUT/rep_d$1_D$D"
  done
done
