#!/usr/bin/env bash
# The longer multi-power check (issue 18): one shape, one peak lr, packages corpus (no byte seen
# twice). Fitted: constant 4000 steps, cosine 2000 steps. Predicted: WSD 2000, cosine 4000.
# About 7 minutes on 2 cores (results.md). Usage: bash run.sh [OUT_DIR] (default /tmp/mpl2)
set -euo pipefail
OUT=${1:-/tmp/mpl2}
S=${SCALING:-scaling}
C="--experiment dense --set model.d_model=48 --set model.n_layers=2 --set model.n_heads=2 --set data.seq_len=128
   --set data.batch_size=16 --set data.source=packages --set data.eval_tokens=16384 --set eval_every=50
   --set log_every=25 --set checkpoint_every=100000 --set progress=false --set optim.warmup_steps=100 --set optim.lr=6e-3"
$S train $C --set optim.schedule=constant --set budget.steps=4000 --out "$OUT/const_4000"
$S train $C --set optim.schedule=cosine --set budget.steps=2000 --out "$OUT/cos_2000"
$S train $C --set optim.schedule=wsd --set budget.steps=2000 --out "$OUT/wsd_2000"
$S train $C --set optim.schedule=cosine --set budget.steps=4000 --out "$OUT/cos_4000"
