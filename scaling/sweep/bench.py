"""sweep throughput and overhead: a sweep of same-shape trials, one at a time and stacked.

Runs a sweep of ``--trials`` tiny trials of one shape (they differ only in seed) through the local
backend, after one warm-up trial has filled the persistent compilation cache, and reports

    overhead = 1 - (training-step seconds) / (wall seconds of the whole sweep)

i.e. the fraction spent on process start-up, model/optimizer construction, compilation (a cache
load when warm), data-pipeline set-up, evaluation, checkpoints and the sweep's own bookkeeping.
Training-step seconds are the trainer's ``summary.json`` ``wall_s`` (timed steps only; the lanes
of a stack share theirs, so a stack counts once).

With ``--stack auto|K`` resolving to more than one trial per stack (``auto``: 8 on an
accelerator, off on a CPU-only machine) the same sweep runs a second time stacked, in the same
process, and ``speedup`` = (trials per hour stacked) / (trials per hour one at a time).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from scaling.sweep import local, spec as spec_mod, store


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
    parser.add_argument("--stack", default="auto", metavar="auto|off|K",
                        help="also time the sweep stacked, K trials per stack (auto: 8 on an accelerator, off on CPU)")
    parser.add_argument("--out", help="keep the sweep here (default: a temporary directory)")


def measure(out: Path, *, n_trials: int = 8, flops: float = 4e11, d_model: int = 32, n_layers: int = 2,
            jobs: int = 1, stack: int = 1) -> dict:
    """Warm the compilation cache with one trial, then time the ``n_trials`` sweep one at a
    time and, with ``stack`` > 1, stacked (``stack`` trials per stack)."""
    warm_flops = flops / 50  # a few dozen steps: the compiled program does not depend on the budget
    warm = spec_mod.parse({**bench_spec(1, warm_flops, d_model, n_layers), "seeds": [10**6]})
    warm_trials = spec_mod.trials(warm)
    store.write_manifest(out / "warmup", warm, warm_trials)
    local.run_local(out / "warmup", warm_trials, jobs=1, progress=False, stack=1)
    sp = spec_mod.parse(bench_spec(n_trials, flops, d_model, n_layers))
    trials = spec_mod.trials(sp)
    res = {"trials": n_trials, "steps_per_trial": int(trials[0].steps), "flops_per_trial": flops,
           "shape": f"d{d_model}L{n_layers}", "jobs": jobs, "stack": stack}
    if stack > 1:  # the stacked program compiles once per width: warm that too
        warm_k = spec_mod.parse({**bench_spec(min(stack, n_trials), warm_flops, d_model, n_layers),
                                 "seeds": [10**6 + i for i in range(min(stack, n_trials))]})
        store.write_manifest(out / "warmup_stacked", warm_k, spec_mod.trials(warm_k))
        local.run_local(out / "warmup_stacked", spec_mod.trials(warm_k), jobs=1, progress=False, stack=stack)
    for name, width in (("one_at_a_time", 1), ("stacked", stack)) if stack > 1 else (("one_at_a_time", 1),):
        t0 = time.perf_counter()
        store.write_manifest(out / name, sp, trials)
        counts = local.run_local(out / name, trials, jobs=jobs, progress=False, stack=width)
        total = time.perf_counter() - t0
        df = store.load(out / name).set_index("trial_id")
        # a stack's lanes share their training seconds: count each stack once
        train_s = sum(float(df.loc[g, "wall_s"].max()) for g in local.plan_jobs(trials, width))
        res[name] = {"done": counts["done"], "total_s": total, "train_step_s": train_s,
                     "overhead_fraction": 1.0 - train_s / (total * jobs), "trials_per_hour": 3600 * n_trials / total}
    res["done"] = min(v["done"] for k, v in res.items() if isinstance(v, dict))
    res.update({k: res["one_at_a_time"][k] for k in ("total_s", "train_step_s", "overhead_fraction")})
    if stack > 1:
        res["speedup"] = res["stacked"]["trials_per_hour"] / res["one_at_a_time"]["trials_per_hour"]
        res["stacked_overhead_fraction"] = res["stacked"]["overhead_fraction"]
    return res


def run(args) -> int:
    from scaling.sweep.cli import stack_option

    stack = local.stack_width(stack_option(args.stack))
    kw = dict(n_trials=args.trials, flops=args.flops, d_model=args.d_model, n_layers=args.n_layers, jobs=args.jobs,
              stack=stack)
    if args.out:
        res = measure(Path(args.out), **kw)
    else:
        with tempfile.TemporaryDirectory(prefix="scaling-bench-sweep-") as tmp:
            res = measure(Path(tmp), **kw)
    if args.json:
        print(json.dumps(res))
    else:
        one = res["one_at_a_time"]
        print(f"sweep of {res['trials']} same-shape trials ({res['shape']}, {res['steps_per_trial']} steps each, "
              f"jobs {res['jobs']}, compile cache warm): one at a time {one['total_s']:.1f} s, training steps "
              f"{one['train_step_s']:.1f} s -> overhead {100 * one['overhead_fraction']:.1f}%")
        if stack > 1:
            st = res["stacked"]
            print(f"stacked {stack} per stack: {st['total_s']:.1f} s, training steps {st['train_step_s']:.1f} s -> "
                  f"overhead {100 * st['overhead_fraction']:.1f}%; speedup {res['speedup']:.2f}x trials per hour "
                  "(target >= 2.5x)")
        else:
            print(f"--stack {args.stack}: one at a time on this machine (stacking measured slower on CPU: "
                  "`scaling bench sweep --stack 8` times it)")
    return 0 if res["done"] == res["trials"] else 1
