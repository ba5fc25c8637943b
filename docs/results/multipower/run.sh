S=/work/main/.venv/bin/scaling
C="--experiment dense --set model.d_model=64 --set model.n_layers=2 --set model.n_heads=2 --set data.seq_len=128 --set data.batch_size=32 --set data.eval_tokens=32768 --set eval_every=25 --set log_every=25 --set checkpoint_every=100000 --set progress=false --set optim.warmup_steps=50"
$S train $C --set optim.schedule=constant --set optim.lr=3e-3 --set budget.steps=1000 --out /tmp/mpl/const_3e-3
$S train $C --set optim.schedule=constant --set optim.lr=1e-3 --set budget.steps=1000 --out /tmp/mpl/const_1e-3
$S train $C --set optim.schedule=cosine --set optim.lr=3e-3 --set budget.steps=1000 --out /tmp/mpl/cos_1000
$S train $C --set optim.schedule=wsd --set optim.lr=3e-3 --set budget.steps=1000 --out /tmp/mpl/wsd_1000
$S train $C --set optim.schedule=cosine --set optim.lr=3e-3 --set budget.steps=2000 --out /tmp/mpl/cos_2000
