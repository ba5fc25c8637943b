"""sweep overhead: time outside training steps over a sweep of same-shape trials (warm compile cache).

Runs a sweep of ``--trials`` tiny trials of one shape (they differ only in seed) through the local
backend, after one warm-up trial has filled the persistent compilation cache, and reports

    overhead = 1 - (sum of the trials' training-step seconds) / (wall seconds of the whole sweep)

i.e. the fraction spent on process start-up, model/optimizer construction, compilation (a cache
load when warm), data-pipeline set-up, evaluation, checkpoints and the sweep's own bookkeeping.
Training-step seconds are the trainer's ``summary.json`` ``wall_s`` (timed steps only).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from scaling.sweep import launch, spec as spec_mod, store


def bench_spec(n_trials: int, flops: float, d_model: int, n_layers: int) -> dict:
    return {
        "name": "bench_sweep",
        "experiment": "dense",
        "set": {"model.d_model": d_model, "model.n_layers": n_layers, "model.n_heads": 2, "data.seq_len": 64,
                "data.batch_size": 16, "eval_every": 10**9, "checkpoint_every": 10**9, "log_every": 50},
        "buckets": [flops],
        "seeds": list(range(n_trials)),
    }


def add_arguments(parser, kind: str) -> None:
    parser.add_argument("--trials", type=int, default=8, help="same-shape trials in the timed sweep (default 8)")
    parser.add_argument("--flops", type=float, default=4e11, help="budget of each trial in FLOPs (default 4e11)")
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", help="keep the sweep here (default: a temporary directory)")


def measure(out: Path, *, n_trials: int = 8, flops: float = 4e11, d_model: int = 32, n_layers: int = 2,
            jobs: int = 1) -> dict:
    """Warm the compilation cache with one trial, then time the ``n_trials`` sweep."""
    warm = spec_mod.parse({**bench_spec(1, flops, d_model, n_layers), "seeds": [10**6]})
    warm_trials = spec_mod.trials(warm)
    store.write_manifest(out / "warmup", warm, warm_trials)
    launch.run_local(out / "warmup", warm_trials, jobs=1, progress=False)
    sp = spec_mod.parse(bench_spec(n_trials, flops, d_model, n_layers))
    trials = spec_mod.trials(sp)
    t0 = time.perf_counter()
    store.write_manifest(out / "sweep", sp, trials)
    counts = launch.run_local(out / "sweep", trials, jobs=jobs, progress=False)
    total = time.perf_counter() - t0
    df = store.load(out / "sweep")
    train_s = float(df["wall_s"].sum())
    return {"trials": n_trials, "done": counts["done"], "steps_per_trial": int(trials[0].steps),
            "flops_per_trial": flops, "shape": f"d{d_model}L{n_layers}", "jobs": jobs,
            "total_s": total, "train_step_s": train_s, "overhead_s": total - train_s * (1 if jobs == 1 else 1 / jobs),
            "overhead_fraction": 1.0 - train_s / (total * jobs), "tokens_per_s_mean": float(df["tokens_per_s"].mean())}


def run(args) -> int:
    if args.out:
        res = measure(Path(args.out), n_trials=args.trials, flops=args.flops, d_model=args.d_model,
                      n_layers=args.n_layers, jobs=args.jobs)
    else:
        with tempfile.TemporaryDirectory(prefix="scaling-bench-sweep-") as tmp:
            res = measure(Path(tmp), n_trials=args.trials, flops=args.flops, d_model=args.d_model,
                          n_layers=args.n_layers, jobs=args.jobs)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"sweep of {res['trials']} same-shape trials ({res['shape']}, {res['steps_per_trial']} steps each, "
              f"jobs {res['jobs']}, compile cache warm): total {res['total_s']:.1f} s, training steps "
              f"{res['train_step_s']:.1f} s -> overhead {100 * res['overhead_fraction']:.1f}% (target < 15%)")
    return 0 if res["done"] == res["trials"] else 1
