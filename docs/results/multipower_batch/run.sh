#!/usr/bin/env bash
# The third multi-power check (issue 18): the embedded stdlib corpus, one shape (d32 L2), one
# peak lr (6e-3), batch 32 x 128 (twice the second check's, to halve the gradient noise), the
# whole held-out split (121,984 tokens) every 50 steps. Fitted: constant 3000 steps, cosine 750
# and cosine 1500 steps (two decay speeds, so the fit sees how fast the loss answers a decrement).
# Predicted: WSD 1500 steps, cosine 3000 steps (2x the longest fitted cosine).
# Usage: bash run.sh [OUT_DIR] (default runs/multipower_batch), then the fits in results.md.
set -euo pipefail
OUT=${1:-runs/multipower_batch}
S=${SCALING:-scaling}
C="--experiment dense --set model.d_model=32 --set model.n_layers=2 --set model.n_heads=2 --set data.source=stdlib
   --set data.seq_len=128 --set data.batch_size=32 --set eval_every=50 --set log_every=25
   --set checkpoint_every=100000 --set progress=false --set optim.warmup_steps=100 --set optim.lr=6e-3"
$S train $C --set optim.schedule=constant --set budget.steps=3000 --out "$OUT/const_3000"
$S train $C --set optim.schedule=cosine --set budget.steps=750 --out "$OUT/cos_750"
$S train $C --set optim.schedule=cosine --set budget.steps=1500 --out "$OUT/cos_1500"
$S train $C --set optim.schedule=wsd --set budget.steps=1500 --out "$OUT/wsd_1500"
$S train $C --set optim.schedule=cosine --set budget.steps=3000 --out "$OUT/cos_3000"
